"""A regionally compiled copy of the denoiser that grid variants are rendered with, by weight copy.

Pipeline (pristine, before any adapter) -> a render copy of its denoiser (UNet or transformer) whose
repeated blocks are compiled once (diffusers' ``compile_repeated_blocks``). Each grid column then
copies its weights into that copy in place and renders through it, so nothing is recompiled between
columns, recipes or builds of the same base (in-place copies keep every guard of the compiled code;
tests count the frames with a counting backend):

- a column that needs LoRA layers: for every LoRA layer of the eager denoiser, its base weight plus
  each active adapter's ``scaling · ΔW`` (the scalings ``set_adapters`` just set, times the column's
  ``lora_scale``), computed by :func:`~lorarecipe.runner.fuse_math.fused_weight` and rounded once to
  the weight's dtype; the copy never carries a PEFT layer (its compiled code would be invalidated);
- a column without LoRA layers (``base`` after ``disable_lora``, ``fused`` after the fuse): the eager
  denoiser's weights as they are.

Text encoders, the VAE and the scheduler are the pipeline's own (eager, live LoRA), swapped in for
the duration of the call only. So compiled cells equal eager cells only up to float rounding: a
runtime LoRA ``W·x + s·B(A·x)`` becomes ``(W + s·BA)·x``, and the compiler may reorder sums.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from ...errors import BuildError, StreamingUnsupported
from ...recipe.vocabulary import FAMILIES

__all__ = ["COMPILE_MODES", "CompiledDenoiser", "denoiser_name"]

#: grid ``compile`` modes -> what they mean
COMPILE_MODES: dict[str, str] = {
    "none": "render grids eagerly (LoRA layers live)",
    "regional": "compile the denoiser's repeated blocks once per worker; each variant's weights are "
    "copied into it (no recompilation)",
}


def denoiser_name(pipe: Any) -> str:
    """The pipeline's denoiser component: ``unet`` or ``transformer``."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise BuildError("this pipeline has neither a unet nor a transformer to compile")


class CompiledDenoiser:
    """A pristine copy of a pipeline's denoiser, its repeated blocks compiled once."""

    def __init__(self, pipe: Any, mode: str, backend: Any = "inductor") -> None:
        if mode != "regional":
            raise BuildError(f"internal: unknown compile mode {mode!r}")
        self.mode = mode
        self.component = denoiser_name(pipe)
        model = getattr(pipe, self.component)
        if not getattr(model, "_repeated_blocks", None):
            family = next(
                (f for f, spec in FAMILIES.items() if spec.pipeline_class == type(pipe).__name__), "?"
            )
            raise BuildError(
                f"compile: regional needs a denoiser with repeated blocks; {type(model).__name__} "
                f"({family}) declares none in this diffusers version"
            )
        if getattr(model, "peft_config", None):
            raise BuildError("internal: the compiled copy must be made before any adapter is loaded")
        self.model = copy.deepcopy(model)
        self.model.compile_repeated_blocks(backend=backend, fullgraph=True)

    @contextlib.contextmanager
    def rendering(self, pipe: Any, scale: float | None) -> Iterator[None]:
        """Load the column's weights (from ``pipe``'s eager denoiser as set up for the column) into
        the compiled copy, and swap it into ``pipe`` while the block runs."""
        self._load_column(getattr(pipe, self.component), scale)
        eager = getattr(pipe, self.component)
        setattr(pipe, self.component, self.model)  # the pipeline's config keeps the same class entry
        try:
            yield
        finally:
            setattr(pipe, self.component, eager)

    def _load_column(self, eager: Any, scale: float | None) -> None:
        import torch

        live = dict(self.model.named_parameters())
        with torch.no_grad():
            fused = _column_weights(eager, scale)
            for key, tensor in eager.named_parameters():
                if ".lora_" in key:
                    continue
                name = key.replace(".base_layer.", ".")
                value = fused.get(name, tensor)
                live[name].copy_(value)  # in place: the compiled code keeps its guards


def _column_weights(eager: Any, scale: float | None) -> dict[str, Any]:
    """{weight name: W + Σ scaling·ΔW} for each LoRA layer of ``eager`` with active adapters, as the
    eager forward would apply them (``scale`` multiplies each scaling, as ``scale_lora_layers`` does)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..fuse_math import FuseTarget, FuseTerm, fused_weight
    from ..streaming.factors import factors_from_model

    out: dict[str, Any] = {}
    for name, module in eager.named_modules():
        if not isinstance(module, BaseTunerLayer) or module.disable_adapters:
            continue
        active = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
        if not active:
            continue
        try:
            factors = factors_from_model("denoiser", _Single(name, module), active)
        except StreamingUnsupported as exc:
            raise BuildError(
                f"compile: regional cannot render this grid by weight copy: {exc.message}"
            ) from None
        terms = []
        for adapter in active:
            scaling = module.scaling[adapter]
            if scale is not None and scale != 1:
                scaling *= scale
            terms.append(FuseTerm(adapter, factors[adapter][("denoiser", name)], scaling))
        base = module.get_base_layer().weight
        target = FuseTarget("denoiser", name, tuple(terms))
        out[f"{name}.weight"] = fused_weight(base, target).to(base.dtype)
    return out


class _Single:
    """One named module seen as a model (what ``factors_from_model`` walks)."""

    def __init__(self, name: str, module: Any) -> None:
        self.name, self.module = name, module

    def named_modules(self) -> Iterator[tuple[str, Any]]:
        yield self.name, self.module
