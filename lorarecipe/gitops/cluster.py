"""A batch on a Ray cluster: one actor per GPU (or per N CPUs), each keeping a base pipeline warm.

Jobs planned on the driver (``batch``: recipes loaded and compiled, torch-free) -> outcomes, in the
batch's order. The driver skips jobs whose outputs are all up to date (Ray is not even started when
nothing is left), then hands the rest to ``BuildWorker`` actors: each runs ``run_job`` — the same
function a local batch runs — on its own ``WarmPipelines``, so its files are byte-identical to a
local build's. Scheduling keeps affinity: a free actor takes the next build of the base it holds,
else a build of a base no busy actor holds, else any. Two builds into one output folder never run at
once.

Big grids (more than ``grid_shard_cells`` cells, with two actors or more) are split into grid shards
(``shards``): tasks of at most that many cells, scheduled before their build with the same affinity,
each rendering its cells on an actor's warm pipeline into the shared cell cache; the build waits for
its shards, then writes the grid from the cache (rendering what a failed shard left). Its manifest
records the shards under ``worker.grid_shards``.

Failures: a recipe or build error is that build's outcome (no retry: it would fail again); a worker
that dies (killed, out of memory, node lost) is replaced by a fresh actor and its build (or shard)
is retried, at most ``retries`` times; an exception from a bug in lorarecipe is that build's failure, reported
with the worker's traceback (exit 3, as locally). None of them stops the other builds.

Why a batch scheduler here and not a Ray ``Executor`` in ``runner/``: an executor builds some
outputs of one plan inside ``run_plan``, which holds the output root's lock and the manifest journal
in its process and hands executors a live ``BuildState`` (callbacks, reporter). The unit worth
distributing is a whole build (plan -> output root), which is exactly ``run_plan``; running it inside
the actor keeps the lock, the journal and the atomic writes where the files are written, and every
executor (streaming, pipeline, later ones) works on Ray unchanged.

What the cluster needs: every node has the same lorarecipe and libraries, the recipes' inputs at the
same paths (or hub access / the same HF cache) and the output root at the same path on a shared POSIX
filesystem (atomic rename within a folder, ``flock`` for the output root's lock: NFSv4, CephFS, Lustre
or a local disk of a one-node cluster; not an object-store mount).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import LorarecipeError, Problem, UsageError
from ..runner.progress import make_reporter
from .jobs import BuildJob, BuildOutcome, JobSettings, run_job, stale_of
from .shards import GridShard, ShardOutcome, plan_shards, shard_notes

if TYPE_CHECKING:
    from .batch import BatchOptions

__all__ = ["BuildWorker", "connect", "run_on_ray"]


class BuildWorker:
    """A Ray actor: builds jobs on one warm pipeline (one per GPU, or per ``worker_cpus`` CPUs)."""

    def __init__(self, settings: JobSettings, compile: str, cpus: float) -> None:
        import dataclasses

        from ..runner.pipeline.warm import WarmPipelines

        # an actor's torch threads are the CPUs it reserved (not the node's cores minus one: several
        # actors share a node), unless --threads says otherwise
        threads = settings.threads or max(1, int(cpus))
        self.settings = dataclasses.replace(settings, threads=threads)
        self.pipelines = WarmPipelines(keep=True, compile=compile)

    def build(self, job: BuildJob) -> tuple[BuildOutcome | None, str | None]:
        """(outcome, None), or (None, message) for a usage error that concerns the whole command."""
        try:
            return run_job(job, self.settings, self.pipelines), None
        except UsageError as exc:
            return None, exc.message

    def render(self, shard: GridShard) -> ShardOutcome:
        """Render a grid shard's missing cells into the cell cache on the warm pipeline."""
        from . import shards

        return shards.run_shard(shard, self.settings, self.pipelines)


