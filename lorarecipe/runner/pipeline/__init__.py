"""The diffusers pipeline executor: carries out a plan on one loaded pipeline.

Plan + the outputs asked of it -> files, in an order that respects what each step needs of the
pipeline's state: load base, load adapters, merges, LoRA files (before anything is fused), grid cells
that need LoRA layers, set_adapters + fuse + unload, grid cells of the fused model, then checkpoints.
Each step runs in ``step_context`` so a failure names its recipe line. One pipeline load per build:
grid variants switch with set_adapters / disable_lora, never by reloading. It builds every output
kind, so it is the last executor of every mode.

The package: ``load`` (the base, safely), ``adapters`` (one LoRA file, refusing silent drops),
``merge`` (PEFT ``add_weighted_adapter``), ``fuse`` (``fuse_lora`` + post-fuse check), ``save``
(folders, single files, LoRA files), ``grids`` (sample grids).
"""

from __future__ import annotations

from collections.abc import Sequence

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

__all__ = ["PipelineExecutor"]

# highest precision first, so casting for a later output never degrades an earlier one
_SAVE_ORDER = {"float32": 0, None: 1, "bfloat16": 2, "float16": 3}


class PipelineExecutor:
    """Builds every output kind on one diffusers pipeline; leaves nothing."""

    name = "diffusers"

    def build(self, plan: Plan, outputs: Sequence[str], state: BuildState) -> list[str]:
        from ..quiet import quiet_libraries
        from .adapters import load_adapter
        from .fuse import fuse_adapters
        from .grids import GridRenderer
        from .load import load_pipeline
        from .merge import merge_adapters
        from .save import cast_pipeline, save_lora, save_pipeline, save_single_file

        wanted = set(outputs)
        if not wanted:
            return []
        options = state.options
        base = plan.step("base")
        assert isinstance(base, LoadBase)
        quiet_libraries(load=True)
        with state.step(base, "load base"):
            pipe, state.dtype = load_pipeline(base, state.inputs["base"].path, state.config, options.device)
        for step in plan.of_type(LoadAdapter):
            with state.step(step, f"load adapter {step.name}"):
                loaded = load_adapter(pipe, step.name, state.inputs[step.id].path, plan.family)
                state.adapters[step.name] = loaded.modules
        for step in plan.of_type(MergeAdapters):
            with state.step(step, f"merge {step.name}"):
                merge_adapters(pipe, step)
        for step in plan.of_type(SaveLora):
            if step.output not in wanted:
                continue
            with state.step(step, f"write {step.path}"):
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
                )
                files = sorted(p for p in file.parent.rglob("*") if p.is_file())
                state.add_output(step.output, OutputRecord(self.name, files))
        grids = [g for g in plan.of_type(RenderGrid) if g.output in wanted]
        renderers = {g.output: GridRenderer(pipe, plan, g, options.device) for g in grids}
        for grid in grids:
            with state.step(grid, f"sample {grid.path}"):
                renderers[grid.output].render_unfused()
        fuse_steps = plan.of_type(FuseAdapters)
        checkpoints = [s for s in plan.of_type(SaveCheckpoint) if s.output in wanted]
        check: FuseCheck | None = None
        if fuse_steps and (checkpoints or any(r.needs_fused for r in renderers.values())):
            fuse = fuse_steps[0]
            with state.step(fuse, "fuse"):
                report = fuse_adapters(pipe, fuse, plan.family)
            check = FuseCheck(report.changed, report.expected, report.components)
            for grid in grids:
                with state.step(grid, f"sample {grid.path} (fused)"):
                    renderers[grid.output].render_fused()
        for grid in grids:
            with state.step(grid, f"write {grid.path}"):
                final = resolve_output(options.out_root, grid.path)
                result = renderers[grid.output].write(final, options.stamp(grid.output))
                files = [final, *result.extra_files]
                difference = result.fused_vs_runtime_max_diff
                state.add_output(
                    grid.output, OutputRecord(self.name, files, fused_vs_runtime_max_diff=difference)
                )
        for step in sorted(checkpoints, key=lambda s: _SAVE_ORDER.get(s.dtype, 1)):
            with state.step(step, f"write {step.path}"):
                if step.dtype and step.dtype != state.dtype:
                    cast_pipeline(pipe, step.dtype)
                    state.dtype = step.dtype
                final = resolve_output(options.out_root, step.path)
                if step.layout is CheckpointLayout.DIFFUSERS:
                    hub_id = base.source.ref if base.source.kind == "hub" else None
                    save_pipeline(pipe, final, options.stamp(step.output), hub_id, state.before_swap(step))
                    files = sorted(p for p in final.rglob("*") if p.is_file())
                else:
                    fused = check.components if check is not None else ()
                    save_single_file(pipe, plan.family or "sd1", final, options.stamp(step.output), fused)
                    files = [final]
                state.add_output(step.output, OutputRecord(self.name, files, fuse=check))
        return []
