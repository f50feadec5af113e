"""Fuse one tensor: base weight + each adapter's LoRA delta, with PEFT's exact float operations.

LoRA factors of one module (``LoraFactor``) + the weights and ``lora_scale`` of a fuse -> the fused
weight, in float32. This module is the one home of that arithmetic; every fuse the streaming executor
writes goes through :func:`fused_weight` (a row chunk of a weight is a slice of the same computation,
not a second version), and the pipeline route applies LyCORIS/DoRA terms with the same
:func:`apply_delta_term`. LyCORIS/DoRA adapters (``DeltaTerm``: a ΔW rebuilt by ``adapter_math``,
lorarecipe's own) come first, in fuse order, then the LoRA terms: a DoRA term re-normalizes the
weight it is given, and LoRAs applied at runtime (grids) act on top of the weight the deltas changed,
so fusing in this order is what the runtime mix computes. The LoRA terms use PEFT's formulas, in
PEFT's order, so a float32 result is bit-identical to ``fuse_lora`` on a float32 pipeline:

- scaling (``native_scaling``): ``set_scale(w)`` is ``w * alpha / r`` (``/ sqrt(r)`` with rsLoRA),
  then fuse_lora's ``scale_layer(lora_scale)`` multiplies it when ``lora_scale != 1``;
- delta (``lora_product``): ``get_delta_weight`` of a Linear (``B @ A``), a 1×1 Conv2d (squeezed
  matmul) or a k×k Conv2d (``conv2d(A^T, B)^T``), then ``* scaling`` (``scaled_delta``);
- fused (``fused_weight``): ``W.float() + Σ delta`` in fuse order, as PEFT's safe merge adds them.
  For an output rounded below float32 (``peft_order=False``), where only the one final rounding is
  kept, the Linear/1×1 terms are one GEMM instead, ``W.addmm_([s₁B₁ … sₙBₙ], [A₁; …; Aₙ])``: the same
  value to float32 rounding, in one pass over the weight, without delta temporaries.

``tests/test_streaming_factors.py`` compares each delta and scaling with PEFT's own bit for bit.
Importing this module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..errors import BuildError
from ..inspect.lycoris_keys import DoraAxis
from ..recipe.vocabulary import ValueEnum

__all__ = [
    "DeltaTerm",
    "DoraMagnitude",
    "FuseTarget",
    "FuseTerm",
    "LayerKind",
    "LoraFactor",
    "apply_delta_term",
    "delta_term_update",
    "fused_weight",
    "lora_product",
    "native_scaling",
    "product_shape",
    "rows_capable",
    "scaled_delta",
]


class LayerKind(ValueEnum):
    """The layer a LoRA adapts, which decides PEFT's delta formula."""

    LINEAR = "linear"
    CONV1X1 = "conv1x1"  # Conv2d with a 1×1 kernel: a matmul over channels
    CONV = "conv"  # Conv2d with a k×k kernel


@dataclass(frozen=True)
class LoraFactor:
    """One adapter on one module: float32 ``a`` [r, in(, kh, kw)] and ``b`` [out, r(, 1, 1)]."""

    a: Any
    b: Any
    alpha: float
    r: int
    rslora: bool
    kind: LayerKind


@dataclass(frozen=True)
class FuseTerm:
    """One adapter's contribution to one weight: its factors and its final scaling."""

    adapter: str
    factor: LoraFactor
    scaling: float


@dataclass(frozen=True)
class DoraMagnitude:
    """A DoRA magnitude for one weight: float32 values (one per row or column), the axis its norm
    runs along, and the eps the trainer adds to the norm (LyCORIS: float32 eps, PEFT: 0)."""

    magnitude: Any
    axis: DoraAxis
    eps: float


@dataclass(frozen=True)
class DeltaTerm:
    """One LyCORIS/DoRA adapter's contribution to one weight: ``delta()`` rebuilds its float32 ΔW at
    the file's own scale, shaped like the weight (read when needed, not held); ``strength`` is the
    recipe weight × ``lora_scale``; ``dora()`` gives its magnitude when the module is DoRA."""

    adapter: str
    delta: Callable[[], Any]
    strength: float
    dora: Callable[[], DoraMagnitude] | None = None


