"""The diffusers pipeline executor: carries out a plan on one loaded pipeline.

Plan + the outputs asked of it -> files, in an order that respects what each step needs of the
pipeline's state: load base, load adapters, merges, LoRA files (before anything is fused), grid cells
that need LoRA layers, set_adapters + fuse + unload, grid cells of the fused model, then checkpoints.
Each step runs in ``step_context`` so a failure names its recipe line. One pipeline load per build:
grid variants switch with set_adapters / disable_lora, never by reloading. It builds every output
kind, so it is the last executor of every mode. The pipeline comes from a ``WarmPipelines`` (``warm``):
a fresh load, or the batch's warm pipeline made pristine again; grids whose ``compile`` mode is
``regional`` render through that cache's compiled copy of the denoiser (``compiled``).

An output ``dtype`` other than the base's means one thing on both executors: fused in float32 and
rounded once to that dtype. For a float32 base that is fuse, then cast; for a half-precision base the
checkpoints in another dtype are built first on a second, float32 load of the base (the LoRA factors
then stay float32 too, as in the streaming fuser), while grids and the base-dtype checkpoints use the
base-dtype pipeline.

The package: ``load`` (the base, safely), ``adapters`` (one LoRA file, refusing silent drops),
``merge`` (PEFT ``add_weighted_adapter``), ``fuse`` (``fuse_lora`` + post-fuse check), ``save``
(folders, single files, LoRA files), ``grids`` (sample grids), ``warm`` (the pipeline cache),
``compiled`` (the compiled render copy of the denoiser).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BuildError
from ...fs.paths import resolve_output
from ...plan import (
    CheckpointLayout,
    FuseAdapters,
    LoadAdapter,
    LoadBase,
    MergeAdapters,
    Plan,
    RenderGrid,
    SaveCheckpoint,
    SaveLora,
)
from ..build_state import BuildState, FuseCheck, OutputRecord

if TYPE_CHECKING:
    from .grids import GridRenderer
    from .warm import WarmPipelines

__all__ = ["PipelineExecutor"]

# highest precision first, so casting for a later output never degrades an earlier one
_SAVE_ORDER = {"float32": 0, None: 1, "bfloat16": 2, "float16": 3}


class PipelineExecutor:
    """Builds every output kind on one diffusers pipeline; leaves nothing.

    ``cells`` (grid output -> (column, batch) units) makes it render those cells of those grids into
    the cell cache and write nothing (a grid shard: ``runner.render_grid_cells``); ``rendered`` then counts
    the cells each grid rendered.
    """

    name = "diffusers"

    def __init__(
        self,
        pipelines: WarmPipelines | None = None,
        cells: Mapping[str, set[tuple[int, int]]] | None = None,
    ) -> None:
        from .warm import WarmPipelines

        self.pipelines = pipelines or WarmPipelines(keep=False)
        self.cells = cells
        self.rendered: dict[str, int] = {}

    def build(self, plan: Plan, outputs: Sequence[str], state: BuildState) -> list[str]:
        from ...families import get_family
        from ...recipe.vocabulary import COMBINATION_TYPES
        from ..lycoris_adapters import LycorisAdapter, is_lycoris_file
        from ..quiet import quiet_libraries
        from .adapters import check_experts, load_adapter
        from .extract import extract_merge
        from .fuse import fuse_adapters
        from .grids import GridRenderer
        from .lycoris import load_lycoris, model_keys
        from .merge import merge_adapters
        from .save import cast_pipeline, save_lora, save_pipeline, save_single_file
        from .warm import processors, restore_processors

        wanted = set(outputs)
        if not wanted:
            return []
        options = state.options
        base = plan.step("base")
        assert isinstance(base, LoadBase)
        rounded_once = self._other_dtype_checkpoints(plan, base, wanted, state)
        if rounded_once:
            pipeline_dtype = state.dtype
            self.build(_loaded_in_float32(plan), rounded_once, state)
            state.dtype = pipeline_dtype
            wanted -= set(rounded_once)
            if not wanted:
                return []
        grids = [g for g in plan.of_type(RenderGrid) if g.output in wanted]
        facts = _grid_facts(plan, base, state)
        modes = {g.output: g.compile or self.pipelines.compile for g in grids}
        renderers = {
            g.output: GridRenderer(plan, g, {**facts, "compile": self.pipelines.compile_key(modes[g.output])})
            for g in grids
        }
        if self.cells is not None:
            for name, renderer in renderers.items():
                renderer.restrict(self.cells.get(name, set()))
        if wanted == {g.output for g in grids} and not any(r.needs_pipeline for r in renderers.values()):
            state.dtype = state.dtype or facts["dtype"]
            # every cell is in the cell cache: no pipeline to load (a shard: nothing to do)
            for grid in grids if self.cells is None else ():
                self._write_grid(grid, renderers[grid.output], state)
            return []
        quiet_libraries(load=True)
        with state.step(base, "load base"):
            pipe, state.dtype = self.pipelines.acquire(
                base, state.inputs["base"].path, state.config, options.device
            )
            as_loaded = processors(pipe)  # tokenizers and scheduler as loaded, for saved pipelines
        for grid in grids:  # before any adapter: the compiled copy never carries a PEFT layer
            if modes[grid.output] != "none" and renderers[grid.output].needs_pipeline:
                with state.step(grid, f"compile the denoiser ({modes[grid.output]})"):
                    denoiser = self.pipelines.compiled_denoiser(pipe, modes[grid.output])
                renderers[grid.output].compiled = denoiser
        keys = model_keys(pipe, plan.family)  # before any PEFT layer renames a weight
        lycoris: dict[str, LycorisAdapter] = {}  # LyCORIS/DoRA adapters: applied by lorarecipe itself
        differences: dict[str, Path] = {}  # checkpoint differences: read by extract merges
        for step in plan.of_type(LoadAdapter):
            with state.step(step, f"load adapter {step.name}"):
                path = state.inputs[step.id].path
                if step.difference:
                    differences[step.name] = path
                elif is_lycoris_file(path):
                    check_experts(pipe, get_family(plan.family), step.load_into, path.name)
                    placed = load_lycoris(
                        step.name, path, keys, plan.family, step.scale_convention, step.load_into
                    )
                    lycoris[step.name] = placed
                    state.adapters[step.name] = placed.modules_per_component()
                else:
                    loaded = load_adapter(pipe, step.name, path, plan.family, step.load_into)
                    state.adapters[step.name] = loaded.modules
        for step in plan.of_type(MergeAdapters):
            with state.step(step, f"merge {step.name}"):
                if COMBINATION_TYPES[step.method].peft:
                    refuse_lycoris(step.name, step.adapters, lycoris, "PEFT's merges take only LoRAs")
                    merge_adapters(pipe, step)
                else:  # extract: any adapters -> a plain LoRA adapter, by SVD
                    extracted = extract_merge(pipe, step, lycoris, plan.family, differences)
                    state.extractions[step.name] = extracted
        for step in plan.of_type(SaveLora):
            if step.output not in wanted:
                continue
            with state.step(step, f"write {step.path}"):
                refuse_lycoris(step.output, (step.adapter,), lycoris, "a LoRA output writes a plain LoRA")
                final = resolve_output(options.out_root, step.path)
                file = save_lora(
                    pipe,
                    step.adapter,
                    step.layout,
                    final,
                    step.weight_name,
                    plan.family,
                    options.stamp(step.output),
                    step.dtype,
                    before_swap=state.before_swap(step),
                    component=step.component,
                )
                files = sorted(p for p in file.parent.rglob("*") if p.is_file())
                state.add_output(step.output, OutputRecord(self.name, files))
        for grid in grids:
            renderers[grid.output].attach(pipe, lycoris)
            if renderers[grid.output].needs_pipeline:
                with state.step(grid, f"sample {grid.path}"):
                    renderers[grid.output].render_unfused()
        fuse_steps = plan.of_type(FuseAdapters)
        checkpoints = [s for s in plan.of_type(SaveCheckpoint) if s.output in wanted]
        check: FuseCheck | None = None
        if fuse_steps and (checkpoints or any(r.needs_fused for r in renderers.values())):
            fuse = fuse_steps[0]
            with state.step(fuse, "fuse"):
                report = fuse_adapters(pipe, fuse, plan.family, lycoris)
            check = FuseCheck(report.changed, report.expected, report.components)
            for grid in grids:
                if renderers[grid.output].needs_fused:
                    with state.step(grid, f"sample {grid.path} (fused)"):
                        renderers[grid.output].render_fused()
        self.rendered = {name: r.rendered for name, r in renderers.items()}
        for grid in grids if self.cells is None else ():
            self._write_grid(grid, renderers[grid.output], state)
        for step in sorted(checkpoints, key=lambda s: _SAVE_ORDER.get(s.dtype, 1)):
            with state.step(step, f"write {step.path}"):
                if step.dtype and step.dtype != state.dtype:
                    cast_pipeline(pipe, step.dtype)
                    state.dtype = step.dtype
                final = resolve_output(options.out_root, step.path)
                if step.layout is CheckpointLayout.DIFFUSERS:
                    # a fast tokenizer keeps the last grid call's padding/truncation and would write
                    # it into tokenizer.json: a saved pipeline holds them as loaded, grid or not
                    restore_processors(pipe, as_loaded)
                    hub_id = base.source.ref if base.source.kind == "hub" else None
                    save_pipeline(pipe, final, options.stamp(step.output), hub_id, state.before_swap(step))
                    files = sorted(p for p in final.rglob("*") if p.is_file())
                else:
                    fused = check.components if check is not None else ()
                    family = plan.family or "sd1"
                    stamp = options.stamp(step.output)
                    save_single_file(pipe, family, final, stamp, fused, step.component)
                    files = [final]
                state.add_output(step.output, OutputRecord(self.name, files, fuse=check))
        return []

    def _write_grid(self, grid: RenderGrid, renderer: GridRenderer, state: BuildState) -> None:
        grid_mode = grid.compile or self.pipelines.compile  # cached cells were keyed by it too
        cached = sum(len(v) for v in renderer.images.values()) - renderer.rendered
        label = f"write {grid.path}" + (f" ({cached} cells from the cell cache)" if cached else "")
        with state.step(grid, label):
            final = resolve_output(state.options.out_root, grid.path)
            result = renderer.write(final, state.options.stamp(grid.output))
            difference = result.fused_vs_runtime_max_diff
            state.add_output(
                grid.output,
                OutputRecord(
                    self.name,
                    [final, *result.extra_files],
                    fused_vs_runtime_max_diff=difference,
                    compiled=grid_mode if grid_mode != "none" else None,
                ),
            )

    @staticmethod
    def _other_dtype_checkpoints(
        plan: Plan, base: LoadBase, wanted: set[str], state: BuildState
    ) -> list[str]:
        """Checkpoints asked in a dtype other than a half-precision base's: fused on a float32 load."""
        from .load import load_dtype

        stored = load_dtype(base, state.inputs["base"].path)
        if stored == "float32":
            return []
        return [
            s.output
            for s in plan.of_type(SaveCheckpoint)
            if s.output in wanted and s.dtype is not None and s.dtype != stored
        ]


