"""Grid shards planned on the driver (fast, no cluster, no torch): whole (column, batch) units of the
grid's own batching, at most N cells each, covering every visible cell exactly once; the build waits
for its shards. The Ray runs that render them are in ``test_ray_batch``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from lorarecipe.cli import main
from lorarecipe.gitops.batch import BatchOptions, plan_jobs
from lorarecipe.gitops.cluster import _pick, _Slot
from lorarecipe.gitops.jobs import BuildJob
from lorarecipe.gitops.shards import plan_shards
from tests.helpers.batch_builds import REPO, SHARDED_GRID
from tests.helpers.recipes import write_recipe


def _job(tmp_path: Path) -> BuildJob:
    recipe = write_recipe(tmp_path, SHARDED_GRID)
    (job,) = plan_jobs([recipe], BatchOptions(out=tmp_path / "out"), several=False)
    assert isinstance(job, BuildJob)
    return job


def test_a_big_grid_splits_into_whole_batches_of_at_most_n_cells(tmp_path: Path) -> None:
    job = _job(tmp_path)
    shards = plan_shards(job, {"grid", "lora"}, 8)
    # 2 prompts × 4 seeds = 8 rows = 2 batches of 4; 4 visible columns (the runtime column is hidden)
    assert [(s.number, s.units, s.cells) for s in shards] == [
        (0, ((0, 0), (0, 1)), 8),
        (1, ((1, 0), (1, 1)), 8),
        (2, ((2, 0), (2, 1)), 8),
        (3, ((3, 0), (3, 1)), 8),
    ]
    assert {s.output for s in shards} == {"grid"} and all(s.group == job.group for s in shards)
    # a shard holds at least one batch (4 cells): N below that gives one batch per shard
    assert [s.cells for s in plan_shards(job, {"grid"}, 5)] == [4] * 8
    wider = plan_shards(job, {"grid"}, 12)  # whole batches only, each visible one exactly once
    assert [s.cells for s in wider] == [12, 12, 8]
    assert sorted(u for s in wider for u in s.units) == [(c, b) for c in range(4) for b in range(2)]
    assert plan_shards(job, {"grid"}, 32) == []  # not more than N cells: not split
    assert plan_shards(job, {"grid"}, 0) == []  # --grid-shard-cells 0
    assert plan_shards(job, {"lora"}, 8) == []  # the grid is up to date


def test_a_build_waits_for_its_shards(tmp_path: Path) -> None:
    job = _job(tmp_path)
    first, *_ = plan_shards(job, {"grid"}, 8)
    slot = _Slot(actor=None)
    pending: deque[Any] = deque([job])
    assert _pick(pending, slot, [slot], set(), {job.index: 1}) is None  # a shard is still running
    pending.appendleft(first)
    assert _pick(pending, slot, [slot], set(), {job.index: 1}) is first
    assert _pick(pending, slot, [slot], set(), {job.index: 0}) is job


def test_planning_shards_imports_no_torch(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, SHARDED_GRID)
    code = (
        "import sys, json; from pathlib import Path\n"
        "from lorarecipe.gitops.batch import BatchOptions, plan_jobs\n"
        "from lorarecipe.gitops.cluster import run_on_ray\n"
        "from lorarecipe.gitops.shards import plan_shards\n"
        f"(job,) = plan_jobs([Path({str(recipe)!r})], BatchOptions(), False)\n"
        "shards = plan_shards(job, {'grid'}, 8)\n"
        "print(json.dumps([len(shards), [m for m in ('torch', 'diffusers', 'peft') if m in sys.modules]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [4, []]


def test_grid_shard_cells_is_a_ray_option_and_not_negative(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = str(write_recipe(tmp_path, SHARDED_GRID))
    out = str(tmp_path / "out")
    assert main(["build", recipe, "--out", out, "--grid-shard-cells", "0"]) == 2
    assert "--grid-shard-cells apply to --ray builds only" in capsys.readouterr().err
    assert main(["build", recipe, "--out", out, "--ray", "--grid-shard-cells", "-1"]) == 2
    assert "--grid-shard-cells must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
