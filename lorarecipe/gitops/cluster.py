"""A batch on a Ray cluster: one actor per GPU (or per N CPUs), each keeping a base pipeline warm.

Jobs planned on the driver (``batch``: recipes loaded and compiled, torch-free) -> outcomes, in the
batch's order. The driver skips jobs whose outputs are all up to date (Ray is not even started when
nothing is left), then hands the rest to ``BuildWorker`` actors: each runs ``run_job`` — the same
function a local batch runs — on its own ``WarmPipelines``, so its files are byte-identical to a
local build's. Scheduling keeps affinity: a free actor takes the next build of the base it holds,
else a build of a base no busy actor holds, else any. Two builds into one output folder never run at
once.

Failures: a recipe or build error is that build's outcome (no retry: it would fail again); a worker
that dies (killed, out of memory, node lost) is replaced by a fresh actor and its build is retried,
at most ``retries`` times; an exception from a bug in lorarecipe is that build's failure, reported
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
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import LorarecipeError, Problem, UsageError
from ..runner.progress import make_reporter
from .jobs import BuildJob, BuildOutcome, JobSettings, run_job, stale_of

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


def _pick(pending: deque[BuildJob], slot: _Slot, slots: Sequence[_Slot], roots: set[str]) -> BuildJob | None:
    """The next job for a free slot: its warm base first, then a base no busy slot holds, then any;
    never one whose output folder another build is writing."""
    ready = [job for job in pending if str(job.out) not in roots]
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
    """Run ``jobs`` on a Ray cluster; returns job index -> outcome."""
    from .batch import by_base

    settings = options.settings
    done: dict[int, BuildOutcome] = {}
    todo = []
    for job in jobs:  # up to date on the shared output root: no worker needed
        try:
            stale, _ = stale_of(job, settings)
        except (LorarecipeError, OSError):
            stale = {"?"}  # the worker reports it, as a local build would
        if stale:
            todo.append(job)
        else:
            done[job.index] = run_job(job, settings)
    if not todo:
        return done
    ray = connect(options.ray or "")
    count, resources = _actor_options(ray, options)
    count = min(count, len(todo))
    reporter = options.reporter or make_reporter(quiet=True)
    reporter.begin(f"build {len(todo)} builds on Ray: {count} workers", len(todo))
    worker = ray.remote(BuildWorker).options(**resources)

    def start() -> _Slot:
        return _Slot(worker.remote(settings, options.compile, options.worker_cpus))

    slots = [start() for _ in range(count)]
    pending: deque[BuildJob] = deque(by_base(todo))
    attempts: dict[int, int] = {}
    running: dict[Any, tuple[_Slot, BuildJob, float]] = {}
    roots: set[str] = set()
    try:
        while pending or running:
            for slot in slots:
                if not slot.busy and pending:
                    picked = _pick(pending, slot, slots, roots)
                    if picked is not None:
                        slot.busy, slot.group = True, picked.group
                        roots.add(str(picked.out))
                        running[slot.actor.build.remote(picked)] = (slot, picked, time.perf_counter())
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            slot, job, started = running.pop(ref)
            slot.busy = False
            roots.discard(str(job.out))
            outcome = _collect(ray, ref, job, started, attempts, options.retries)
            if outcome is None:  # the worker died: a fresh actor, the build queued again
                reporter.log(f"{_name(job)}: worker died, retrying ({attempts[job.index]}/{options.retries})")
                with contextlib.suppress(Exception):  # it may be gone already
                    ray.kill(slot.actor, no_restart=True)
                slots[slots.index(slot)] = start()
                pending.appendleft(job)
                continue
            done[job.index] = outcome
            where = (outcome.worker or {}).get("hostname", "?")
            result = "ok" if outcome.ok else "FAILED"
            reporter.step(f"{_name(job)}: {result} on {where} ({outcome.seconds:.1f} s)")
    finally:
        for slot in slots:
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
        reporter.end()
    return done


def _name(job: BuildJob) -> str:
    return job.recipe + (f" [{job.label}]" if job.label else "")


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
