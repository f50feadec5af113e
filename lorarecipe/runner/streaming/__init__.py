"""The streaming fuse executor: fused checkpoints written tensor by tensor, without building the pipeline.

Plan + the checkpoint outputs asked of it -> each written by :func:`.stream.stream_fuse`, in memory
bounded by the largest tensor. It builds ``pipeline`` and ``single_file`` outputs only and hands
every other output on. Where it cannot reproduce the diffusers route exactly it raises
``StreamingUnsupported``: not strict (``--executor auto``) it then hands that output on too; strict
(``--executor streaming``) the refusal fails the build. Any other error fails the build in every mode.

The package, in the order data flows: ``sources`` (where each output tensor's bytes come from, from
headers), ``skeleton`` (diffusers and PEFT decide what to add where, on a weightless pipeline),
``factors`` and ``factor_cache`` (what they decided, kept per adapter), ``lycoris_targets`` (the
LyCORIS/DoRA adapters lorarecipe applies itself), ``tensors`` (one output tensor, fused with
``runner.fuse_math``), ``writer`` and ``positional_io`` (the files), ``stream`` (one checkpoint end to end).
"""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import StreamingUnsupported
from ...fs.paths import resolve_output
from ...plan import Plan, SaveCheckpoint
from ..build_state import BuildState, FuseCheck, OutputRecord

__all__ = ["StreamingExecutor"]


class StreamingExecutor:
    """Streams checkpoint outputs; hands on everything else (and, unless strict, what it refuses)."""

    name = "streaming"

    def __init__(self, strict: bool) -> None:
        self.strict = strict

    def build(self, plan: Plan, outputs: Sequence[str], state: BuildState) -> list[str]:
        from ..pipeline.load import load_dtype
        from .stream import stream_fuse

        left: list[str] = []
        for name in outputs:
            step = plan.output_step(name)
            if not isinstance(step, SaveCheckpoint):
                left.append(name)
                continue
            final = resolve_output(state.options.out_root, step.path)
            try:
                with state.step(step, f"write {step.path} (streaming)"):
                    report = stream_fuse(
                        plan,
                        step,
                        base_path=state.inputs["base"].path,
                        config_path=state.config,
                        adapter_paths=state.adapter_paths(),
                        final=final,
                        metadata=state.options.stamp(name),
                        before_swap=state.before_swap(step),
                    )
                    state.dtype = state.dtype or load_dtype(plan.step("base"), state.inputs["base"].path)  # type: ignore[arg-type]
            except StreamingUnsupported as refusal:
                if self.strict:
                    raise
                state.options.reporter.log(
                    f"{name}: streaming refused ({refusal.message}); using the diffusers route"
                )
                left.append(name)
                continue
            if report.factors_cached:
                state.options.reporter.log(f"{name}: LoRA factors from the cache (diffusers/PEFT not loaded)")
            files = sorted(p for p in final.rglob("*") if p.is_file()) if final.is_dir() else [final]
            check = FuseCheck(
                changed=report.changed,
                expected=report.targets,
                components=report.components,
                tensors=report.tensors,
                max_abs_diff_vs_fp32=report.max_abs_diff_vs_fp32,
                peak_rss_bytes=report.peak_rss_bytes,
                lora_factors_from_cache=report.factors_cached,
            )
            hashes = {(final / rel if rel else final): digest for rel, digest in report.file_hashes.items()}
            state.add_output(name, OutputRecord(self.name, files, fuse=check, hashes=hashes))
        return left
