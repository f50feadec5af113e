"""One build with a 32-cell grid on a local 2-CPU Ray cluster: sharded over 2 actors vs not sharded.

    python benchmarks/grid_shards.py [--rounds 3] [--steps 4]

The workload: one recipe on the built-in tiny SD base (two LoRAs, a mix, a fuse), a LoRA file and a
grid of 2 prompts × 4 seeds × 4 variants (base, style, mix, fused; the fused column also renders its
runtime equivalent). Configurations, interleaved per round, each with an empty grid cell cache and
``--force`` into an empty folder, OMP_NUM_THREADS=1:

(l) built here, no Ray (one process);
(u) ``--ray``, ``grid_shard_cells=0``: one build, so one actor, renders the whole grid;
(s) ``--ray`` with 2 actors, ``grid_shard_cells=8``: 4 shards of 8 cells, then the build.

The Ray cluster is started in this process (``ray.init(address="local", num_cpus=2)``) and stopped
with it; every actor run pays for its actors' start (importing torch and diffusers, loading the
base). Prints the medians and the 1-minute load average before each run (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = """\
    name: big-grid
    base: builtin:tiny-sd
    adapters:
      style: {{builtin: tiny-sd/style, trigger_words: [watercolor]}}
      detail: builtin:tiny-sd/detail
    set_adapters:
      adapters: {{style: 0.7, detail: 0.5}}
    fuse: {{lora_scale: 0.8}}
    outputs:
      lora: {{kind: lora, adapter: style, path: lora}}
      grid: {{kind: grid, path: grid.png, prompts: [a cat, a house], seeds: [0, 1, 2, 3], steps: {steps},
             variants: [base, style, mix, fused]}}
    """


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    os.environ.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    os.environ["PYTHONPATH"] = str(REPO)  # the Ray workers import this checkout
    sys.path.insert(0, str(REPO))
    import ray

    from lorarecipe.fs.atomic import cache_root
    from lorarecipe.gitops.batch import BatchOptions, build_recipes

    work = Path(tempfile.mkdtemp(prefix="lorarecipe-shard-bench-"))
    recipe = work / "big-grid.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(steps=args.steps)))
    cells = cache_root() / "grid-cells"
    build_recipes([recipe], BatchOptions(out=work / "warmup", force=True), False)  # built-ins, imports
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    configs = {
        "l": "(l) here, no Ray",
        "u": "(u) Ray, not sharded (one build: 1 actor)",
        "s": "(s) Ray, 2 actors, 4 shards",
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
    try:
        for round_ in range(args.rounds):
            for key in configs:
                shutil.rmtree(cells, ignore_errors=True)
                load = os.getloadavg()[0]
                ray_options = {} if key == "l" else {"ray": "", "workers": 2}
                options = BatchOptions(
                    out=work / f"out-{key}-{round_}",
                    force=True,
                    grid_shard_cells=8 if key == "s" else 0,
                    **ray_options,  # type: ignore[arg-type]
                )
                started = time.perf_counter()
                (outcome,) = build_recipes([recipe], options, False)
                wall = time.perf_counter() - started
                assert outcome.ok, outcome.problems
                shards = (outcome.worker or {}).get("grid_shards", {}).get("grid", {}).get("rendered")
                results[key].append((wall, load))
                print(
                    f"round {round_} {key}: {wall:.1f} s, load avg {load:.1f}, shards {shards}",
                    file=sys.stderr,
                )
    finally:
        ray.shutdown()
    print(
        f"\n32-cell grid, {args.steps} steps, {args.rounds} rounds (median; load average before each run)\n"
    )
    print("| configuration | wall time | vs (u) | load avg |")
    print("|---|---|---|---|")
    unsharded = statistics.median(r[0] for r in results["u"])
    for key, name in configs.items():
        wall = statistics.median(r[0] for r in results[key])
        loads = ", ".join(f"{r[1]:.1f}" for r in results[key])
        print(f"| {name} | {wall:.1f} s | {wall / unsharded:.2f}× | {loads} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