def _probe(address: str) -> None:
    """A clear error, at once, when nothing listens at ``host:port`` (Ray itself would wait minutes)."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" or a form Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as exc:
        raise UsageError(
            f"--ray {address}: no Ray cluster answers at {target} ({exc.strerror or exc}); start one with "
            "`ray start --head` there, or give its address (`host:6379`, `ray://host:10001`, `auto`)"
        ) from None


def connect(address: str) -> Any:
    """``ray``, connected: to ``address`` (``""``: RAY_ADDRESS, else the cluster ``ray start`` started
    on this machine, else a new local cluster; ``auto``: RAY_ADDRESS or the cluster on this machine,
    an error if none). Reuses an existing connection (a notebook, tests)."""
    import logging

    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'lorarecipe[ray]'") from None
    if ray.is_initialized():
        return ray
    if address:
        _probe(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {address}" if address else "(RAY_ADDRESS, the one on this machine, or a new one)"
        raise UsageError(f"--ray: cannot connect to a Ray cluster {where}: {exc}") from None
    return ray


def _actor_options(ray: Any, options: BatchOptions) -> tuple[int, dict[str, Any]]:
    """(number of actors, their resources): one per GPU unless ``--device cpu``, else one per
    ``worker_cpus`` CPUs; ``workers`` overrides the number."""
    resources = ray.cluster_resources()
    gpus = 0 if options.device in ("cpu", "mps") else int(resources.get("GPU", 0))
    per_cpu = max(1, int(resources.get("CPU", 1) // options.worker_cpus))
    count = options.workers or (gpus or per_cpu)
    return count, {"num_cpus": options.worker_cpus, "num_gpus": 1 if gpus else 0, "max_restarts": 0}


def _retryable(ray: Any, exc: BaseException) -> bool:
    """The worker died (killed, out of memory, node lost): the build itself may well succeed."""
    errors = ray.exceptions
    kinds = (errors.RayActorError, errors.WorkerCrashedError, errors.NodeDiedError, errors.ObjectLostError)
    return isinstance(exc, (*kinds, errors.OutOfMemoryError))


class _Slot:
    """One actor and what it last built (its warm base)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.group: tuple[Any, ...] | None = None
        self.busy = False


Task = BuildJob | GridShard


def _pick(
    pending: deque[Task],
    slot: _Slot,
    slots: Sequence[_Slot],
    roots: set[str],
    waiting: Mapping[int, int] | None = None,
) -> Task | None:
    """The next job (or grid shard) for a free slot: its warm base first, then a base no busy slot
    holds, then any; never a build whose output folder another build is writing, nor one whose grid
    shards (``waiting``: job index -> shards not done) are still running."""
    waiting = waiting or {}
    ready = [
        job
        for job in pending
        if str(job.out) not in roots and not (isinstance(job, BuildJob) and waiting.get(job.index))
    ]
    held = {s.group for s in slots if s.busy}
    for wanted in (
        lambda j: j.group == slot.group,
        lambda j: j.group not in held,
        lambda j: True,
    ):
        job = next((j for j in ready if wanted(j)), None)
        if job is not None:
            pending.remove(job)
            return job
    return None


def run_on_ray(jobs: Sequence[BuildJob], options: BatchOptions) -> dict[int, BuildOutcome]:
    """Run ``jobs`` (and the shards of their big grids) on a Ray cluster; returns job index -> outcome."""
    settings = options.settings
    done: dict[int, BuildOutcome] = {}
    todo: list[tuple[BuildJob, set[str]]] = []
    for job in jobs:  # up to date on the shared output root: no worker needed
        try:
            stale, _ = stale_of(job, settings)
        except (LorarecipeError, OSError):
            stale = {"?"}  # the worker reports it, as a local build would
        if stale:
            todo.append((job, stale))
        else:
            done[job.index] = run_job(job, settings)
    if not todo:
        return done
    ray = connect(options.ray or "")
    count, resources = _actor_options(ray, options)
    limit = options.grid_shard_cells if count > 1 else 0  # one actor: shards would only add work
    shards = {job.index: plan_shards(job, stale, limit) for job, stale in todo}
    count = min(count, len(todo) + sum(len(s) for s in shards.values()))
    reporter = options.reporter or make_reporter(quiet=True)
    reporter.begin(f"build {len(todo)} builds on Ray: {count} workers", len(todo))
    worker = ray.remote(BuildWorker).options(**resources)

    def start() -> _Slot:
        return _Slot(worker.remote(settings, options.compile, options.worker_cpus))

    slots = [start() for _ in range(count)]
    pending = _queue([job for job, _ in todo], shards)
    waiting = {index: len(planned) for index, planned in shards.items() if planned}
    rendered: dict[int, list[ShardOutcome]] = {index: [] for index in waiting}
    attempts: dict[Any, int] = {}
    running: dict[Any, tuple[_Slot, Task, float]] = {}
    roots: set[str] = set()
    try:
        while pending or running:
            for slot in slots:
                if not slot.busy and pending:
                    picked = _pick(pending, slot, slots, roots, waiting)
                    if picked is not None:
                        slot.busy, slot.group = True, picked.group
                        running[_send(slot, picked, shards, rendered, roots)] = (
                            slot,
                            picked,
                            time.perf_counter(),
                        )
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            slot, task, started = running.pop(ref)
            slot.busy = False
            result: BuildOutcome | ShardOutcome | None
            if isinstance(task, GridShard):
                result = _collect_shard(ray, ref, task, attempts, options.retries)
            else:
                roots.discard(str(task.out))
                result = _collect(ray, ref, task, started, attempts, options.retries)
            if result is None:  # the worker died: a fresh actor, the task queued again
                tries = attempts[_attempt_key(task)]
                reporter.log(f"{_name(task)}: worker died, retrying ({tries}/{options.retries})")
                with contextlib.suppress(Exception):  # it may be gone already
                    ray.kill(slot.actor, no_restart=True)
                slots[slots.index(slot)] = start()
                pending.appendleft(task)
                continue
            if isinstance(result, ShardOutcome):
                assert isinstance(task, GridShard)
                rendered[task.job.index].append(result)
                waiting[task.job.index] -= 1
                where = result.worker or "?"
                state = f"{result.rendered} cells" if result.ok else f"FAILED ({result.problem})"
                reporter.log(f"{_name(task)}: {state} on {where}")
                continue
            assert isinstance(task, BuildJob)
            done[task.index] = result
            where = (result.worker or {}).get("hostname", "?")
            status = "ok" if result.ok else "FAILED"
            reporter.step(f"{_name(task)}: {status} on {where} ({result.seconds:.1f} s)")
    finally:
        for slot in slots:
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
        reporter.end()
    return done


