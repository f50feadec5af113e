"""One module's combined ΔW -> a plain rank-r LoRA by truncated SVD (what kohya's ``svd_merge_lora.py``
and SuperMerger do), with the relative error it leaves.

float32 ΔW shaped like the weight (out, in[, kh, kw]) + the largest rank, an optional energy threshold
and an optional clamp quantile -> ``lora_A`` (r, in[, kh, kw]) and ``lora_B`` (out, r[, 1, 1]) with
B·A ≈ ΔW at scale 1 (alpha = r). ΔW flattened to (out, in·kh·kw) = U·diag(S)·Vh; B = U_r·diag(S_r),
A = Vh_r, as kohya and PEFT's SVD merges split it. By Eckart–Young this is the best rank-r
approximation in the Frobenius norm: its error ‖ΔW − BA‖/‖ΔW‖ is sqrt(Σ_{i>r} σᵢ²)/sqrt(Σ σᵢ²), the
tail energy (tested). ``energy`` e picks per module the fewest singular values holding at least e of
Σσᵢ² (at most ``rank``); ``clamp`` q clamps both factors to ±(the q quantile of their entries), as kohya
and PEFT do, which trades a little error for smaller outliers (the reported error is measured after
it). The SVD's result depends on torch's thread count: callers run it at one thread, so an
extraction is the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ExtractedLora", "extract_lora"]


@dataclass(frozen=True)
class ExtractedLora:
    """A module's extracted factors (float32, scale 1), its rank and the relative Frobenius error."""

    down: Any
    up: Any
    rank: int
    relative_error: float


def extract_lora(
    delta: Any, rank: int, energy: float | None = None, clamp: float | None = None
) -> ExtractedLora | None:
    """A float32 ΔW -> its truncated-SVD LoRA (see the module docstring); None when ΔW is zero."""
    import torch

    if delta.dtype != torch.float32 or delta.dim() not in (2, 4):
        raise ValueError(
            f"extract_lora takes a 2-D or 4-D float32 ΔW, got {delta.dtype} {tuple(delta.shape)}"
        )
    out, kernel = delta.shape[0], tuple(delta.shape[2:])
    flat = delta.reshape(out, -1)
    total = flat.norm()
    if float(total) == 0.0:
        return None
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    keep = min(rank, s.numel())
    if energy is not None:
        share = torch.cumsum(s.double() ** 2, 0) / float((s.double() ** 2).sum())
        needed = int(torch.searchsorted(share, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1
        keep = max(1, min(keep, needed))
    up = u[:, :keep] * s[:keep]
    down = vh[:keep].contiguous()
    if clamp is not None:
        entries = torch.cat([up.flatten(), down.flatten()])
        limit = torch.quantile(entries, clamp)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    error = float((flat - up @ down).norm() / total)
    if kernel:
        down = down.reshape(keep, delta.shape[1], *kernel)
        up = up.reshape(out, keep, 1, 1)
    return ExtractedLora(down.contiguous(), up.contiguous(), keep, error)
