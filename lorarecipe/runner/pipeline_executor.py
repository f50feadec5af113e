"""The diffusers pipeline executor: carries out a plan on one loaded pipeline.

Plan steps -> outputs, in an order that respects what each step needs of the pipeline's state:
load base, load adapters, merges, LoRA files (before anything is fused), grid cells that need LoRA
layers, set_adapters + fuse + unload, grid cells of the fused model, then checkpoints. Each step
runs in ``step_context`` so a failure names its recipe line. One pipeline load per build: grid
variants switch with set_adapters / disable_lora, never by reloading.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..paths import resolve_output
from ..plan import (
    FuseAdapters,
    LoadAdapter,
    LoadBase,
    MergeAdapters,
    Plan,
    RenderGrid,
    SaveCheckpoint,
    SaveLora,
    Step,
)
from .adapters import LoadedAdapter, load_adapter
from .context import step_context
from .fuse import FuseReport, fuse_adapters
from .merge import merge_adapters
from .pipeline_load import load_pipeline
from .progress import Reporter
from .quiet import quiet_libraries
from .resolve import ResolvedInput, resolve_adapter, resolve_base, resolve_config
from .save import save_lora, save_pipeline, save_single_file, torch_dtype

__all__ = ["PipelineRun", "run_with_pipeline"]


@dataclass
class PipelineRun:
    """What happened: resolved inputs, files written per output, reports and timings."""

    inputs: dict[str, ResolvedInput] = field(default_factory=dict)
    written: dict[str, list[Path]] = field(default_factory=dict)
    adapters: dict[str, LoadedAdapter] = field(default_factory=dict)
    fuse: FuseReport | None = None
    grids: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    config: Path | None = None  # config folder of a single-file base
    executors: dict[str, str] = field(default_factory=dict)  # output -> "diffusers" | "streaming"
    streams: dict[str, Any] = field(default_factory=dict)  # output -> StreamReport


@dataclass
class ExecOptions:
    out_root: Path
    recipe_root: Path
    device: str
    allow_read: tuple[Path, ...]
    reporter: Reporter
    provenance: dict[str, str]
    outputs: set[str]  # output names to produce with this executor
    resolved: dict[str, ResolvedInput] = field(
        default_factory=dict
    )  # step id -> input (resolved by the caller)


def _timed(run: PipelineRun, step: Step, options: ExecOptions, label: str) -> Any:
    """Context manager: step_context + timing + progress."""
    import contextlib

    @contextlib.contextmanager
    def manager() -> Any:
        options.reporter.step(label)
        start = time.perf_counter()
        with step_context(step):
            yield
        run.timings[step.id] = run.timings.get(step.id, 0.0) + time.perf_counter() - start

    return manager()


def _stamp(options: ExecOptions, output: str) -> dict[str, str]:
    return {**options.provenance, "lorarecipe.output": output}


def resolve_inputs(plan: Plan, options: ExecOptions, run: PipelineRun) -> Path | None:
    """Every input as a local path (built-in, local, hub download/cache) into ``run.inputs``; returns
    the config folder of a single-file base. Nothing is loaded."""
    base = plan.step("base")
    assert isinstance(base, LoadBase)
    with _timed(run, base, options, "resolve base"):
        run.inputs["base"] = options.resolved.get("base") or resolve_base(
            base.source,
            options.recipe_root,
            options.allow_read,
            variant=base.variant,
            single_file=base.single_file,
        )
        pinned = options.resolved.get("base:config")
        if pinned is not None:
            run.config = pinned.path
        elif base.config is not None:
            run.config = resolve_config(base.config, options.recipe_root, options.allow_read)
    for step in plan.of_type(LoadAdapter):
        with _timed(run, step, options, f"resolve adapter {step.name}"):
            run.inputs[step.id] = options.resolved.get(step.id) or resolve_adapter(
                step.source, options.recipe_root, options.allow_read
            )
    return run.config


def run_with_pipeline(plan: Plan, options: ExecOptions, run: PipelineRun) -> PipelineRun:
    """Execute the plan's pipeline-route outputs (``options.outputs``) on inputs already resolved."""
    from .grids import GridRenderer

    if not options.outputs:
        return run  # everything was streamed: no pipeline is built
    base = plan.step("base")
    assert isinstance(base, LoadBase)
    quiet_libraries(load=True)
    with _timed(run, base, options, "load base"):
        pipe, run.dtype = load_pipeline(base, run.inputs["base"].path, run.config, options.device)
    for step in plan.of_type(LoadAdapter):
        with _timed(run, step, options, f"load adapter {step.name}"):
            run.adapters[step.name] = load_adapter(pipe, step.name, run.inputs[step.id].path)
    for step in plan.of_type(MergeAdapters):
        with _timed(run, step, options, f"merge {step.name}"):
            merge_adapters(pipe, step)
    for step in plan.of_type(SaveLora):
        if step.output not in options.outputs:
            continue
        with _timed(run, step, options, f"write {step.path}"):
            final = resolve_output(options.out_root, step.path)
            file = save_lora(
                pipe,
                step.adapter,
                step.layout,
                final,
                step.weight_name,
                plan.family,
                _stamp(options, step.output),
                step.dtype,
            )
            run.written[step.output] = [file]
    grids = [g for g in plan.of_type(RenderGrid) if g.output in options.outputs]
    renderers = {g.output: GridRenderer(pipe, plan, g, options.device) for g in grids}
    for grid in grids:
        with _timed(run, grid, options, f"sample {grid.path}"):
            renderers[grid.output].render_unfused()
    fuse_steps = plan.of_type(FuseAdapters)
    checkpoints = [s for s in plan.of_type(SaveCheckpoint) if s.output in options.outputs]
    needs_fuse = bool(checkpoints) or any(r.needs_fused for r in renderers.values())
    if fuse_steps and needs_fuse:
        step = fuse_steps[0]
        with _timed(run, step, options, "fuse"):
            run.fuse = fuse_adapters(pipe, step)
        for grid in grids:
            with _timed(run, grid, options, f"sample {grid.path} (fused)"):
                renderers[grid.output].render_fused()
    for grid in grids:
        with _timed(run, grid, options, f"write {grid.path}"):
            final = resolve_output(options.out_root, grid.path)
            run.grids[grid.output] = renderers[grid.output].write(final, _stamp(options, grid.output))
            run.written[grid.output] = [final, *run.grids[grid.output].extra_files]
    # highest precision first, so casting for a later output never degrades an earlier one
    order = {"float32": 0, None: 1, "bfloat16": 2, "float16": 3}
    for step in sorted(checkpoints, key=lambda s: order.get(s.dtype, 1)):
        with _timed(run, step, options, f"write {step.path}"):
            if step.dtype and step.dtype != run.dtype:
                pipe.to(torch_dtype(step.dtype))
                run.dtype = step.dtype
            final = resolve_output(options.out_root, step.path)
            if step.layout == "diffusers":
                hub_id = base.source.ref if base.source.kind == "hub" else None
                save_pipeline(pipe, final, _stamp(options, step.output), hub_id)
                run.written[step.output] = sorted(p for p in final.rglob("*") if p.is_file())
            else:
                save_single_file(pipe, plan.family or "sd1", final, _stamp(options, step.output))
                run.written[step.output] = [final]
    return run
