"""``lorarecipe build``: recipes (files or folders) -> builds, one per recipe × matrix combination.

Each build compiles, then runs in its own output folder (``<out>/<recipe>`` and, with a matrix,
``<out>/<recipe>/<combination>``). A failing build does not stop the others; a summary table (or
JSON with ``--json``) ends the run, and the exit code is 1 if any build failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BuildError, LorarecipeError, Problem, UsageError

__all__ = ["BuildOutcome", "build_command", "build_recipe_file"]


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
            "problems": [p.to_json() for p in self.problems],
        }


def _out_root(args: Any, name: str, several: bool) -> Path:
    if args.out is None:
        return Path("build") / name
    return Path(args.out) / name if several else Path(args.out)


def _checked_lock(path: Path, loaded: Any, args: Any) -> Any:
    """``--frozen``: the recipe's lock, refused when missing or stale (LockError naming why)."""
    from .compiler import compile_recipe
    from .errors import LockError
    from .lock import check_lock_current, lock_path, read_lock

    lock = read_lock(path)
    plans = [compile_recipe(loaded, b, allow_read=args.allow_read) for b in loaded.builds]
    reasons = check_lock_current(path, lock, plans)
    if reasons:
        hint = f"run `lorarecipe lock {path}`"
        problems = [Problem(f"{lock_path(path)} is stale: {r}", hint=hint) for r in reasons]
        raise LockError(problems[0].message, problems)
    return lock


def _run_build(loaded: Any, build: Any, out: Path, args: Any, lock: Any) -> BuildOutcome:
    """Compile one build, skip the outputs that are up to date, run the rest."""
    from .cli import need_build_extra
    from .compiler import compile_recipe
    from .incremental import output_keys, record_state, stale_outputs
    from .runner.progress import make_reporter

    outcome = BuildOutcome(loaded.display, build.label, str(out), False)
    plan = compile_recipe(loaded, build, allow_read=args.allow_read)
    outcome.fingerprint = plan.fingerprint()
    resolved = None
    if lock is not None:  # every input rehashed against the lock before anything uses it
        from .lock import resolve_frozen

        resolved = resolve_frozen(plan, lock, loaded.root, args.allow_read)
    keys = output_keys(plan, loaded.root, args.allow_read)
    stale = set(keys) if args.force else stale_outputs(out, keys)
    outcome.skipped = sorted(set(keys) - stale)
    if stale:  # otherwise nothing to do: no model is loaded, torch is not even imported
        need_build_extra()
        from .runner import run_plan

        def remember(written: dict[str, list[Path]]) -> None:  # runs under the output root's lock
            try:
                record_state(out, output_keys(plan, loaded.root, args.allow_read), written)
            except OSError as exc:
                raise BuildError(f"cannot record the build state in {out}: {exc.strerror or exc}") from None

        result = run_plan(
            plan,
            out_root=out,
            recipe_root=loaded.root,
            recipe_text=loaded.text,
            device=args.device,
            allow_read=args.allow_read,
            outputs=stale,
            resolved=resolved,
            reporter=make_reporter(args.quiet or args.json, lines=True),
            on_success=remember,
            executor=args.executor,
        )
        outcome.outputs = sorted(result.outputs)
    outcome.ok = True
    return outcome


def build_recipe_file(path: Path, args: Any, several: bool) -> list[BuildOutcome]:
    """Load (and with ``--frozen`` check the lock of) one recipe file, then run each of its builds."""
    from .cli import parse_overrides
    from .load import load_recipe

    try:
        loaded = load_recipe(path, parse_overrides(args.set))
        lock = _checked_lock(path, loaded, args) if args.frozen else None
    except UsageError:
        raise
    except LorarecipeError as exc:
        return [BuildOutcome(str(path), "", "", False, problems=exc.problems)]
    root = Path(os.path.abspath(_out_root(args, loaded.name, several)))
    outcomes = []
    for build in loaded.builds:
        out = root / build.label if build.label else root
        started = time.perf_counter()
        try:
            outcome = _run_build(loaded, build, out, args, lock)
        except UsageError:
            raise
        except LorarecipeError as exc:
            outcome = BuildOutcome(loaded.display, build.label, str(out), False, problems=exc.problems)
        outcome.seconds = time.perf_counter() - started
        outcomes.append(outcome)
    return outcomes


def _summary(outcomes: list[BuildOutcome]) -> str:
    rows = [("recipe", "build", "result", "time", "output")]
    for o in outcomes:
        result = "ok" if o.ok else "FAILED"
        rows.append((o.recipe, o.build or "-", result, f"{o.seconds:.1f}s", o.out or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def build_command(args: Any) -> int:
    from .cli import print_problems, recipe_files

    files = recipe_files(args.recipes)
    if not files:
        raise UsageError("no recipe files found")
    several = len(files) > 1 or any(Path(p).is_dir() for p in args.recipes)
    outcomes: list[BuildOutcome] = []
    for path in files:
        outcomes.extend(build_recipe_file(path, args, several))
    failed = [o for o in outcomes if not o.ok]
    if args.json:
        print(json.dumps({"ok": not failed, "builds": [o.to_json() for o in outcomes]}, indent=2))
    for outcome in failed:
        print_problems(outcome.problems)
    if not args.json:
        print(_summary(outcomes), file=sys.stderr)
    return 1 if failed else 0
