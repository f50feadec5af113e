"""Many builds: recipe files (or folders of them) -> one build per recipe × matrix combination.

Each build compiles, then runs in its own output folder (``<out>/<recipe>`` and, with a matrix,
``<out>/<recipe>/<combination>``), skipping the outputs that are up to date (``incremental``) and,
with ``frozen``, rehashing every input against the recipe's lock first (``lock``). A failing build
does not stop the others: each ends in a ``BuildOutcome`` (ok, or its problems). Library code: it
returns outcomes; the CLI prints them.

Every recipe is loaded and compiled first (cheap: headers only, no torch), into ``BuildJob``s
(``jobs``). The jobs then run grouped by the base model they load, in this process on one warm
pipeline per base (``WarmPipelines``: each build starts from the pristine base weights), or with
``ray`` on a Ray cluster's actors (``cluster``). Outcomes come back in recipe order either way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InternalError, LockError, LorarecipeError, Problem, UsageError
from ..recipe.load import LoadedRecipe, load_recipe
from ..runner.progress import Reporter
from .jobs import BuildJob, BuildOutcome, JobSettings, run_job

__all__ = ["BatchOptions", "BuildOutcome", "build_recipes", "out_root_for", "plan_jobs"]


@dataclass(frozen=True)
class BatchOptions:
    """What ``lorarecipe build`` was asked: output root, device, executor mode, lock and rebuild policy."""

    out: Path | None = None  # None: build/<recipe name>
    device: str = "auto"
    executor: str = "auto"
    frozen: bool = False
    force: bool = False
    overrides: Mapping[str, str] = field(default_factory=dict)
    allow_read: tuple[Path, ...] = ()
    reporter: Reporter | None = None
    threads: int | None = None  # torch intra-op threads (None: the runner's policy; Ray: worker_cpus)
    compile: str = "none"  # grids whose recipe does not say: "none" or "regional"
    ray: str | None = None  # None: build here; "": Ray's default (RAY_ADDRESS, this node's, or a new one)
    workers: int | None = None  # Ray actors (default: one per GPU, else one per worker_cpus CPUs)
    worker_cpus: float = 1.0  # CPUs each Ray actor reserves (its torch threads)
    retries: int = 2  # times a build is retried after its Ray worker died
    grid_shard_cells: int = 8  # Ray: bigger grids are split into shards of at most this many cells (0: no)

    @property
    def settings(self) -> JobSettings:
        return JobSettings(self.device, self.executor, self.allow_read, self.force, self.threads)


def out_root_for(options: BatchOptions, name: str, several: bool) -> Path:
    """Where a recipe's builds go: ``--out`` itself for one recipe, ``--out/<name>`` for several, else
    ``build/<name>``."""
    if options.out is None:
        return Path("build") / name
    return options.out / name if several else options.out


def _checked_lock(path: Path, loaded: LoadedRecipe, options: BatchOptions) -> Any:
    """``frozen``: the recipe's lock, refused when missing or stale (LockError naming why)."""
    from ..compiler import compile_recipe
    from .lock import check_lock_current, lock_path, read_lock

    lock = read_lock(path)
    plans = [compile_recipe(loaded, b, allow_read=options.allow_read) for b in loaded.builds]
    reasons = check_lock_current(path, lock, plans)
    if reasons:
        hint = f"run `lorarecipe lock {path}`"
        problems = [Problem(f"{lock_path(path)} is stale: {r}", hint=hint) for r in reasons]
        raise LockError(problems[0].message, problems)
    return lock


def _plan_file(path: Path, options: BatchOptions, several: bool, first: int) -> list[BuildJob | BuildOutcome]:
    """Load (and with ``frozen`` check the lock of) one recipe file and compile each of its builds:
    a job per build, or the outcome of a build that failed to compile."""
    from ..compiler import compile_recipe
    from .lock import lock_path

    try:
        loaded = load_recipe(path, dict(options.overrides))
        lock = _checked_lock(path, loaded, options) if options.frozen else None
    except UsageError:
        raise
    except LorarecipeError as exc:
        return [BuildOutcome(str(path), "", "", False, problems=exc.problems)]
    root = Path(os.path.abspath(out_root_for(options, loaded.name, several)))
    planned: list[BuildJob | BuildOutcome] = []
    for build in loaded.builds:
        out = root / build.label if build.label else root
        started = time.perf_counter()
        try:
            plan = compile_recipe(loaded, build, allow_read=options.allow_read)
        except UsageError:
            raise
        except LorarecipeError as exc:
            failed = BuildOutcome(loaded.display, build.label, str(out), False, problems=exc.problems)
            if isinstance(exc, InternalError):
                failed.internal, failed.traceback = True, exc.traceback
            failed.seconds = time.perf_counter() - started
            planned.append(failed)
            continue
        protected = (loaded.path, lock_path(loaded.path))
        seconds = time.perf_counter() - started
        index = first + len(planned)
        job = BuildJob(
            index, loaded.display, build.label, out, plan, loaded.root, loaded.text, protected, lock, seconds
        )
        planned.append(job)
    return planned


def plan_jobs(files: Sequence[Path], options: BatchOptions, several: bool) -> list[BuildJob | BuildOutcome]:
    """Every build of every recipe file, in order: a job, or the outcome of a build that failed before
    it could run (a recipe that does not load or compile, a stale lock)."""
    planned: list[BuildJob | BuildOutcome] = []
    for path in files:
        planned.extend(_plan_file(path, options, several, len(planned)))
    return planned


def by_base(jobs: Sequence[BuildJob]) -> list[BuildJob]:
    """Jobs grouped by the base they load (groups in order of first appearance, jobs in order within)."""
    order: dict[tuple[Any, ...], int] = {}
    for job in jobs:
        order.setdefault(job.group, len(order))
    return sorted(jobs, key=lambda j: (order[j.group], j.index))


def build_recipes(files: Sequence[Path], options: BatchOptions, several: bool) -> list[BuildOutcome]:
    """Build every recipe file; ``several`` puts each recipe in ``<out>/<recipe name>``."""
    planned = plan_jobs(files, options, several)
    jobs = [p for p in planned if isinstance(p, BuildJob)]
    if options.ray is not None and jobs:
        from .cluster import run_on_ray

        done = run_on_ray(jobs, options)
    else:
        done = _run_here(jobs, options)
    return [done[p.index] if isinstance(p, BuildJob) else p for p in planned]


def _run_here(jobs: Sequence[BuildJob], options: BatchOptions) -> dict[int, BuildOutcome]:
    """Run the jobs in this process, grouped by base, on one warm pipeline per base (kept only when
    some base has several builds: a lone build does not pay for the pristine copy)."""
    from collections import Counter

    from ..runner.pipeline.warm import WarmPipelines

    shared = max(Counter(job.group for job in jobs).values(), default=0) > 1
    pipelines = WarmPipelines(keep=shared, compile=options.compile)
    return {job.index: run_job(job, options.settings, pipelines, options.reporter) for job in by_base(jobs)}
