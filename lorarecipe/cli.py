"""The ``lorarecipe`` command line: the only place that prints errors and picks exit codes.

Exit codes: 0 ok, 1 recipe or build errors, 2 usage, 3 internal error (a bug), 130 interrupted.
``validate``, ``plan`` and ``schema`` never import torch; ``build``, ``verify`` and ``lock`` import
the execution side lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .diagnostics import render_github, render_text
from .errors import LorarecipeError, Problem, UsageError

__all__ = ["main"]

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would sys.exit(2) itself; keep control here
        raise UsageError(f"{self.prog}: {message}")


def parse_overrides(values: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        if "=" not in item:
            raise UsageError(f"--set expects name=value, got {item!r}")
        name, value = item.split("=", 1)
        out[name.strip()] = value
    return out


def recipe_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix in (".yaml", ".yml")
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            files.extend(found)
        else:
            files.append(path)
    return files


def _source_text(file: str) -> str | None:
    try:
        path = Path(file)
        if path.is_file() and path.stat().st_size <= 1_000_000:
            return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return None


def print_problems(problems: Sequence[Problem], stream: Any = None) -> None:
    """Compiler-style text with snippets, grouped by file."""
    stream = stream or sys.stderr
    by_file: dict[str | None, list[Problem]] = {}
    for problem in problems:
        by_file.setdefault(problem.span.file if problem.span else None, []).append(problem)
    for file, group in by_file.items():
        print(render_text(group, _source_text(file) if file else None), file=stream)
    errors = sum(p.severity == "error" for p in problems)
    if errors:
        print(f"{errors} error{'s' if errors != 1 else ''}", file=stream)


def compile_file(path: Path, overrides: dict[str, str], allow_read: Sequence[Path]) -> list[Any]:
    from .compiler import compile_recipe
    from .load import load_recipe

    loaded = load_recipe(path, overrides)
    plans = []
    problems: list[Problem] = []
    for build in loaded.builds:
        try:
            plans.append(compile_recipe(loaded, build, allow_read=allow_read))
        except LorarecipeError as exc:
            problems.extend(p for p in exc.problems if p not in problems)
    if problems:
        from .errors import RecipeCompileError

        raise RecipeCompileError(problems[0].message, problems)
    return plans


def cmd_validate(args: argparse.Namespace) -> int:
    files = recipe_files(args.paths)
    if not files:
        raise UsageError("no recipe files found (expected .yaml files or folders containing them)")
    results = []
    all_problems: list[Problem] = []
    for path in files:
        problems: list[Problem] = []
        try:
            plans = compile_file(path, parse_overrides(args.set), args.allow_read)
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
    from .plan_view import render_plan

    plans = compile_file(Path(args.recipe), parse_overrides(args.set), args.allow_read)
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
    from .schema import recipe_schema_text

    print(recipe_schema_text(), end="")
    return EXIT_OK


def need_build_extra() -> None:
    """A clear usage error instead of an ImportError when the [build] extra is not installed."""
    import importlib.util

    missing = [
        m
        for m in ("torch", "diffusers", "peft", "transformers", "safetensors", "PIL", "filelock")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise UsageError(
            f"this command needs {', '.join(missing)}: install torch for your machine, then "
            "pip install 'lorarecipe[build]'"
        )


def cmd_build(args: argparse.Namespace) -> int:
    from .build import build_command

    return build_command(args)


def cmd_verify(args: argparse.Namespace) -> int:
    from .manifest import verify_command

    return verify_command(args)


def cmd_lock(args: argparse.Namespace) -> int:
    from .lock import lock_command

    if not args.check:
        need_build_extra()
    return lock_command(args)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a recipe variable")
    p.add_argument(
        "--allow-read",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="also allow recipes to read inputs from DIR",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lorarecipe", description="Compile and build YAML merge recipes for diffusion LoRAs."
    )
    parser.add_argument("--version", action="version", version=f"lorarecipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("validate", help="check recipes (files or folders) without loading any weight")
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument(
        "--format",
        choices=("text", "github"),
        default="text",
        help="'github' prints GitHub Actions ::error annotations",
    )
    _common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="show what a build would load, merge, fuse and write")
    p.add_argument("recipe")
    p.add_argument("--json", action="store_true", help="print the plan as JSON, with its fingerprint")
    _common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("schema", help="print the recipe JSON Schema")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("build", help="build recipes (a file or a folder of recipes)")
    p.add_argument("recipes", nargs="+")
    p.add_argument("--out", type=Path, help="output root (default: build/<recipe name>)")
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto")
    p.add_argument(
        "--executor",
        choices=("auto", "streaming", "diffusers"),
        default="auto",
        help="how fused checkpoints are made (auto: streaming)",
    )
    p.add_argument(
        "--frozen", action="store_true", help="require an up-to-date lock file and verify input hashes"
    )
    p.add_argument("--force", action="store_true", help="rebuild every output even if it is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    _common(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("verify", help="recompute the hashes of a build folder against its manifest")
    p.add_argument("outdir", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("lock", help="pin every input to a hub commit and sha256 (writes RECIPE.lock.json)")
    p.add_argument("recipe")
    p.add_argument(
        "--check", action="store_true", help="exit 1 if the lock is missing or stale; write nothing"
    )
    _common(p)
    p.set_defaults(func=cmd_lock)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (tests call this directly)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in argv
    try:
        args = make_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except UsageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except LorarecipeError as exc:
        if json_mode:
            print(json.dumps({"ok": False, "problems": [p.to_json() for p in exc.problems]}, indent=2))
        print_problems(exc.problems)
        return EXIT_ERRORS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_OK
    except BaseException:
        print(
            "internal error: this is a bug in lorarecipe, please report it with the text below",
            file=sys.stderr,
        )
        traceback.print_exc()
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
