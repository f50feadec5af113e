"""Pick the torch device (CUDA, then MPS, then CPU, or the one asked for) and the CPU thread count.

The thread policy: torch's intra-op threads for the fuse arithmetic are the cores this process may
run on (``os.sched_getaffinity``, not the machine's count: containers and CI runners restrict it)
minus one for the helper threads the streaming executor runs beside it (the output hasher, the
copier and the write-behind, mostly in the kernel); ``--threads N`` or ``LORARECIPE_THREADS``
override it. Oversubscribing a small machine (torch's default of all cores, plus the helpers, plus
the kernel's writeback) made a 2-core build 1.4× slower than the diffusers script. Results do not
depend on it (tested).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UsageError

__all__ = ["ThreadPolicy", "pick_device", "thread_policy"]


@dataclass(frozen=True)
class ThreadPolicy:
    """torch intra-op threads for the build, and where the number came from."""

    threads: int
    source: str  # "auto" (available cores minus one) | "--threads" | "LORARECIPE_THREADS"
    available_cores: int

    def to_json(self) -> dict[str, object]:
        return {
            "torch_intra_op": self.threads,
            "source": self.source,
            "available_cores": self.available_cores,
        }


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return max(1, os.cpu_count() or 1)


def thread_policy(requested: int | None = None) -> ThreadPolicy:
    """The thread count to use: ``requested`` (``--threads``), else ``LORARECIPE_THREADS``, else
    the available cores minus one (at least one)."""
    cores = _available_cores()
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--threads {requested}: give a positive number")
        return ThreadPolicy(requested, "--threads", cores)
    env = os.environ.get("LORARECIPE_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise UsageError(f"LORARECIPE_THREADS={env!r}: give a positive number")
        return ThreadPolicy(int(env), "LORARECIPE_THREADS", cores)
    return ThreadPolicy(max(1, cores - 1), "auto", cores)


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
