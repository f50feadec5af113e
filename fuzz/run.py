"""Long fuzzing run of the never-crash properties that CI checks with a few hundred examples.

    python fuzz/run.py --examples 10000 [--seed N] [--only recipes,header,load] [--save DIR]

Properties (the same code as the tests, from ``tests/helpers``):

- ``recipes``: random and mutated recipe texts through loader, schema and compiler
  (``tests/helpers/fuzzing.py``) end in a plan or a lorarecipe error with a message;
- ``header``: malformed safetensors LoRA files (``tests/helpers/malformed.py``) through
  ``read_header`` + ``inspect_lora`` end in a result or a lorarecipe error;
- ``load``: the same files through ``load_adapter`` into the built-in tiny SD pipeline;
- ``lock``, ``manifest``: mutated lock files and manifests (random JSON, deep nesting, wrong types,
  huge strings, truncation; ``tests/helpers/fuzz_files.py``) through ``lock --check`` and ``verify``;
- ``basefolder``: a copy of the tiny SD base folder with ``model_index.json``/configs mutated, files
  deleted, truncated or turned into folders, components added under hostile names, through ``validate``.
  All of them end in exit 0 or 1, never 3, with no traceback and no ``RecursionError``.

Unlike a test, a failure does not stop the run: every distinct failure (property, exception type,
first line) is counted, one reproducer per failure is saved under ``--save`` (recipe ``.yaml`` or
``.safetensors``), and the run ends with the count per property. Exit 1 if anything failed.
The examples are split between the properties by ``SHARE`` (loading is ~20x slower per example).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network, whatever a file names

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.helpers.fuzzing import check_recipe_never_crashes, recipes_text  # noqa: E402
from tests.helpers.malformed import (  # noqa: E402
    Malformed,
    check_header_never_crashes,
    check_load_never_crashes,
    malformed_files,
)

PROPERTIES = ("recipes", "header", "load", "lock", "manifest", "basefolder")
SHARE = {"recipes": 0.3, "header": 0.25, "load": 0.05, "lock": 0.15, "manifest": 0.15, "basefolder": 0.1}


@dataclass
class Tally:
    """Outcomes and distinct failures of one property."""

    name: str
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    reproducers: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def examples(self) -> int:
        return sum(self.outcomes.values())


def _signature(exc: BaseException) -> str:
    """What makes two failures the same bug: the exception type and its first line, not the values."""
    cause = exc.__cause__ if isinstance(exc, AssertionError) and exc.__cause__ else exc
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first[:160]}"


def _record(tally: Tally, exc: BaseException, save: Path, payload: bytes, suffix: str) -> None:
    key = _signature(exc)
    tally.outcomes["FAILED"] += 1
    tally.failures[key] += 1
    if key not in tally.reproducers:
        digest = hashlib.sha256(payload).hexdigest()[:12]
        path = save / f"{tally.name}-{digest}{suffix}"
        path.write_bytes(payload)
        (path.parent / (path.name + ".txt")).write_text(
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        )
        tally.reproducers[key] = path


def _run(
    tally: Tally, count: int, strategy: st.SearchStrategy[Any], check: Callable[[Any], str], rng: int
) -> None:
    """Feed ``count`` examples to ``check``; it returns an outcome label or raises (a failure)."""

    @seed(rng)
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: failures are collected, the run goes on
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def property_(example: Any) -> None:
        tally.outcomes[check(example)] += 1

    started = time.perf_counter()
    property_()
    tally.seconds = time.perf_counter() - started


def fuzz_recipes(tally: Tally, count: int, rng: int, save: Path, work: Path) -> None:
    def check(text: str) -> str:
        try:
            return check_recipe_never_crashes(text, work)
        except Exception as exc:  # a crash is what we are looking for
            _record(tally, exc, save, text.encode("utf-8", "surrogatepass"), ".yaml")
            return "FAILED-counted"

    _run(tally, count, recipes_text, check, rng)
    tally.outcomes.pop("FAILED-counted", None)


def _seed_files() -> list[bytes]:
    from lorarecipe.builtin.materialize import builtin_lora_path

    return [builtin_lora_path(name).read_bytes() for name in ("tiny-sd/style", "tiny-sd/detail")]


def fuzz_header(tally: Tally, count: int, rng: int, save: Path, work: Path) -> None:
    path = work / "header.safetensors"

    def check(case: Malformed) -> str:
        path.write_bytes(case.data)
        try:
            return check_header_never_crashes(path)
        except Exception as exc:
            _record(tally, exc, save, case.data, ".safetensors")
            return "FAILED-counted"

    _run(tally, count, malformed_files(_seed_files()), check, rng)
    tally.outcomes.pop("FAILED-counted", None)


def fuzz_load(tally: Tally, count: int, rng: int, save: Path, work: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from lorarecipe.builtin.materialize import builtin_base_path
    from lorarecipe.runner.quiet import quiet_libraries

    quiet_libraries()
    pipe = StableDiffusionPipeline.from_pretrained(str(builtin_base_path("tiny-sd")))
    pipe.set_progress_bar_config(disable=True)
    path = work / "load.safetensors"
    names = iter(range(10**12))

    def cleanup(pipe: Any, name: str) -> None:
        if any(name in listed for listed in pipe.get_list_adapters().values()):
            pipe.delete_adapters(name)

    def check(case: Malformed) -> str:
        path.write_bytes(case.data)
        try:
            return check_load_never_crashes(pipe, f"fuzz{next(names)}", path, cleanup)
        except Exception as exc:
            _record(tally, exc, save, case.data, ".safetensors")
            return "FAILED-counted"

    _run(tally, count, malformed_files(_seed_files()), check, rng)
    tally.outcomes.pop("FAILED-counted", None)


def _built(work: Path) -> Path:
    """A recipe, its lock and its build folder in ``work`` (made once per run)."""
    from tests.helpers.fuzz_files import run_cli

    folder = work / "built"
    if not (folder / "out" / "manifest.json").is_file():
        folder.mkdir(exist_ok=True)
        recipe = folder / "recipe.yaml"
        recipe.write_text(
            "base: builtin:tiny-sd\nadapters:\n  style: builtin:tiny-sd/style\n"
            "outputs:\n  lora: {kind: lora, adapter: style, path: lora, card: false}\n"
        )
        for argv in (["lock", str(recipe)], ["build", str(recipe), "--out", str(folder / "out"), "--quiet"]):
            code, text = run_cli(*argv)
            assert code == 0, text
    return folder


def _fuzz_file(tally: Tally, count: int, rng: int, save: Path, work: Path, which: str) -> None:
    from tests.helpers.fuzz_files import check_cli_never_crashes, mutated_json, replace_file

    folder = _built(work)
    target = folder / ("recipe.lock.json" if which == "lock" else "out/manifest.json")
    seed_doc = json.loads(target.read_text())
    argv = (
        ["lock", "--check", str(folder / "recipe.yaml")]
        if which == "lock"
        else ["verify", str(folder / "out")]
    )

    def check(data: bytes) -> str:
        replace_file(target, data)
        try:
            return check_cli_never_crashes(*argv)
        except Exception as exc:
            _record(tally, exc, save, data, ".json")
            return "FAILED-counted"

    _run(tally, count, mutated_json(seed_doc), check, rng)
    tally.outcomes.pop("FAILED-counted", None)


def fuzz_lock(tally: Tally, count: int, rng: int, save: Path, work: Path) -> None:
    _fuzz_file(tally, count, rng, save, work, "lock")


def fuzz_manifest(tally: Tally, count: int, rng: int, save: Path, work: Path) -> None:
    _fuzz_file(tally, count, rng, save, work, "manifest")


def fuzz_basefolder(tally: Tally, count: int, rng: int, save: Path, work: Path) -> None:
    from lorarecipe.builtin.materialize import builtin_base_path
    from tests.helpers.fuzz_files import (
        base_folder_damage,
        check_cli_never_crashes,
        damaged_copy,
        seed_base_folder,
    )

    files, index = seed_base_folder(builtin_base_path("tiny-sd"), work / "seed-base")
    recipe = work / "recipe.yaml"
    recipe.write_text(
        "base: {path: base}\nadapters:\n  style: builtin:tiny-sd/style\n"
        "outputs:\n  lora: {kind: lora, adapter: style, path: lora}\n"
    )

    def check(damage: list[tuple[str, str, bytes]]) -> str:
        damaged_copy(work / "seed-base", work / "base", damage)
        try:
            return check_cli_never_crashes("validate", str(recipe))
        except Exception as exc:
            _record(tally, exc, save, repr(damage).encode(), ".txt")
            return "FAILED-counted"

    _run(tally, count, base_folder_damage(files, index), check, rng)
    tally.outcomes.pop("FAILED-counted", None)


RUNNERS = {
    "recipes": fuzz_recipes,
    "header": fuzz_header,
    "load": fuzz_load,
    "lock": fuzz_lock,
    "manifest": fuzz_manifest,
    "basefolder": fuzz_basefolder,
}


def _report(tallies: list[Tally], total_seconds: float, save: Path) -> int:
    failed = 0
    print()
    for tally in tallies:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(tally.outcomes.items()))
        print(f"{tally.name:8} {tally.examples:6d} examples in {tally.seconds:6.1f} s  ({outcomes})")
        for key, times in tally.failures.most_common():
            failed += times
            print(f"    FAILURE x{times}: {key}\n        reproducer: {tally.reproducers[key]}")
    total = sum(t.examples for t in tallies)
    print(f"total    {total:6d} examples in {total_seconds:6.1f} s; {failed} failed")
    if failed:
        print(f"reproducers and tracebacks in {save}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000, help="total examples over all properties")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (the same seed, the same run)")
    parser.add_argument("--only", default=",".join(PROPERTIES), help="comma-separated properties to run")
    parser.add_argument("--save", type=Path, help="folder for reproducers (default: a new temporary folder)")
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PROPERTIES))
    if unknown:
        parser.error(f"unknown properties {unknown}; choose from {', '.join(PROPERTIES)}")
    share = sum(SHARE[p] for p in chosen)
    save = args.save or Path(tempfile.mkdtemp(prefix="lorarecipe-fuzz-"))
    save.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tallies = []
    with tempfile.TemporaryDirectory(prefix="lorarecipe-fuzz-work-") as work:
        for i, name in enumerate(chosen):
            count = max(1, round(args.examples * SHARE[name] / share))
            tally = Tally(name)
            print(f"{name}: {count} examples ...", flush=True)
            RUNNERS[name](tally, count, args.seed + i, save, Path(work))
            tallies.append(tally)
    return _report(tallies, time.perf_counter() - started, save)


if __name__ == "__main__":
    sys.exit(main())
