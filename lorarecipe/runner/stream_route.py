"""Route fuse+save outputs through the streaming fuser (``streaming.py``) instead of a pipeline.

SaveCheckpoint steps + resolved inputs -> files, one output at a time, in memory bounded by the
largest tensor. ``--executor auto`` (the default) streams every checkpoint and falls back to the
diffusers pipeline for the few cases the streamer refuses (it raises ``BuildError`` for LoRA bias,
DoRA, non-LoRA layers, or a single file that is not in the LDM/SGM layout); ``--executor streaming``
makes those an error instead; ``--executor diffusers`` never streams.
"""

from __future__ import annotations

from ..errors import BuildError
from ..paths import resolve_output
from ..plan import Plan, SaveCheckpoint
from .context import step_context
from .pipeline_executor import ExecOptions, PipelineRun

__all__ = ["EXECUTORS", "stream_checkpoints"]

EXECUTORS = ("auto", "streaming", "diffusers")


def stream_checkpoints(plan: Plan, options: ExecOptions, run: PipelineRun, executor: str) -> set[str]:
    """Stream the wanted checkpoint outputs; returns the names done (the rest go to the pipeline)."""
    from .streaming import pipeline_dtype, stream_fuse

    if executor == "diffusers":
        return set()
    steps = [s for s in plan.of_type(SaveCheckpoint) if s.output in options.outputs]
    done: set[str] = set()
    for step in steps:
        options.reporter.step(f"write {step.path} (streaming)")
        try:
            with step_context(step):
                final = resolve_output(options.out_root, step.path)
                base = plan.step("base")
                adapters = {
                    k.split(":", 1)[1]: v.path for k, v in run.inputs.items() if k.startswith("adapter:")
                }
                report = stream_fuse(
                    plan,
                    step,
                    base_path=run.inputs["base"].path,
                    config_path=run.config,
                    adapter_paths=adapters,
                    final=final,
                    metadata={**options.provenance, "lorarecipe.output": step.output},
                )
                run.dtype = run.dtype or pipeline_dtype(base, run.inputs["base"].path)  # type: ignore[arg-type]
        except BuildError as exc:
            # only the streamer's own refusals fall back; I/O failures (StepFailedError), unsafe or
            # missing inputs are real errors that the pipeline route would hit as well
            if executor == "streaming" or type(exc) is not BuildError:
                raise
            options.reporter.log(
                f"{step.output}: streaming refused ({exc.message}); using the diffusers route"
            )
            continue
        run.timings[step.id] = report.seconds
        if report.factors_cached:
            options.reporter.log(f"{step.output}: LoRA factors from the cache (diffusers/PEFT not loaded)")
        run.streams[step.output] = report
        run.executors[step.output] = "streaming"
        run.written[step.output] = (
            sorted(p for p in final.rglob("*") if p.is_file()) if final.is_dir() else [final]
        )
        done.add(step.output)
    return done