@dataclass(frozen=True)
class FuseTarget:
    """One base weight to fuse: its module and the adapters' terms, in fuse order (LyCORIS/DoRA
    ``deltas`` first, then the LoRA ``terms``)."""

    component: str
    module_name: str
    terms: tuple[FuseTerm, ...]
    deltas: tuple[DeltaTerm, ...] = ()

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(t.adapter for t in self.terms)

    @cached_property
    def stacked_down(self) -> Any:
        """The terms' ``A`` stacked, ``[A₁; …; Aₙ]`` as ``[Σr, in]`` (1×1 kernels flattened), computed
        once per target for the one-GEMM fuse (every row chunk of the weight uses it)."""
        import torch

        return torch.cat([t.factor.a.flatten(1) for t in self.terms], dim=0)


def native_scaling(factor: LoraFactor, weight: float, lora_scale: float) -> float:
    """PEFT's ``set_scale(weight)`` then ``scale_layer(lora_scale)``, same float operations in order."""
    if factor.rslora:
        scaling = weight * factor.alpha / math.sqrt(factor.r)
    else:
        scaling = weight * factor.alpha / factor.r
    if lora_scale != 1:
        scaling *= lora_scale
    return scaling


def rows_capable(target: FuseTarget | None) -> bool:
    """Whether a target's delta rows are ``lora_B`` rows @ ``lora_A`` (Linear, 1×1 Conv2d), so a row
    chunk of the weight can be fused on its own (never with a LyCORIS/DoRA term: a Kronecker or
    Hadamard ΔW is rebuilt whole, and DoRA's norm needs the whole weight)."""
    if target is None:
        return True
    return not target.deltas and all(t.factor.kind is not LayerKind.CONV for t in target.terms)


def delta_term_update(weight: Any, term: DeltaTerm) -> Any:
    """The change a term would make to a float32 ``weight``, not applied: s·ΔW, or for DoRA
    s·(W' − W) (what an ``extract`` merge sums; :func:`apply_delta_term` applies a term)."""
    from .adapter_math import dora_weight

    delta = term.delta()
    if term.dora is None:
        return delta.mul_(term.strength) if term.strength != 1 else delta
    found = term.dora()
    updated = dora_weight(weight, delta, found.magnitude, found.axis, eps=found.eps)
    return updated.sub_(weight).mul_(term.strength)


def apply_delta_term(weight: Any, term: DeltaTerm) -> None:
    """A float32 ``weight`` (the whole tensor) += s·ΔW in place; for DoRA, ``weight`` becomes
    W + s·(W' − W), W' = m ⊙ (W + ΔW)/‖W + ΔW‖ (``adapter_math.dora_weight``: the strength s
    interpolates the finished update, as ComfyUI applies a DoRA's strength)."""
    from .adapter_math import dora_weight

    delta = term.delta()
    if tuple(delta.shape) != tuple(weight.shape):
        raise BuildError(
            f"adapter {term.adapter!r}: ΔW {list(delta.shape)} does not fit the weight {list(weight.shape)}"
        )
    if term.dora is None:
        if term.strength != 1:
            delta.mul_(term.strength)
        weight += delta
        return
    found = term.dora()
    weight.copy_(
        dora_weight(weight, delta, found.magnitude, found.axis, strength=term.strength, eps=found.eps)
    )


def lora_product(factor: LoraFactor, rows: tuple[int, int] | None = None, out: Any = None) -> Any:
    """PEFT's ``get_delta_weight`` before scaling, in float32: rows ``rows`` of it (Linear and 1×1
    Conv2d only: those rows are the matching rows of ``lora_B`` @ ``lora_A``). Written into ``out``
    (a float32 tensor of the product's shape) when given: the same kernel, no fresh allocation."""
    import torch

    a, b = factor.a, factor.b
    if rows is not None:
        if factor.kind is LayerKind.CONV:
            raise BuildError("internal: a k×k convolution LoRA cannot be fused a row chunk at a time")
        b = b[rows[0] : rows[1]]
    if factor.kind is LayerKind.LINEAR:
        return b @ a if out is None else torch.matmul(b, a, out=out)
    if factor.kind is LayerKind.CONV1X1:  # PEFT's Conv2d 1×1 formula
        b2, a2 = b.squeeze(3).squeeze(2), a.squeeze(3).squeeze(2)
        if out is None:
            return (b2 @ a2).unsqueeze(2).unsqueeze(3)
        torch.matmul(b2, a2, out=out.view(out.shape[0], out.shape[1]))
        return out
    return torch.nn.functional.conv2d(a.transpose(0, 1), b).transpose(0, 1)


