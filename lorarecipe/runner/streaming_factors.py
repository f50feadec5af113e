"""LoRA factors per base weight, and the fuse terms computed from them: PEFT's formulas, torch only.

Adapter factors (per module: ``lora_A``, ``lora_B``, alpha, rank, rsLoRA, layer kind) + the
FuseAdapters step -> for each base weight a fused adapter applies to, the terms ``scaling · ΔW`` in
fuse order (``FuseTarget``). The factors come from a weightless pipeline on which diffusers and PEFT
ran (``streaming_skeleton``), or from the factor cache (``factor_cache``); either way this module
turns them into deltas with the exact float operations PEFT uses, so the fused weight is the same
bit for bit:

- scaling: ``set_scale(w)`` is ``w * alpha / r`` (``/ sqrt(r)`` with rsLoRA), then fuse_lora's
  ``scale_layer(lora_scale)`` multiplies it when ``lora_scale != 1``;
- delta: ``get_delta_weight`` of a Linear (``B @ A``), a 1×1
  Conv2d (squeezed matmul) or a k×k Conv2d (``conv2d(A^T, B)^T``), times the scaling.

The skeleton route cross-checks every scaling against PEFT's own and ``tests/test_streaming_factors.py``
compares each delta with PEFT's ``get_delta_weight``. Importing this module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BuildError
from ..plan import FuseAdapters

__all__ = [
    "KINDS",
    "FuseTarget",
    "FuseTerm",
    "LoraFactor",
    "delta_rows",
    "delta_weight",
    "factors_from_model",
    "native_scaling",
    "rows_capable",
    "scalar_weights",
    "targets_from_factors",
]

KINDS = ("linear", "conv1x1", "conv")

ModuleKey = tuple[str, str]  # (component, module name)


@dataclass(frozen=True)
class LoraFactor:
    """One adapter on one module: float32 ``a`` [r, in(, kh, kw)] and ``b`` [out, r(, 1, 1)]."""

    a: Any
    b: Any
    alpha: float
    r: int
    rslora: bool
    kind: str


@dataclass(frozen=True)
class FuseTerm:
    adapter: str
    factor: LoraFactor
    scaling: float


@dataclass(frozen=True)
class FuseTarget:
    """One base weight to fuse: its module and the adapters' terms, in fuse order."""

    component: str
    module_name: str
    terms: tuple[FuseTerm, ...]

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(t.adapter for t in self.terms)


def native_scaling(factor: LoraFactor, weight: float, lora_scale: float) -> float:
    """PEFT's ``set_scale(weight)`` then ``scale_layer(lora_scale)``, same float operations in order."""
    if factor.rslora:
        scaling = weight * factor.alpha / math.sqrt(factor.r)
    else:
        scaling = weight * factor.alpha / factor.r
    if lora_scale != 1:
        scaling *= lora_scale
    return scaling


def delta_weight(term: FuseTerm) -> Any:
    """PEFT's ``get_delta_weight`` for the term's layer kind, in float32."""
    import torch

    a, b, kind = term.factor.a, term.factor.b, term.factor.kind
    if kind == "linear":
        product = b @ a
    elif kind == "conv1x1":
        product = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    else:
        product = torch.nn.functional.conv2d(a.transpose(0, 1), b).transpose(0, 1)
    return product.mul_(term.scaling)  # in place on a fresh tensor: same values as product * scaling


def rows_capable(target: FuseTarget | None) -> bool:
    """Whether a target's delta rows are ``lora_B`` rows @ ``lora_A`` (plain Linear, 1×1 Conv2d)."""
    return target is None or all(t.factor.kind in ("linear", "conv1x1") for t in target.terms)


def delta_rows(term: FuseTerm, rows: tuple[int, int]) -> Any:
    """Rows ``rows`` of the term's delta before scaling (``rows_capable`` kinds only)."""
    start, stop = rows
    a, b = term.factor.a, term.factor.b[start:stop]
    if term.factor.kind == "conv1x1":  # PEFT's conv2d 1×1 formula
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    return b @ a


