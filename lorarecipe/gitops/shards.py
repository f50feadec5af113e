"""Grid shards: a big grid of one build split into tasks that Ray actors render side by side.

A ``BuildJob`` and the outputs it will build -> ``GridShard``s (planned on the driver from the plan
alone: no torch, no cache lookup), each at most ``limit`` cells of one grid, as whole (column,
batch) units of the grid's own batching (``GridLayout``), so a shard's cells carry exactly the cell
cache keys the whole build computes. ``run_shard`` on a worker renders a shard's missing cells on its
warm pipeline, with the build's adapters, merges and fuse, into the cell cache
(``$LORARECIPE_CACHE/grid-cells``, which must be the same storage for every worker and the build);
then the build itself runs and writes the grid from the cache, rendering whatever a failed shard
left. A lost shard costs time, never correctness: shards write no output and take no lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..plan import RenderGrid
from ..runner.pipeline.grid_layout import GridLayout
from .jobs import BuildJob, JobSettings

if TYPE_CHECKING:
    from ..runner.pipeline.warm import WarmPipelines

__all__ = ["GridShard", "ShardOutcome", "plan_shards", "run_shard", "shard_notes"]


@dataclass(frozen=True)
class GridShard:
    """Some (column, batch) units of one grid of one build."""

    job: BuildJob
    output: str  # the grid output
    number: int  # the shard's place among its build's shards
    units: tuple[tuple[int, int], ...]
    cells: int

    @property
    def group(self) -> tuple[Any, ...]:
        return self.job.group  # the base it renders on: affinity as for builds

    @property
    def out(self) -> Path:
        return self.job.out


@dataclass
class ShardOutcome:
    output: str
    number: int
    ok: bool
    rendered: int = 0  # cells rendered (the others of the shard were in the cell cache)
    worker: str | None = None  # host/pid/actor that rendered them
    problem: str = ""


def plan_shards(job: BuildJob, stale: set[str], limit: int) -> list[GridShard]:
    """The shards of the job's grids that will be built and have more than ``limit`` cells (0: none):
    column by column (a shard sets up few variants), at most ``limit`` cells each, at least one unit."""
    shards: list[GridShard] = []
    if limit <= 0:
        return shards
    for step in job.plan.of_type(RenderGrid):
        if step.output not in stale:
            continue
        layout = GridLayout(job.plan, step)
        units = sorted(layout.units())  # column-major
        if sum(layout.cells(u) for u in units) <= limit:
            continue
        taken: list[tuple[int, int]] = []
        for unit in units:
            if taken and sum(layout.cells(u) for u in taken) + layout.cells(unit) > limit:
                shards.append(_shard(job, step.output, len(shards), taken, layout))
                taken = []
            taken.append(unit)
        shards.append(_shard(job, step.output, len(shards), taken, layout))
    return shards


def _shard(
    job: BuildJob, output: str, number: int, units: list[tuple[int, int]], layout: GridLayout
) -> GridShard:
    return GridShard(job, output, number, tuple(units), sum(layout.cells(u) for u in units))


def run_shard(
    shard: GridShard, settings: JobSettings, pipelines: WarmPipelines | None = None
) -> ShardOutcome:
    """Render the shard's missing cells into the cell cache. Any failure is the shard's outcome (the
    build renders those cells itself, and reports a real error where it belongs); after one the warm
    pipeline is dropped, as after a failed build."""
    from ..runner.worker import worker_identity, worker_label

    label = worker_label(worker_identity())
    job = shard.job
    try:
        from ..runner import render_grid_cells, require_build_extra

        require_build_extra()
        resolved = None
        if job.lock is not None:  # the inputs the build will use: the lock's
            from .lock import resolve_frozen

            resolved = resolve_frozen(job.plan, job.lock, job.recipe_root, settings.allow_read)
        rendered = render_grid_cells(
            job.plan,
            shard.output,
            set(shard.units),
            recipe_root=job.recipe_root,
            device=settings.device,
            allow_read=settings.allow_read,
            resolved=resolved,
            pipelines=pipelines,
            threads=settings.threads,
        )
    except Exception as exc:
        if pipelines is not None:
            pipelines.discard()
        return ShardOutcome(shard.output, shard.number, False, worker=label, problem=_describe(exc))
    return ShardOutcome(shard.output, shard.number, True, rendered, label)


def _describe(exc: BaseException) -> str:
    from ..errors import LorarecipeError

    return exc.message if isinstance(exc, LorarecipeError) else f"{type(exc).__name__}: {exc}"


def shard_notes(shards: Sequence[GridShard], outcomes: Sequence[ShardOutcome]) -> dict[str, Any]:
    """What a build's manifest records of its grid shards (under ``worker``, like every other fact
    about where the work ran): per grid, the shards, their cells, the cells each worker rendered and
    the shards that failed (their cells were rendered by the build)."""
    grids: dict[str, dict[str, Any]] = {}
    for shard in shards:
        entry = grids.setdefault(shard.output, {"shards": 0, "cells": 0, "rendered": {}, "failed": []})
        entry["shards"] += 1
        entry["cells"] += shard.cells
    for outcome in sorted(outcomes, key=lambda o: (o.output, o.number)):
        entry = grids[outcome.output]
        if outcome.ok and outcome.worker is not None:
            entry["rendered"][outcome.worker] = entry["rendered"].get(outcome.worker, 0) + outcome.rendered
        elif not outcome.ok:
            entry["failed"].append({"shard": outcome.number, "problem": outcome.problem})
    return {"grid_shards": grids} if grids else {}