def product_shape(factor: LoraFactor, rows: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The shape of ``lora_product(factor, rows)`` (from the factors' shapes, nothing computed)."""
    total = factor.b.shape[0]
    out = total if rows is None else max(0, min(rows[1], total) - rows[0])  # as slicing b[start:stop]
    if factor.kind is LayerKind.LINEAR:
        return (out, factor.a.shape[1])
    if factor.kind is LayerKind.CONV1X1:
        return (out, factor.a.shape[1], 1, 1)
    return (out, factor.a.shape[1], *factor.a.shape[2:])


def scaled_delta(term: FuseTerm, rows: tuple[int, int] | None = None, out: Any = None) -> Any:
    """PEFT's ``get_delta_weight`` of the term (``product * scaling``), or rows ``rows`` of it."""
    return lora_product(term.factor, rows, out).mul_(
        term.scaling
    )  # in place: same values as product * scaling


def _add_low_rank(weight: Any, target: FuseTarget, rows: tuple[int, int] | None) -> None:
    """``weight += Σ sᵢ·BᵢAᵢ`` as one GEMM over the stacked factors, ``[s₁B₁ … sₙBₙ] @ [A₁; …; Aₙ]``
    (Linear and 1×1 Conv2d terms): one pass over the weight whatever the number of adapters."""
    import torch

    ups = [t.factor.b.flatten(1) for t in target.terms]  # [out, r] (1×1 kernels flattened)
    if rows is not None:
        ups = [b[rows[0] : rows[1]] for b in ups]
    down = target.stacked_down
    out, inp = ups[0].shape[0], down.shape[1]
    fits = all(k == 1 for k in weight.shape[2:]) and tuple(weight.shape[:2]) == (out, inp)
    if not fits or any(b.shape[0] != out for b in ups):
        raise BuildError(
            f"{target.component}.{target.module_name}: LoRA delta {[out, inp]} does not fit the base "
            f"weight {list(weight.shape)}"
        )
    up = torch.cat([b * t.scaling for b, t in zip(ups, target.terms, strict=True)], dim=1)
    weight.view(out, inp).addmm_(up, down)


def fused_weight(
    base: Any,
    target: FuseTarget,
    rows: tuple[int, int] | None = None,
    scratch: Any = None,
    out: Any = None,
    peft_order: bool = True,
) -> Any:
    """float32 ``base`` + each adapter's delta in fuse order, as PEFT's safe merge adds them.

    ``base`` is the whole weight, or its rows ``rows`` (a chunk: each delta row is the same dot
    product as in the whole tensor, so the chunks concatenate to the whole result bit for bit).
    ``scratch(slot, shape)`` gives reusable float32 buffers for the result and the delta (fresh
    multi-MB allocations are page-faulted in by the kernel, which costs more than the arithmetic);
    without it they are allocated. ``out``: the float32 tensor to write the result into (when it must
    outlive the scratch). Peak: base + result + one delta. ``peft_order=False`` (outputs below
    float32): Linear and 1×1 terms are added by one ``addmm_`` (see the module docstring); peak is base
    + result.
    """
    import torch

    if out is not None:
        weight = out
        weight.copy_(base)
    elif scratch is None:
        weight = base.to(torch.float32, copy=True)
    else:
        weight = scratch("weight", tuple(base.shape))
        weight.copy_(base)
    if target.deltas:
        if rows is not None:
            raise BuildError("internal: a LyCORIS/DoRA term cannot be fused a row chunk at a time")
        for delta_term in target.deltas:
            apply_delta_term(weight, delta_term)
    terms = target.terms
    if not peft_order and len(terms) and all(t.factor.kind is not LayerKind.CONV for t in terms):
        _add_low_rank(weight, target, rows)
        return weight
    for term in terms:
        shape = product_shape(term.factor, rows)
        if tuple(shape) != tuple(weight.shape):
            raise BuildError(
                f"{target.component}.{target.module_name}: LoRA delta {list(shape)} does not fit "
                f"the base weight {list(weight.shape)}"
            )
        reuse = scratch is not None and term.factor.kind is not LayerKind.CONV
        delta = scaled_delta(term, rows, scratch("delta", shape) if reuse else None)
        weight += delta
        del delta
    return weight