def refuse_lycoris(where: str, names: Sequence[str], lycoris: Mapping[str, Any], why: str) -> None:
    """A step that PEFT carries out refuses LyCORIS/DoRA inputs (the compiler refuses them from headers;
    a hub file not fetched at compile time is caught here)."""
    found = [n for n in names if n in lycoris]
    if found:
        raise BuildError(
            f"{where}: {found[0]!r} is a LyCORIS/DoRA adapter and {why}; use a merge with method 'extract'"
        )


def _loaded_in_float32(plan: Plan) -> Plan:
    """The same plan with the base loaded in float32 (an exact upcast of a half-precision base)."""
    steps = tuple(
        dataclasses.replace(s, dtype="float32") if isinstance(s, LoadBase) else s for s in plan.steps
    )
    return dataclasses.replace(plan, steps=steps)


def _grid_facts(plan: Plan, base: LoadBase, state: BuildState) -> dict[str, Any]:
    """What grid cell keys need from the build: the pipeline's dtype and device, and the content hash of
    every base/adapter input (and of a single-file base's config folder)."""
    from ...fs.hashing import path_digest
    from .load import load_dtype

    digests: dict[str, str | None] = {
        s.id: path_digest(state.inputs[s.id].path)
        for s in plan.steps
        if isinstance(s, (LoadBase, LoadAdapter)) and s.id in state.inputs
    }
    if state.config is not None:
        digests["config"] = path_digest(state.config)
    dtype = load_dtype(base, state.inputs["base"].path)
    return {"dtype": dtype, "device": state.options.device, "digests": digests}
