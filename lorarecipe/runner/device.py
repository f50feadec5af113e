"""Pick the torch device: CUDA, then MPS, then CPU (``--device auto``), or the one asked for."""

from __future__ import annotations

from ..errors import UsageError

__all__ = ["pick_device"]


def pick_device(requested: str = "auto") -> str:
    """'auto' | 'cuda' | 'mps' | 'cpu' -> an available device name; asking for a missing one is an error."""
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if requested == "auto":
        return "cuda" if cuda else ("mps" if mps else "cpu")
    if requested == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA device is available (install a CUDA build of torch)")
    if requested == "mps" and not mps:
        raise UsageError("--device mps: MPS is not available on this machine")
    return requested
