"""A batch of recipes for warm/Ray tests, cold reference builds in fresh processes, and comparisons.

Three recipe files, four builds on the built-in tiny SD base: different adapters, weights, merges
(cat, ties), a runtime mix, a lora_scale sweep, fuses and grids that show the fused model. A cold
reference builds one job in a fresh Python process with a pipeline loaded for it alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers.recipes import write_recipe

REPO = Path(__file__).resolve().parents[2]

RECIPES = {
    "mix.yaml": """\
        name: mix
        base: builtin:tiny-sd
        adapters:
          style: {builtin: tiny-sd/style, trigger_words: [watercolor]}
          detail: builtin:tiny-sd/detail
        merges:
          both: {method: cat, adapters: {style: 1.0, detail: 0.5}}
        set_adapters:
          adapters: {style: 0.7, detail: 0.5}
        fuse: {lora_scale: 1.0}
        outputs:
          fused: {kind: pipeline, path: fused}
          lora: {kind: lora, adapter: both, path: lora}
          grid: {kind: grid, path: grid.png, prompts: [a cat], seeds: [0, 1], steps: 2,
                 variants: [base, style, both, mix, fused]}
        """,
    "ties.yaml": """\
        name: ties
        base: builtin:tiny-sd
        adapters:
          toy: builtin:tiny-sd/toy
          pixel: builtin:tiny-sd/pixel
        merges:
          toy-pixel: {method: ties, density: 0.5, adapters: {toy: 1.0, pixel: 0.8}, components: [unet]}
        set_adapters:
          adapters: {toy: 0.8, pixel: 0.6}
        outputs:
          lora: {kind: lora, adapter: toy-pixel, layout: kohya, path: lora}
          grid: {kind: grid, path: grid.png, prompts: [a house], seeds: [3], steps: 2,
                 variants: [base, toy-pixel, mix], sweep: {lora_scale: [0.5, 1.5]}}
        """,
    "sweep.yaml": """\
        name: sweep
        matrix:
          s: [0.5, 1.0]
        base: builtin:tiny-sd
        adapters:
          style: builtin:tiny-sd/style
          pixel: builtin:tiny-sd/pixel
        set_adapters:
          adapters: {style: 0.9, pixel: 0.4}
        fuse: {lora_scale: "{{ s }}"}
        outputs:
          fused: {kind: pipeline, path: fused}
          checkpoint: {kind: single_file, path: fused.safetensors}
          grid: {kind: grid, path: grid.png, prompts: [a tree], seeds: [5], steps: 2,
                 variants: [base, mix, fused]}
        """,
}

#: (recipe file, matrix label) of every build, and its folder under a batch's output root
BUILDS = [("mix.yaml", ""), ("ties.yaml", ""), ("sweep.yaml", "s-0.5"), ("sweep.yaml", "s-1.0")]
FOLDERS = ["mix", "ties", "sweep/s-0.5", "sweep/s-1.0"]


def forget_rendered_cells() -> None:
    """Empty the grid cell cache, so that the next build renders every cell on its own pipeline
    (a comparison with cells the reference build cached would prove nothing)."""
    import shutil

    from lorarecipe.fs.atomic import cache_root

    shutil.rmtree(cache_root() / "grid-cells", ignore_errors=True)


def write_batch(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in RECIPES.items():
        write_recipe(folder, text, name)
    return folder


_COLD = """
import sys
from pathlib import Path
from lorarecipe.gitops.batch import BatchOptions, plan_jobs
from lorarecipe.gitops.jobs import run_job
recipe, out, label, executor = sys.argv[1:5]
options = BatchOptions(out=Path(out), executor=executor)
job = next(j for j in plan_jobs([Path(recipe)], options, True) if j.label == label)
outcome = run_job(job, options.settings)  # no warm pipelines: a pipeline loaded for this build alone
assert outcome.ok, outcome.problems
assert outcome.worker["pipeline"] == {"loaded": 1, "reused": 0, "worker_loads": 1}, outcome.worker
"""


def build_cold(recipes: Path, out: Path, executor: str = "diffusers") -> None:
    """Each build of the batch in its own fresh Python process (two at a time), into ``out``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pending = [
        [sys.executable, "-c", _COLD, str(recipes / name), str(out), label, executor]
        for name, label in BUILDS
    ]
    while pending:
        running = [
            subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) for cmd in pending[:2]
        ]
        pending = pending[2:]
        for process in running:
            _, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-3000:]


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but manifests and lorarecipe's bookkeeping."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and ".lorarecipe" not in p.relative_to(root).parts
    }


def comparable_manifest(path: Path) -> dict[str, Any]:
    """A manifest without what differs between any two runs: timings, the worker (host, pid, Ray ids,
    pipeline loaded or reused, its torch thread setting: a Ray actor uses the CPUs it reserved) and
    the streaming fuser's measurements (peak RSS, factor-cache hit)."""
    doc: dict[str, Any] = json.loads(path.read_text())
    doc.pop("timings_seconds")
    doc.pop("worker")
    doc.pop("threads")
    for entry in doc["outputs"].values():
        entry.pop("worker")
    for check in doc["checks"]["fuse"].values():
        check.pop("peak_rss_bytes", None)
        check.pop("lora_factors_from_cache", None)
    return doc


def assert_same_builds(a: Path, b: Path) -> None:
    """Every output file byte-identical, every manifest equal but for timings and worker ids."""
    hashes = file_hashes(a)
    assert hashes == file_hashes(b)
    for folder in FOLDERS:
        assert any(k.startswith(folder + "/") for k in hashes), folder
        assert comparable_manifest(a / folder / "manifest.json") == comparable_manifest(
            b / folder / "manifest.json"
        )


#: a grid of 2 prompts × 4 seeds × 4 variants = 32 cells (the fused column also renders its hidden
#: runtime equivalent): with --grid-shard-cells 8, 4 shards of one column × two batches of 4 rows
SHARDED_GRID = """\
    name: big-grid
    base: builtin:tiny-sd
    adapters:
      style: {builtin: tiny-sd/style, trigger_words: [watercolor]}
      detail: builtin:tiny-sd/detail
    set_adapters:
      adapters: {style: 0.7, detail: 0.5}
    fuse: {lora_scale: 0.8}
    outputs:
      lora: {kind: lora, adapter: style, path: lora}
      grid: {kind: grid, path: grid.png, prompts: [a cat, a house], seeds: [0, 1, 2, 3], steps: 2,
             variants: [base, style, mix, fused]}
    """
