"""One build of a batch as a value that can be run here or sent to another process.

A compiled build (plan, output folder, recipe text, lock) -> a ``BuildJob`` (picklable: plain data,
no open files or callbacks) -> ``run_job`` on any worker with the same lorarecipe and filesystem
paths -> a ``BuildOutcome``. ``run_job`` does what one build always did: rehash the inputs against
the lock (``--frozen``), skip the outputs that are up to date, run the plan under the output root's
lock, record the incremental state. The batch runs jobs in this process (``batch``) or on Ray actors
(``cluster``); both call this function, so a build's files do not depend on where it ran.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import BuildError, InternalError, LorarecipeError, Problem, UsageError
from ..fs.paths import check_output_root
from ..plan import LoadBase, Plan

if TYPE_CHECKING:
    from ..runner.pipeline.warm import WarmPipelines
    from ..runner.progress import Reporter

__all__ = ["BuildJob", "BuildOutcome", "JobSettings", "group_key", "run_job", "stale_of"]

T = TypeVar("T")


@dataclass
class BuildOutcome:
    recipe: str
    build: str
    out: str
    ok: bool
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    fingerprint: str | None = None
    internal: bool = False  # failed on a bug in lorarecipe (InternalError), not on the user's input
    traceback: str = ""  # with ``internal``: where the bug surfaced, for the report
    worker: dict[str, Any] | None = None  # who ran it (host, pid, Ray ids, pipeline loaded/reused)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "build": self.build,
            "out": self.out,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "outputs": self.outputs,
            "up_to_date": self.skipped,
            "fingerprint": self.fingerprint,
            "internal_error": self.internal,
            "problems": [p.to_json() for p in self.problems],
            "worker": self.worker,
        }


@dataclass(frozen=True)
class JobSettings:
    """How every job of a batch is built: the same on every worker."""

    device: str = "auto"
    executor: str = "auto"
    allow_read: tuple[Path, ...] = ()
    force: bool = False
    threads: int | None = None  # torch intra-op threads (None: the runner's policy)


@dataclass(frozen=True)
class BuildJob:
    """One recipe × matrix build, compiled on the driver."""

    index: int  # position in the batch (outcomes are reported in this order)
    recipe: str  # the recipe as displayed
    label: str  # the matrix label ("" without a matrix)
    out: Path  # absolute output root
    plan: Plan
    recipe_root: Path
    recipe_text: str
    protected: tuple[Path, ...]  # the recipe and its lock file
    lock: Any = None  # the recipe's LockFile with --frozen
    plan_seconds: float = 0.0  # compile time on the driver (part of the build's reported time)
    #: recorded in the manifest's ``worker``: where else its work ran (its grid shards, on Ray)
    worker_notes: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def group(self) -> tuple[Any, ...]:
        return group_key(self.plan)


def group_key(plan: Plan) -> tuple[Any, ...]:
    """The base a plan loads, as written (builds with equal keys share one warm pipeline)."""
    base = plan.step("base")
    assert isinstance(base, LoadBase)
    source, config = base.source, base.config
    return (
        source.kind,
        source.ref,
        source.revision,
        source.filename,
        base.family,
        base.dtype,
        base.variant,
        base.single_file,
        (config.kind, config.ref, config.revision) if config else None,
    )


def _in_background(function: Callable[..., T], *args: Any) -> Future[T]:
    """``function(*args)`` in a daemon thread; its result (or exception) through the future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="lorarecipe-build-keys", daemon=True).start()
    return future


def stale_of(job: BuildJob, settings: JobSettings) -> tuple[set[str], Future[dict[str, str | None]]]:
    """(outputs to build, every output's key): all with ``force`` or in a root without a recorded
    state, else those not up to date. When everything is built anyway, the keys (content hashes of
    every input: a full read of a multi-GB base the first time) are computed in the background while
    the build streams the same files; they are only needed to record the state afterwards."""
    from .incremental import has_state, output_keys, stale_outputs

    check_output_root(job.out)  # its state is read here: never through a symlink
    outputs = {s.output for s in job.plan.output_steps()}
    if settings.force or not has_state(job.out):
        return outputs, _in_background(output_keys, job.plan, job.recipe_root, settings.allow_read)
    keys: Future[dict[str, str | None]] = Future()
    keys.set_result(output_keys(job.plan, job.recipe_root, settings.allow_read))
    return stale_outputs(job.out, keys.result()), keys


def run_job(
    job: BuildJob,
    settings: JobSettings,
    pipelines: WarmPipelines | None = None,
    reporter: Reporter | None = None,
) -> BuildOutcome:
    """Build the job's stale outputs; a recipe or build error is the outcome's problems (a
    ``UsageError`` is raised: it concerns the whole command). After a failure the warm pipeline is
    dropped: a half-done build never hands its state to the next one."""
    started = time.perf_counter() - job.plan_seconds
    outcome = BuildOutcome(job.recipe, job.label, str(job.out), False, fingerprint=job.plan.fingerprint())
    try:
        _run(job, settings, pipelines, reporter, outcome)
        outcome.ok = True
    except UsageError:
        raise
    except LorarecipeError as exc:
        outcome.problems = exc.problems
        if isinstance(exc, InternalError):
            outcome.internal, outcome.traceback = True, exc.traceback
        if pipelines is not None:
            pipelines.discard()
    outcome.seconds = time.perf_counter() - started
    return outcome


def _run(
    job: BuildJob,
    settings: JobSettings,
    pipelines: WarmPipelines | None,
    reporter: Reporter | None,
    outcome: BuildOutcome,
) -> None:
    from .incremental import output_keys, record_state

    resolved = None
    if job.lock is not None:  # every input rehashed against the lock before anything uses it
        from .lock import resolve_frozen

        resolved = resolve_frozen(job.plan, job.lock, job.recipe_root, settings.allow_read)
    stale, keys = stale_of(job, settings)
    outcome.skipped = sorted({s.output for s in job.plan.output_steps()} - stale)
    if not stale:  # nothing to do: no model is loaded, torch is not even imported
        return
    from ..runner import require_build_extra, run_plan

    require_build_extra()

    def remember(written: dict[str, list[Path]]) -> None:  # runs under the output root's lock
        try:
            found = keys.result()
            if any(key is None for key in found.values()):
                # an input was not local yet when the keys were computed beside the build (a
                # built-in materialized, a hub file downloaded by it): it is now
                found = output_keys(job.plan, job.recipe_root, settings.allow_read)
            record_state(job.out, found, written)
        except OSError as exc:
            raise BuildError(f"cannot record the build state in {job.out}: {exc.strerror or exc}") from None

    result = run_plan(
        job.plan,
        out_root=job.out,
        recipe_root=job.recipe_root,
        recipe_text=job.recipe_text,
        device=settings.device,
        allow_read=settings.allow_read,
        outputs=stale,
        resolved=resolved,
        reporter=reporter,
        on_success=remember,
        executor=settings.executor,
        protected=job.protected,
        threads=settings.threads,
        pipelines=pipelines,
        worker_notes=job.worker_notes,
    )
    outcome.outputs = sorted(result.outputs)
    outcome.worker = result.worker