def _queue(jobs: Sequence[BuildJob], shards: Mapping[int, list[GridShard]]) -> deque[Task]:
    """Jobs grouped by base, each preceded by its grid shards."""
    from .batch import by_base

    queue: deque[Task] = deque()
    for job in by_base(jobs):
        queue.extend(shards.get(job.index, ()))
        queue.append(job)
    return queue


def _send(
    slot: _Slot,
    task: Task,
    shards: Mapping[int, list[GridShard]],
    rendered: Mapping[int, list[ShardOutcome]],
    roots: set[str],
) -> Any:
    """Start ``task`` on the slot's actor; a build goes with what its shards did, for its manifest."""
    if isinstance(task, GridShard):
        return slot.actor.render.remote(task)
    roots.add(str(task.out))
    if shards.get(task.index):
        notes = shard_notes(shards[task.index], rendered[task.index])
        task = dataclasses.replace(task, worker_notes=notes)
    return slot.actor.build.remote(task)


def _attempt_key(task: Task) -> Any:
    if isinstance(task, GridShard):
        return ("shard", task.job.index, task.number)
    return task.index


def _name(task: Task) -> str:
    if isinstance(task, GridShard):
        return f"{_name(task.job)} {task.output} shard {task.number + 1}"
    return task.recipe + (f" [{task.label}]" if task.label else "")


def _collect(
    ray: Any, ref: Any, job: BuildJob, started: float, attempts: dict[int, int], retries: int
) -> BuildOutcome | None:
    """A finished call's outcome; None when the worker died and the build has retries left."""
    failed = BuildOutcome(job.recipe, job.label, str(job.out), False, fingerprint=job.plan.fingerprint())
    try:
        outcome, usage = ray.get(ref)
    except Exception as exc:
        failed.seconds = time.perf_counter() - started
        if _retryable(ray, exc):
            attempts[job.index] = attempts.get(job.index, 0) + 1
            if attempts[job.index] <= retries:
                return None
            failed.problems = [
                Problem(f"the Ray worker building it died {attempts[job.index]} times: {type(exc).__name__}")
            ]
            return failed
        message = f"internal error on a Ray worker: {type(exc).__name__}"
        hint = "this is a bug in lorarecipe, please report it (with the recipe and the output of --version)"
        failed.problems = [Problem(message, hint=hint)]
        failed.internal, failed.traceback = True, str(exc).rstrip() + "\n"
        return failed
    if usage is not None:
        raise UsageError(usage)
    assert isinstance(outcome, BuildOutcome)
    return outcome


def _collect_shard(
    ray: Any, ref: Any, shard: GridShard, attempts: dict[Any, int], retries: int
) -> ShardOutcome | None:
    """A finished shard's outcome; None when its worker died and it has retries left (a failed shard
    only means the build renders its cells)."""
    try:
        outcome = ray.get(ref)
    except Exception as exc:
        if _retryable(ray, exc):
            key = _attempt_key(shard)
            attempts[key] = attempts.get(key, 0) + 1
            if attempts[key] <= retries:
                return None
            problem = f"its Ray worker died {attempts[key]} times: {type(exc).__name__}"
        else:
            problem = f"{type(exc).__name__} on its Ray worker"
        return ShardOutcome(shard.output, shard.number, False, problem=problem)
    assert isinstance(outcome, ShardOutcome)
    return outcome
