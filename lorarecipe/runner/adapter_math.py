"""Adapter factors as stored in a file -> the weight update ΔW (and DoRA's re-normalized weight).

One function per algorithm (LoRA/LoCon, LoHa, LoKr, DoRA), each documented with its formula. Input:
float32 tensors in the shapes the file stores, alpha and rank. Output: a fresh float32 tensor. Every
factor is rebuilt from its *stored* shape; nothing re-derives a factorization (old LyCORIS LoKr files
store the larger Kronecker factor first, and a re-derived split puts it second). No I/O, no key names,
no dtype casts. torch is imported inside the functions so that importing this module stays torch-free.
Which axis a DoRA magnitude normalizes is a rule over shapes, decided from the header
(:func:`lorarecipe.inspect.lycoris_keys.dora_axis`); :func:`dora_weight` takes its answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from ..inspect.lycoris_keys import DoraAxis

if TYPE_CHECKING:
    import torch

__all__ = [
    "LYCORIS_DORA_EPS",
    "DoraAxis",
    "LokrConvention",
    "dora_weight",
    "loha_delta",
    "lokr_delta",
    "lokr_scale",
    "lora_delta",
    "tucker_rebuild",
]

LokrConvention = Literal["lycoris", "peft"]

#: What LyCORIS (``weight_decompose``), ComfyUI and OneTrainer add to the DoRA norm:
#: ``torch.finfo(torch.float32).eps``. PEFT adds nothing.
LYCORIS_DORA_EPS = 2.0**-23


def _check_float32(**tensors: torch.Tensor | None) -> None:
    """Every formula here is defined on float32 factors; a silent upcast would hide a caller's bug."""
    import torch

    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype != torch.float32:
            raise TypeError(f"{name} is {tensor.dtype}; adapter math takes float32 factors (cast first)")


