"""The ``lorarecipe`` command line: the only place that prints and picks exit codes.

Exit codes: 0 ok, 1 recipe or build errors, 2 usage, 3 internal error (a bug), 130 interrupted,
141 stdout closed by its reader (as for SIGPIPE).
This module parses arguments and maps exceptions to exit codes; the commands themselves are in
``commands`` (they call the library and print its results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..diagnostics import printable
from ..errors import InternalError, LorarecipeError, UsageError
from ..runner.executor import EXECUTOR_MODES
from ..runner.pipeline.compiled import COMPILE_MODES
from .commands import (
    BUG_BANNER,
    EXIT_BUG,
    EXIT_ERRORS,
    EXIT_OK,
    cmd_build,
    cmd_lock,
    cmd_plan,
    cmd_publish,
    cmd_schema,
    cmd_validate,
    cmd_verify,
    print_problems,
)

__all__ = ["main", "make_parser"]

EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would sys.exit(2) itself; keep control here
        raise UsageError(f"{self.prog}: {message}")


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
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="one recipe file: its output folder (a matrix builds each combination into DIR/<combination>); "
        "several recipes or a folder: the parent, each recipe builds into DIR/<recipe name>. "
        "Default: build/<recipe name> for each recipe",
    )
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto")
    p.add_argument(
        "--executor",
        choices=tuple(EXECUTOR_MODES),
        default="auto",
        help="; ".join(f"{k}: {v}" for k, v in EXECUTOR_MODES.items()),
    )
    p.add_argument(
        "--frozen", action="store_true", help="require an up-to-date lock file and verify input hashes"
    )
    p.add_argument("--force", action="store_true", help="rebuild every output even if it is up to date")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: LORARECIPE_THREADS, else the available cores minus one)",
    )
    p.add_argument(
        "--publish",
        action="store_true",
        help="then publish the outputs that have a 'publish' section (only if every build succeeded)",
    )
    p.add_argument(
        "--compile",
        choices=tuple(COMPILE_MODES),
        default="none",
        help="how grids that do not say render: " + "; ".join(f"{k}: {v}" for k, v in COMPILE_MODES.items()),
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="build on a Ray cluster: one actor per GPU (or per --worker-cpus CPUs) keeps a base warm; "
        "ADDRESS is host:6379, ray://host:10001 or auto (default: RAY_ADDRESS, else the cluster `ray start` "
        "started on this machine, else a new local cluster)",
    )
    p.add_argument("--workers", type=int, metavar="N", help="with --ray: number of actors")
    p.add_argument(
        "--worker-cpus", type=float, default=1.0, metavar="N", help="with --ray: CPUs each actor reserves"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="with --ray: times a build is retried after its worker died (default 2)",
    )
    p.add_argument(
        "--grid-shard-cells",
        type=int,
        default=8,
        metavar="N",
        help="with --ray and 2+ workers: split grids of more than N cells into shards of at most N cells "
        "(whole prompt/seed batches) rendered by all workers; 0 never splits (default 8)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    _common(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "publish",
        help="publish the built outputs that have a 'publish' section to the Hugging Face Hub",
    )
    p.add_argument("recipes", nargs="+")
    p.add_argument("--out", type=Path, help="the output root the recipes were built into (as for build)")
    p.add_argument("--dry-run", action="store_true", help="show what would be published; no request is sent")
    p.add_argument("--json", action="store_true", help="print a JSON report (commit URLs for CI)")
    _common(p)
    p.set_defaults(func=cmd_publish)

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
    """Run the CLI; returns the exit code (tests call this directly).

    A reader that closes stdout early (``lorarecipe validate --json | head -c1``) is not an error of
    lorarecipe: the rest of the output goes to /dev/null (as the Python docs advise for SIGPIPE) and
    the exit code is 141, what a command killed by SIGPIPE reports in a shell."""
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a closed pipe shows here when the output was buffered
        return code
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE


def _stdout_to_devnull() -> None:
    """Point stdout's file descriptor at /dev/null so the interpreter's final flush cannot fail."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing to flush
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _run(argv: list[str]) -> int:
    json_mode = "--json" in argv
    try:
        args = make_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except BrokenPipeError:
        raise
    except UsageError as exc:
        print(f"error: {printable(exc.message)}", file=sys.stderr)
        return EXIT_USAGE
    except InternalError as exc:
        if json_mode:
            print(
                json.dumps(
                    {"ok": False, "internal_error": True, "problems": [p.to_json() for p in exc.problems]}
                )
            )
        print(BUG_BANNER, file=sys.stderr)
        print(exc.traceback, file=sys.stderr, end="")
        print_problems(exc.problems)
        return EXIT_BUG
    except LorarecipeError as exc:
        print_problems(exc.problems)  # stderr first: it stays readable when stdout's reader is gone
        if json_mode:
            print(json.dumps({"ok": False, "problems": [p.to_json() for p in exc.problems]}, indent=2))
        return EXIT_ERRORS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_OK
    except BaseException:
        print(BUG_BANNER, file=sys.stderr)
        traceback.print_exc()
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
