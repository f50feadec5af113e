"""The executor interface, and the registry of executors each ``--executor`` mode runs, in order.

An executor takes the plan, the outputs asked of it and the build state; it builds what it can,
records each built output in the state, and returns the outputs it left for the next executor.
"Cannot" is an :class:`~lorarecipe.errors.ExecutorRefusal` raised at the real refusal points inside
it; an executor hands on only what it refused (or never handles, such as grids for the streaming
fuser), and every other error fails the build. New executors (a Ray worker, a transformers executor)
implement this protocol and join the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..plan import Plan
from .build_state import BuildState

if TYPE_CHECKING:
    from .pipeline.warm import WarmPipelines

__all__ = ["EXECUTOR_MODES", "Executor", "executors_for"]

#: ``--executor`` modes -> what they mean (the executors themselves: ``executors_for``).
EXECUTOR_MODES: dict[str, str] = {
    "auto": "stream fused checkpoints; the diffusers pipeline builds the rest and what streaming refuses",
    "streaming": "stream fused checkpoints, a refusal is an error; the pipeline builds grids and LoRA files",
    "diffusers": "build everything on a loaded diffusers pipeline",
}


class Executor(Protocol):
    """Builds some outputs of a plan."""

    name: str

    def build(self, plan: Plan, outputs: Sequence[str], state: BuildState) -> list[str]:
        """Build what it can of ``outputs`` (recording each in ``state.outputs``); return the rest."""
        ...


def executors_for(mode: str, pipelines: WarmPipelines | None = None) -> list[Executor]:
    """The executors a mode tries, in order (the last one must take every output kind); the pipeline
    executor takes its pipeline from ``pipelines`` (a worker's warm cache; default: a fresh load)."""
    from .pipeline import PipelineExecutor
    from .streaming import StreamingExecutor

    registry: dict[str, list[Executor]] = {
        "auto": [StreamingExecutor(strict=False), PipelineExecutor(pipelines)],
        "streaming": [StreamingExecutor(strict=True), PipelineExecutor(pipelines)],
        "diffusers": [PipelineExecutor(pipelines)],
    }
    return registry[mode]