def tucker_rebuild(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker core (i, j, *k), wa (i, p), wb (j, q) -> (p, q, *k) = Σ_ij core[i,j]·wa[i,p]·wb[j,q].

    The CP/Tucker form LyCORIS uses for k×k convolutions (``lora_mid``, ``lokr_t2``, ``hada_t*``):
    the core mixes the two rank axes per kernel position; wa maps the first to the output
    channels, wb the second to the input channels. Same einsum as ``lycoris.functional.general``.
    """
    import torch

    if core.dim() < 3 or wa.dim() != 2 or wb.dim() != 2:
        raise ValueError(
            f"Tucker core {tuple(core.shape)} needs 2-D factors, got {tuple(wa.shape)}, {tuple(wb.shape)}"
        )
    if (core.shape[0], core.shape[1]) != (wa.shape[0], wb.shape[0]):
        raise ValueError(
            f"Tucker core {tuple(core.shape)} does not match factors {tuple(wa.shape)} and {tuple(wb.shape)}"
        )
    return torch.einsum("i j ..., i p, j r -> p r ...", core, wa, wb)


def lora_delta(
    down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None, *, alpha: float, rank: int
) -> torch.Tensor:
    """LoRA / LoCon factors -> ΔW = (α/r)·B·A, shaped (out, in, *kernel).

    down = A (r, in) or (r, in, kh, kw); up = B (out, r) or (out, r, 1, 1). A k×k conv is the
    matrix product of the flattened factors, reshaped (the LyCORIS rebuild). With a Tucker
    ``lora_mid`` M (r, r, kh, kw), down is (r, in, 1, 1) and ΔW = (α/r)·Σ B[:,i]·M[i,j]·A[j,:].
    The scale multiplies the finished product, as PEFT's ``get_delta_weight`` does (LyCORIS scales
    B first; the two orders agree exactly when α/r is a power of two, else within rounding).
    """
    _check_float32(down=down, up=up, mid=mid)
    out, inp = up.shape[0], down.shape[1]
    r = down.shape[0]
    up2 = up.reshape(out, -1)
    if mid is None:
        if up2.shape[1] != r:
            raise ValueError(f"LoRA rank mismatch: down {tuple(down.shape)}, up {tuple(up.shape)}")
        kernel = tuple(down.shape[2:])
        product = up2 @ down.reshape(r, -1)
    else:
        kernel = tuple(mid.shape[2:])
        product = tucker_rebuild(mid, up2.transpose(0, 1), down.reshape(r, -1))
    return (product * (alpha / rank)).reshape(out, inp, *kernel)


def loha_delta(
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
    *,
    alpha: float,
    rank: int,
    shape: Sequence[int],
) -> torch.Tensor:
    """LoHa factors -> ΔW = γ·(W1a·W1b) ⊙ (W2a·W2b), γ = α/r, reshaped to ``shape``.

    Plain layout: hada_w*_a (out, r), hada_w*_b (r, in·kh·kw). The Hadamard product of two rank-r
    matrices has rank up to r², which is why LoHa cannot be stored as a rank-r LoRA. Tucker layout
    (``hada_t1``/``hada_t2`` (r, r, kh, kw)): hada_w*_a is (r, out), hada_w*_b (r, in) and each half
    is ``einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a)`` (LyCORIS and PEFT alike).
    """
    import torch

    _check_float32(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, t1=t1, t2=t2)
    if (t1 is None) != (t2 is None):
        raise ValueError("LoHa Tucker needs both hada_t1 and hada_t2")
    if t1 is None or t2 is None:
        half1 = w1a @ w1b.reshape(w1b.shape[0], -1)
        half2 = w2a @ w2b.reshape(w2b.shape[0], -1)
    else:
        half1 = torch.einsum("i j ..., j r, i p -> p r ...", t1, w1b, w1a)
        half2 = torch.einsum("i j ..., j r, i p -> p r ...", t2, w2b, w2a)
    delta = half1 * half2 * (alpha / rank)
    return _reshape(delta, shape, "LoHa")


def lokr_scale(alpha: float, rank: int | None, *, decomposed: bool, convention: LokrConvention) -> float:
    """(α, r, whether any factor is a low-rank pair) -> the scale s of ΔW = s·kron(W1, W2).

    ``lycoris`` (what kohya/LyCORIS/ai-toolkit files mean; also ComfyUI, sd-mecha, diffusers):
    s = α/r only when W1 or W2 is stored decomposed, else 1 — full-matrix files carry a
    placeholder alpha (ai-toolkit writes ~1e10). ``peft`` (PEFT's ``LoKrLayer``): s = α/r always,
    with r the config rank (not visible in the tensors of a full-matrix file).
    """
    if convention == "lycoris" and not decomposed:
        return 1.0
    if convention not in ("lycoris", "peft"):
        raise ValueError(f"unknown LoKr scale convention {convention!r} (use 'lycoris' or 'peft')")
    if rank is None or rank <= 0:
        raise ValueError(f"LoKr scale α/r needs a positive rank, got {rank!r}")
    return alpha / rank


def lokr_delta(
    w1: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    w2: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    alpha: float,
    rank: int | None,
    shape: Sequence[int],
    convention: LokrConvention = "lycoris",
) -> torch.Tensor:
    """LoKr factors -> ΔW = s·kron(W1, W2) reshaped to ``shape`` (s from :func:`lokr_scale`).

    w1 is ``lokr_w1`` (a, c) or the pair (``lokr_w1_a`` (a, r), ``lokr_w1_b`` (r, c)). w2 is
    ``lokr_w2`` (b, d) or (b, d, kh, kw); the pair (``lokr_w2_a`` (b, r), ``lokr_w2_b`` (r, d…));
    or the Tucker triple (``lokr_t2`` (r, r, kh, kw), ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d)).
    For a 4-D W2, W1 gets trailing unit dims first (LyCORIS ``make_kron``): ``torch.kron`` pads
    *leading* dims, which would mix kernel positions into channels. Each factor is rebuilt from
    its stored shape, so old files with the larger factor first come out as trained. The Tucker
    rank is ``lokr_t2.shape[0]`` (LyCORIS's training-time r).
    """
    import torch

    decomposed = False
    if isinstance(w1, tuple):
        _check_float32(lokr_w1_a=w1[0], lokr_w1_b=w1[1])
        factor1, decomposed = w1[0] @ w1[1], True
    else:
        _check_float32(lokr_w1=w1)
        factor1 = w1
    if isinstance(w2, tuple) and len(w2) == 3:
        _check_float32(lokr_t2=w2[0], lokr_w2_a=w2[1], lokr_w2_b=w2[2])
        factor2, decomposed = tucker_rebuild(w2[0], w2[1], w2[2]), True
    elif isinstance(w2, tuple):
        w2a, w2b = w2[0], w2[1]
        _check_float32(lokr_w2_a=w2a, lokr_w2_b=w2b)
        flat = w2a @ w2b.reshape(w2b.shape[0], -1)
        factor2, decomposed = flat.reshape(w2a.shape[0], *w2b.shape[1:]), True
    else:
        _check_float32(lokr_w2=w2)
        factor2 = w2
    if factor1.dim() != 2 or factor2.dim() < 2:
        raise ValueError(
            f"LoKr W1 must be 2-D and W2 at least 2-D, got {tuple(factor1.shape)}, {tuple(factor2.shape)}"
        )
    for _ in range(factor2.dim() - factor1.dim()):
        factor1 = factor1.unsqueeze(-1)
    delta = torch.kron(factor1, factor2.contiguous())
    scale = lokr_scale(alpha, rank, decomposed=decomposed, convention=convention)
    if scale != 1:
        delta = delta * scale
    return _reshape(delta, shape, "LoKr")


def _reshape(delta: torch.Tensor, shape: Sequence[int], what: str) -> torch.Tensor:
    """A rebuilt ΔW -> the weight's shape; the output rows and the element count must agree."""
    target = tuple(int(d) for d in shape)
    if not target or delta.shape[0] != target[0] or delta.numel() != math.prod(target):
        raise ValueError(
            f"{what} ΔW of shape {tuple(delta.shape)} cannot be reshaped to the weight shape {target}"
        )
    return delta.reshape(target)


def dora_weight(
    base: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    axis: DoraAxis,
    *,
    strength: float = 1.0,
    eps: float = 0.0,
) -> torch.Tensor:
    """(W, ΔW, m, axis) -> W + s·(W' − W), W' = m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps).

    The norm runs per output row (axis ``row``: over in and kernel dims) or per input column
    (``column``: over out and kernel dims); m is reshaped to broadcast along that axis. ``eps``
    is 0 for PEFT files and :data:`LYCORIS_DORA_EPS` for LyCORIS/OneTrainer files.

    Strength s (the recipe weight) follows ComfyUI: it interpolates the finished update
    W' − W, so s = 0 is exactly the base and the result is linear in s, like a plain LoRA's.
    The two other conventions differ for s ≠ 1 (all three agree at s = 1): PEFT's adapter
    weight scales ΔW *inside* the norm, m ⊙ (W + sΔW)/‖W + sΔW‖ (pass ``delta * s`` with s = 1 to
    get it); LyCORIS 4.1.3's ``merge_to(multiplier)`` returns (W + ΔW)·(s·(m/‖W + ΔW‖ − 1) + 1),
    which at s = 0 is W + ΔW rather than W.
    """
    _check_float32(base=base, delta=delta, magnitude=magnitude)
    if base.shape != delta.shape or base.dim() < 2:
        raise ValueError(
            f"DoRA: weight {tuple(base.shape)} and ΔW {tuple(delta.shape)} must match (≥ 2 dims)"
        )
    merged = base + delta
    ones = [1] * (merged.dim() - 1)
    if axis == "row":
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *ones)
    elif axis == "column":
        by_column = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = by_column.reshape(merged.shape[1], *ones).transpose(0, 1)
    else:
        raise ValueError(f"unknown DoRA axis {axis!r} (use 'row' or 'column')")
    if eps:
        norm = norm + eps
    if magnitude.numel() != norm.numel():
        raise ValueError(
            f"DoRA magnitude {tuple(magnitude.shape)} does not fit the {axis} norm {tuple(norm.shape)}"
        )
    updated = merged * (magnitude.reshape(norm.shape) / norm)
    if strength == 1:
        return updated
    return base + strength * (updated - base)
