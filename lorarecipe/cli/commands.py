"""The commands behind ``lorarecipe <command>``: call the library, print the result, return an exit code.

Each ``cmd_*`` takes the parsed arguments. Library code raises ``LorarecipeError``s; ``main`` (in
``lorarecipe.cli``) prints those. ``validate``, ``plan``, ``schema``, ``verify`` and ``lock --check``
never import torch; ``build`` and ``lock`` import the execution side lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..diagnostics import printable, render_github, render_text
from ..errors import LockError, LorarecipeError, Problem, UsageError
from ..recipe.load import find_recipe_files, parse_overrides
from ..recipe.yaml_source import recipe_text

__all__ = [
    "EXIT_BUG",
    "EXIT_ERRORS",
    "EXIT_OK",
    "cmd_build",
    "cmd_lock",
    "cmd_plan",
    "cmd_publish",
    "cmd_schema",
    "cmd_validate",
    "cmd_verify",
    "print_problems",
]

EXIT_OK, EXIT_ERRORS, EXIT_BUG = 0, 1, 3
BUG_BANNER = "internal error: this is a bug in lorarecipe, please report it with the text below"


def print_problems(problems: Sequence[Problem], stream: Any = None) -> None:
    """Compiler-style text with snippets, grouped by file."""
    stream = stream or sys.stderr
    by_file: dict[str | None, list[Problem]] = {}
    for problem in problems:
        by_file.setdefault(problem.span.file if problem.span else None, []).append(problem)
    for file, group in by_file.items():
        print(render_text(group, recipe_text(file) if file else None), file=stream)
    errors = sum(p.severity == "error" for p in problems)
    if errors:
        print(f"{errors} error{'s' if errors != 1 else ''}", file=stream)


def cmd_validate(args: argparse.Namespace) -> int:
    from ..compiler import compile_recipe_file

    files = find_recipe_files(args.paths)
    if not files:
        raise UsageError("no recipe files found (expected .yaml files or folders containing them)")
    results = []
    all_problems: list[Problem] = []
    for path in files:
        problems: list[Problem] = []
        try:
            plans = compile_recipe_file(path, parse_overrides(args.set), args.allow_read)
            problems = [
                Problem(c.detail, c.subject, severity="warning")
                for p in plans[:1]
                for c in p.checks
                if c.status == "warning"
            ]
        except UsageError:
            raise
        except LorarecipeError as exc:
            problems = exc.problems
        ok = not any(p.severity == "error" for p in problems)
        results.append({"path": str(path), "ok": ok, "problems": [p.to_json() for p in problems]})
        all_problems.extend(problems)
    failed = [r for r in results if not r["ok"]]
    if args.json:
        print(json.dumps({"ok": not failed, "files": results}, indent=2))
    elif args.format == "github":
        text = render_github(all_problems)
        if text:
            print(text)
    else:
        if all_problems:
            print_problems(all_problems)
        if not failed:
            print(f"{len(files)} recipe{'s' if len(files) != 1 else ''} OK", file=sys.stderr)
    return EXIT_ERRORS if failed else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from ..compiler import compile_recipe_file
    from ..plan.view import render_plan

    plans = compile_recipe_file(Path(args.recipe), parse_overrides(args.set), args.allow_read)
    if args.json:
        if len(plans) == 1:
            doc: Any = plans[0].to_json()
        else:
            doc = {"plan_format": 1, "recipe": plans[0].recipe, "builds": [p.to_json() for p in plans]}
        print(json.dumps(doc, indent=2, sort_keys=False))
    else:
        print("\n\n".join(render_plan(p) for p in plans))
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from ..recipe.schema import recipe_schema_text

    print(recipe_schema_text(), end="")
    return EXIT_OK


def _summary(outcomes: Sequence[Any]) -> str:
    """One row per build: recipe, matrix build (only when a recipe has a matrix), result, time, the
    outputs rebuilt and those up to date, the output folder."""
    matrix = any(o.build for o in outcomes)
    rows: list[tuple[str, ...]] = [
        ("recipe", *(("build",) if matrix else ()), "result", "time", "rebuilt", "up to date", "output")
    ]
    for o in outcomes:
        result = "ok" if o.ok else "FAILED"
        rebuilt = ", ".join(o.outputs) or "-"
        fresh = ", ".join(o.skipped) or "-"
        row = (
            o.recipe,
            *((o.build or "-",) if matrix else ()),
            result,
            f"{o.seconds:.1f}s",
            rebuilt,
            fresh,
            o.out or "-",
        )
        rows.append(tuple(printable(c, 200) for c in row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def cmd_build(args: argparse.Namespace) -> int:
    from ..gitops.batch import BatchOptions, build_recipes
    from ..runner.progress import make_reporter

    files = find_recipe_files(args.recipes)
    if not files:
        raise UsageError("no recipe files found")
    several = len(files) > 1 or any(Path(p).is_dir() for p in args.recipes)
    options = BatchOptions(
        out=args.out,
        device=args.device,
        executor=args.executor,
        frozen=args.frozen,
        force=args.force,
        overrides=parse_overrides(args.set),
        allow_read=tuple(args.allow_read),
        reporter=make_reporter(args.quiet or args.json, lines=True),
        compile=args.compile,
        ray=args.ray,
        workers=args.workers,
        worker_cpus=args.worker_cpus,
        retries=args.retries,
        grid_shard_cells=args.grid_shard_cells,
        threads=args.threads,
    )
    ray_only = (
        args.workers is not None,
        args.retries != 2,
        args.worker_cpus != 1.0,
        args.grid_shard_cells != 8,
    )
    if args.ray is None and any(ray_only):
        raise UsageError(
            "--workers, --worker-cpus, --retries and --grid-shard-cells apply to --ray builds only"
        )
    if (args.workers is not None and args.workers < 1) or args.worker_cpus <= 0:
        raise UsageError("--workers and --worker-cpus must be positive")
    if args.retries < 0 or args.grid_shard_cells < 0:
        raise UsageError("--retries and --grid-shard-cells must be 0 or more")
    outcomes = build_recipes(files, options, several)
    failed = [o for o in outcomes if not o.ok]
    published: list[Any] = []
    if args.publish and not failed:  # never publish from a run where a build failed
        from ..gitops.release import publish_recipes

        published = publish_recipes(files, options, several)
    failed_publish = [o for o in published if not o.ok]
    if args.json:
        doc: dict[str, Any] = {
            "ok": not failed and not failed_publish,
            "builds": [o.to_json() for o in outcomes],
        }
        if args.publish:
            doc["published"] = [o.to_json() for o in published]
        print(json.dumps(doc, indent=2))
    for outcome in [*failed, *failed_publish]:
        if getattr(outcome, "internal", False):
            print(BUG_BANNER, file=sys.stderr)
            print(outcome.traceback, file=sys.stderr, end="")
        print_problems(outcome.problems)
    if not args.json:
        print(_summary(outcomes), file=sys.stderr)
        _print_published(published)
    if any(o.internal for o in failed):
        return EXIT_BUG
    return EXIT_ERRORS if failed or failed_publish else EXIT_OK


def _print_published(outcomes: Sequence[Any]) -> None:
    for outcome in outcomes:
        for result in outcome.results:
            print(f"{result.output}: {result.message} ({result.url})", file=sys.stderr)


def cmd_publish(args: argparse.Namespace) -> int:
    """``publish RECIPE|DIR...``: publish the ``publish`` outputs of the builds ``build`` wrote."""
    import os

    from ..gitops.batch import BatchOptions
    from ..gitops.release import publish_recipes

    if args.json:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    files = find_recipe_files(args.recipes)
    if not files:
        raise UsageError("no recipe files found")
    several = len(files) > 1 or any(Path(p).is_dir() for p in args.recipes)
    options = BatchOptions(
        out=args.out, overrides=parse_overrides(args.set), allow_read=tuple(args.allow_read)
    )
    outcomes = publish_recipes(files, options, several, dry_run=args.dry_run)
    failed = [o for o in outcomes if not o.ok]
    if args.json:
        print(json.dumps({"ok": not failed, "published": [o.to_json() for o in outcomes]}, indent=2))
    for outcome in failed:
        print_problems(outcome.problems)
    if not args.json:
        _print_published(outcomes)
        if not outcomes:
            print("nothing to publish: no output has a 'publish' section", file=sys.stderr)
    return EXIT_ERRORS if failed else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from ..outputs.manifest import verify_outdir

    result = verify_outdir(args.outdir)
    if args.json:
        doc = {
            "ok": not result.problems,
            "checked": result.checked,
            "problems": [p.to_json() for p in result.problems],
        }
        print(json.dumps(doc, indent=2))
    else:
        for problem in result.problems:
            print(f"error: {printable(problem.message)}", file=sys.stderr)
        print(f"{result.checked} files checked, {len(result.problems)} problems", file=sys.stderr)
    return EXIT_ERRORS if result.problems else EXIT_OK


def cmd_lock(args: argparse.Namespace) -> int:
    """``lock RECIPE``: write the lock (0); ``--check``: it is current (0) or stale (1). Torch-free with
    ``--check``."""
    from ..compiler import compile_recipe_file
    from ..gitops.lock import check_lock_current, create_lock, lock_path, read_lock, write_lock

    recipe = Path(args.recipe)
    overrides = parse_overrides(args.set)
    if args.check:  # a missing lock raises LockError: exit 1 with its message
        plans = compile_recipe_file(recipe, overrides, args.allow_read)
        reasons = check_lock_current(recipe, read_lock(recipe), plans)
        if reasons:
            hint = f"run `lorarecipe lock {recipe}` to update it"
            problems = [Problem(f"{lock_path(recipe)} is stale: {r}", hint=hint) for r in reasons]
            raise LockError(problems[0].message, problems)
        print(f"{printable(str(lock_path(recipe)))} is up to date", file=sys.stderr)
        return EXIT_OK
    from ..runner import require_build_extra
    from ..runner.quiet import quiet_libraries

    require_build_extra()
    quiet_libraries(load=True)  # diffusers warns "Couldn't connect to the Hub" even when offline on purpose
    lock = create_lock(recipe, overrides, args.allow_read)
    path = write_lock(recipe, lock)
    files = sum(len(i.files) for i in lock.inputs)
    print(f"wrote {printable(str(path))} ({len(lock.inputs)} inputs, {files} files)", file=sys.stderr)
    return EXIT_OK
