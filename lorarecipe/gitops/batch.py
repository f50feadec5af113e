"""Many builds: recipe files (or folders of them) -> one build per recipe × matrix combination.

Each build compiles, then runs in its own output folder (``<out>/<recipe>`` and, with a matrix,
``<out>/<recipe>/<combination>``), skipping the outputs that are up to date (``incremental``) and,
with ``frozen``, rehashing every input against the recipe's lock first (``lock``). A failing build
does not stop the others: each ends in a ``BuildOutcome`` (ok, or its problems). Library code: it
returns outcomes; the CLI prints them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import BuildError, InternalError, LockError, LorarecipeError, Problem, UsageError
from ..fs.paths import check_output_root
from ..recipe.load import LoadedRecipe, RecipeBuild, load_recipe
from ..runner.progress import Reporter

__all__ = ["BatchOptions", "BuildOutcome", "build_recipes", "out_root_for"]

T = TypeVar("T")


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
    threads: int | None = None  # torch intra-op threads (None: the runner's policy)


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
        }


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


def _run_build(
    loaded: LoadedRecipe, build: RecipeBuild, out: Path, options: BatchOptions, lock: Any
) -> BuildOutcome:
    """Compile one build, skip the outputs that are up to date, run the rest."""
    from ..compiler import compile_recipe
    from .incremental import has_state, output_keys, record_state, stale_outputs
    from .lock import lock_path

    outcome = BuildOutcome(loaded.display, build.label, str(out), False)
    plan = compile_recipe(loaded, build, allow_read=options.allow_read)
    outcome.fingerprint = plan.fingerprint()
    resolved = None
    if lock is not None:  # every input rehashed against the lock before anything uses it
        from .lock import resolve_frozen

        resolved = resolve_frozen(plan, lock, loaded.root, options.allow_read)
    check_output_root(out)  # its state is read below: never through a symlink
    outputs = [s.output for s in plan.output_steps()]
    keys: Future[dict[str, str | None]]
    if options.force or not has_state(out):
        # everything is built anyway: the build keys (content hashes of every input, a full read of
        # a multi-GB base the first time) are computed in the background while the build streams
        # the same files, and are only needed to record the state afterwards
        keys = _in_background(output_keys, plan, loaded.root, options.allow_read)
        stale = set(outputs)
    else:
        keys = Future()
        keys.set_result(output_keys(plan, loaded.root, options.allow_read))
        stale = stale_outputs(out, keys.result())
    outcome.skipped = sorted(set(outputs) - stale)
    if stale:  # otherwise nothing to do: no model is loaded, torch is not even imported
        from ..runner import require_build_extra, run_plan

        require_build_extra()

        def remember(written: dict[str, list[Path]]) -> None:  # runs under the output root's lock
            found = keys.result()
            if any(key is None for key in found.values()):  # an input appeared during the build (a
                found = output_keys(plan, loaded.root, options.allow_read)  # built-in model made, a download)
            try:
                record_state(out, found, written)
            except OSError as exc:
                raise BuildError(f"cannot record the build state in {out}: {exc.strerror or exc}") from None

        result = run_plan(
            plan,
            out_root=out,
            recipe_root=loaded.root,
            recipe_text=loaded.text,
            device=options.device,
            allow_read=options.allow_read,
            outputs=stale,
            resolved=resolved,
            reporter=options.reporter,
            on_success=remember,
            executor=options.executor,
            protected=(loaded.path, lock_path(loaded.path)),
            threads=options.threads,
        )
        outcome.outputs = sorted(result.outputs)
    outcome.ok = True
    return outcome


def build_recipe_file(path: Path, options: BatchOptions, several: bool) -> list[BuildOutcome]:
    """Load (and with ``frozen`` check the lock of) one recipe file, then run each of its builds."""
    try:
        loaded = load_recipe(path, dict(options.overrides))
        lock = _checked_lock(path, loaded, options) if options.frozen else None
    except UsageError:
        raise
    except LorarecipeError as exc:
        return [BuildOutcome(str(path), "", "", False, problems=exc.problems)]
    root = Path(os.path.abspath(out_root_for(options, loaded.name, several)))
    outcomes = []
    for build in loaded.builds:
        out = root / build.label if build.label else root
        started = time.perf_counter()
        try:
            outcome = _run_build(loaded, build, out, options, lock)
        except UsageError:
            raise
        except LorarecipeError as exc:
            outcome = BuildOutcome(loaded.display, build.label, str(out), False, problems=exc.problems)
            if isinstance(exc, InternalError):
                outcome.internal, outcome.traceback = True, exc.traceback
        outcome.seconds = time.perf_counter() - started
        outcomes.append(outcome)
    return outcomes


def build_recipes(files: Sequence[Path], options: BatchOptions, several: bool) -> list[BuildOutcome]:
    """Build every recipe file; ``several`` puts each recipe in ``<out>/<recipe name>``."""
    outcomes: list[BuildOutcome] = []
    for path in files:
        outcomes.extend(build_recipe_file(path, options, several))
    return outcomes
