"""Many builds of one base: separate processes vs one warm process vs a local Ray cluster.

    python benchmarks/batch.py [--builds 8] [--rounds 3] [--work DIR] [--no-ray]

The workload: ``--builds`` copies of ``recipes/demo.yaml`` (built-in tiny SD: a cat merge, a mix, a
fuse; a fused pipeline, a single file, two LoRA files and a 2 prompts × 2 seeds grid of 6 variants),
each with another ``style_weight`` — the builds of a matrix over ``style_weight``, as separate files
so that all three configurations build the very same recipes:

(a) one ``lorarecipe build FILE`` process per build, one after the other (each imports torch and
    diffusers and loads the base);
(b) one ``lorarecipe build FOLDER`` process: the builds run on one warm pipeline;
(c) ``lorarecipe build FOLDER --ray auto --workers 2`` against a local 2-CPU Ray cluster started once
    beforehand (``ray start --head --num-cpus 2``, as a cluster would be running already): two actors,
    each keeping the base warm.

Each configuration runs ``--rounds`` times, interleaved (a, b, c, a, b, c, …), with ``--force`` into
empty folders and an empty grid cell cache (within a run, later builds reuse the cells that do not
depend on ``style_weight``, in every configuration alike), OMP_NUM_THREADS=1 and HF_HUB_OFFLINE=1,
after one unmeasured warm-up build (so the built-ins and the LoRA factor cache exist for all).
Reported: the median wall time, per build, the pipeline loads (summed from the manifests'
``worker.pipeline.loaded``), and the 1-minute load average before each run (the machine is shared).
For (c) also the driver's planning time per build (load and compile, measured in-process) and the
Ray overhead: wall time minus the busiest actor's build time.
Prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "lorarecipe", "build"]


def write_recipes(folder: Path, builds: int) -> list[Path]:
    text = (REPO / "recipes" / "demo.yaml").read_text()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(builds):
        weight = round(0.3 + 0.1 * i, 2)
        body = text.replace("name: demo\n", f"name: demo-{i}\n").replace(
            "style_weight: 0.7", f"style_weight: {weight}"
        )
        files.append(folder / f"demo-{i}.yaml")
        files[-1].write_text(body)
    return files


def _run(cmd: list[str]) -> dict[str, object]:
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _loads(out: Path) -> int:
    return sum(
        json.loads(m.read_text())["worker"]["pipeline"]["loaded"] for m in sorted(out.rglob("manifest.json"))
    )


def separate(files: list[Path], out: Path) -> tuple[float, int, list[dict[str, object]]]:
    started = time.perf_counter()
    docs = [_run([*CLI, str(f), "--out", str(out / f.stem), "--force", "--json"]) for f in files]
    return time.perf_counter() - started, _loads(out), docs


def together(folder: Path, out: Path, *extra: str) -> tuple[float, int, list[dict[str, object]]]:
    started = time.perf_counter()
    doc = _run([*CLI, str(folder), "--out", str(out), "--force", "--json", *extra])
    return time.perf_counter() - started, _loads(out), [doc]


def ray_overhead(wall: float, docs: list[dict[str, object]]) -> float:
    busy: dict[object, float] = {}
    for doc in docs:
        for build in doc["builds"]:  # type: ignore[union-attr, index]
            worker = build["worker"]["pid"]
            busy[worker] = busy.get(worker, 0.0) + build["seconds"]
    return wall - max(busy.values())


def planning_seconds(folder: Path) -> float:
    """The driver's load + compile time for the whole folder (no torch), measured in-process."""
    sys.path.insert(0, str(REPO))
    from lorarecipe.gitops.batch import BatchOptions, plan_jobs
    from lorarecipe.recipe.load import find_recipe_files

    files = find_recipe_files([str(folder)])
    plan_jobs(files, BatchOptions(out=Path(tempfile.mkdtemp())), True)  # imports
    started = time.perf_counter()
    plan_jobs(files, BatchOptions(out=Path(tempfile.mkdtemp())), True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--builds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lorarecipe-batch-bench-"))
    folder = work / "recipes"
    files = write_recipes(folder, args.builds)
    _run([*CLI, str(files[0]), "--out", str(work / "warmup"), "--force", "--json"])
    configs = {"a": "(a) separate processes", "b": "(b) one process, warm"}
    if not args.no_ray:
        subprocess.run(["ray", "stop"], capture_output=True, env=ENV)
        started = time.perf_counter()
        subprocess.run(
            ["ray", "start", "--head", "--num-cpus", "2", "--include-dashboard=false"],
            check=True,
            capture_output=True,
            env=ENV,
        )
        print(f"ray start: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        configs["c"] = "(c) --ray auto, 2 actors"
    results: dict[str, list[tuple[float, int, float, float]]] = {k: [] for k in configs}
    sys.path.insert(0, str(REPO))
    from lorarecipe.fs.atomic import cache_root

    cells = cache_root() / "grid-cells"
    try:
        for round_ in range(args.rounds):
            for key in configs:
                out = work / f"out-{key}-{round_}"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cells, ignore_errors=True)  # every run renders its cells itself
                load = os.getloadavg()[0]
                if key == "a":
                    wall, loads, docs = separate(files, out)
                elif key == "b":
                    wall, loads, docs = together(folder, out)
                else:
                    wall, loads, docs = together(folder, out, "--ray", "auto", "--workers", "2")
                overhead = ray_overhead(wall, docs) if key == "c" else 0.0
                results[key].append((wall, loads, load, overhead))
                print(
                    f"round {round_} {key}: {wall:.1f} s, {loads} loads, load avg {load:.1f}", file=sys.stderr
                )
    finally:
        if not args.no_ray:
            subprocess.run(["ray", "stop"], capture_output=True, env=ENV)
    plan = planning_seconds(folder)
    base = statistics.median(r[0] for r in results["b"])
    print(f"\n{args.builds} builds, {args.rounds} rounds (median; load average before each run)\n")
    print("| configuration | wall time | per build | pipeline loads | vs (a) | vs (b) | load avg |")
    print("|---|---|---|---|---|---|---|")
    first = statistics.median(r[0] for r in results["a"])
    for key, name in configs.items():
        wall = statistics.median(r[0] for r in results[key])
        loads = statistics.median(r[1] for r in results[key])
        loadavg = ", ".join(f"{r[2]:.1f}" for r in results[key])
        print(
            f"| {name} | {wall:.1f} s | {wall / args.builds:.2f} s | {loads:g} | {wall / first:.2f}× "
            f"| {wall / base:.2f}× | {loadavg} |"
        )
    ratios = [f"{b[0] / a[0]:.2f}" for a, b in zip(results["a"], results["b"], strict=True)]
    print(f"\n(b)/(a) per round: {', '.join(ratios)}")
    if "c" in results:
        ratios = [f"{c[0] / b[0]:.2f}" for b, c in zip(results["b"], results["c"], strict=True)]
        print(f"(c)/(b) per round: {', '.join(ratios)}")
    print(f"driver planning (load + compile, no torch): {plan / args.builds * 1000:.0f} ms per build")
    if "c" in results:
        overhead = statistics.median(r[3] for r in results["c"])
        print(f"Ray overhead (wall - busiest actor's build time): {overhead:.1f} s per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