def scalar_weights(fuse: FuseAdapters) -> bool:
    """Whether every fused adapter has one weight for all modules (no per-block/component dict)."""
    return all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in fuse.weights)


def _kind(where: str, module: Any) -> str:
    import torch

    layer = module.get_base_layer()
    if isinstance(layer, torch.nn.Linear) and not getattr(module, "fan_in_fan_out", False):
        return "linear"
    if isinstance(layer, torch.nn.Conv2d) and layer.groups == 1:
        return "conv1x1" if tuple(layer.weight.shape[2:4]) == (1, 1) else "conv"
    raise BuildError(
        f"{where}: a LoRA on a {type(layer).__name__} layer; the streaming fuser only fuses Linear and "
        "Conv2d layers (use --executor diffusers)"
    )


def factors_from_model(
    component: str, model: Any, adapters: Iterable[str]
) -> dict[str, dict[ModuleKey, LoraFactor]]:
    """The factors of ``adapters`` on every PEFT layer of ``model`` (a component of the skeleton).

    Refuses what a LoRA delta cannot express: a LoRA bias, a DoRA magnitude, a non-LoRA layer
    (LoKr/LoHa), a layer other than Linear/Conv2d.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wanted = list(adapters)
    out: dict[str, dict[ModuleKey, LoraFactor]] = {a: {} for a in wanted}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        where = f"{component}.{name}"
        lora_a = getattr(module, "lora_A", {})
        for adapter in wanted:
            if adapter not in lora_a:
                if any(adapter in getattr(module, n, {}) for n in module.adapter_layer_names):
                    raise BuildError(
                        f"{where}: adapter {adapter!r} is not a plain LoRA layer ({type(module).__name__}); "
                        "the streaming fuser only fuses plain LoRA (use --executor diffusers)"
                    )
                continue
            if getattr(module, "lora_bias", {}).get(adapter) or adapter in getattr(
                module, "lora_variant", {}
            ):
                raise BuildError(
                    f"{where}: adapter {adapter!r} has a LoRA bias or a DoRA magnitude; the streaming "
                    "fuser only fuses plain LoRA (use --executor diffusers)"
                )
            out[adapter][(component, name)] = LoraFactor(
                a=module.lora_A[adapter].weight.detach().float(),
                b=module.lora_B[adapter].weight.detach().float(),
                alpha=module.lora_alpha[adapter],
                r=int(module.r[adapter]),
                rslora=bool(module.use_rslora.get(adapter, False)),
                kind=_kind(where, module),
            )
    return out


def targets_from_factors(
    factors: Mapping[str, Mapping[ModuleKey, LoraFactor]],
    fuse: FuseAdapters,
    scalings: Mapping[tuple[str, str, str], float] | None = None,
) -> dict[tuple[str, str], FuseTarget]:
    """{(component, base weight key): target} for ``fuse``: each fused adapter's terms in fuse order.

    Scalings are computed (``native_scaling``) unless given per (component, module, adapter), which
    the skeleton route does for per-block weights (diffusers expands those).
    """
    terms: dict[ModuleKey, list[FuseTerm]] = {}
    for adapter, weight in zip(fuse.adapters, fuse.weights, strict=True):
        if adapter not in factors:
            raise BuildError(f"no LoRA factors for adapter {adapter!r}")
        for (component, module), factor in factors[adapter].items():
            if fuse.components and component not in fuse.components:
                continue
            if scalings is not None:
                scaling = scalings[(component, module, adapter)]
            else:
                scaling = native_scaling(factor, float(weight), fuse.lora_scale)
            terms.setdefault((component, module), []).append(FuseTerm(adapter, factor, scaling))
    if not terms:
        raise BuildError("none of the requested components carries a LoRA adapter: nothing to fuse")
    return {
        (component, f"{module}.weight"): FuseTarget(component, module, tuple(found))
        for (component, module), found in terms.items()
    }
