"""Ray: a batch built on a local Ray cluster's actors equals the same batch built locally.

A local cluster on CPU (``ray.init(num_cpus=2)``), two actors, the batch of ``test_warm_batch``
(four builds, compared with each build made alone in a fresh process). One worker is killed half-way
through a build (after it wrote an output): the build is retried on a fresh actor and its files are
still byte-identical. A 32-cell grid split into 4 shards is rendered by both actors and equals the
grid built locally, also when one shard's worker dies twice and the build renders its cells. An
address where no cluster answers is a clear error, exit 2, no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorarecipe.gitops.batch import BatchOptions, build_recipes
from lorarecipe.recipe.load import find_recipe_files
from tests.helpers.batch_builds import (
    FOLDERS,
    REPO,
    SHARDED_GRID,
    assert_same_builds,
    comparable_manifest,
    file_hashes,
    forget_rendered_cells,
    write_batch,
)
from tests.helpers.recipes import write_recipe

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'lorarecipe[ray]')")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> object:
    marker = tmp_path_factory.mktemp("faults") / "killed"
    ray.init(
        address="local",  # a new cluster for the tests, even if one runs on this machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": str(REPO),
                "LORARECIPE_TEST_KILL_MARKER": str(marker),
                "LORARECIPE_TEST_KILL_BUILD": "sweep/s-1.0",
                "LORARECIPE_TEST_SHARD_MARKER": str(marker.with_name("shard-killed")),
                "LORARECIPE_TEST_KILL_SHARD": "faulty",
            },
            "worker_process_setup_hook": "tests.helpers.ray_faults.install",
        },
    )
    yield marker
    ray.shutdown()


def test_ray_batch_equals_each_build_alone_even_after_a_worker_dies(
    cluster: Path, cold_batch: dict[str, Path], tmp_path: Path
) -> None:
    recipes = cold_batch["recipes"]
    broken = _recipe_with_a_nan_lora(tmp_path / "broken")
    options = BatchOptions(out=tmp_path / "ray", executor="diffusers", ray="", workers=2)
    forget_rendered_cells()
    outcomes = build_recipes([*find_recipe_files([str(recipes)]), broken], options, several=True)
    assert [o.ok for o in outcomes] == [True] * 4 + [False], [o.problems for o in outcomes]
    # a build that fails on its worker is reported, located, and stops nothing
    assert "NaN/Inf" in outcomes[-1].problems[0].message and outcomes[-1].problems[0].span is not None
    assert cluster.is_file()  # a worker was killed in the middle of sweep/s-1.0 ...
    killed = int(cluster.read_text())
    retried = next(o for o in outcomes if o.build == "s-1.0")
    assert retried.worker is not None and retried.worker["pid"] != killed  # ... and it was rebuilt elsewhere
    assert_same_builds(cold_batch["cold"], tmp_path / "ray")
    actors = set()
    for folder in FOLDERS:
        manifest = json.loads((tmp_path / "ray" / folder / "manifest.json").read_text())
        assert manifest["build_complete"] is True and manifest["worker"]["ray_actor_id"]
        actors.add(manifest["worker"]["ray_actor_id"])
        assert {e["worker"] for e in manifest["outputs"].values()} == {
            f"{manifest['worker']['hostname']}/{manifest['worker']['pid']}/{manifest['worker']['ray_actor_id'][:12]}"
        }
    assert len(actors) >= 2
    # nothing changed: a second run skips every build on the driver and starts no actor
    again = build_recipes(find_recipe_files([str(recipes)]), options, several=True)
    assert [(o.ok, o.outputs, o.worker) for o in again[:4]] == [(True, [], None)] * 4


def test_grid_shards_render_on_both_workers_and_equal_a_local_build(cluster: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, SHARDED_GRID)
    forget_rendered_cells()
    local = tmp_path / "local"
    (built,) = build_recipes([recipe], BatchOptions(out=local, executor="diffusers"), several=False)
    assert built.ok, built.problems
    assert built.worker is not None and "grid_shards" not in built.worker  # no Ray: no shards
    for name, retries in [("sharded", 2), ("faulty", 1)]:
        forget_rendered_cells()  # every cell rendered by the shards (or the build), none reused
        options = BatchOptions(out=tmp_path / name, executor="diffusers", ray="", workers=2, retries=retries)
        (outcome,) = build_recipes([recipe], options, several=False)
        assert outcome.ok, outcome.problems
        assert file_hashes(tmp_path / name) == file_hashes(local)
        manifest = tmp_path / name / "manifest.json"
        assert comparable_manifest(manifest) == comparable_manifest(local / "manifest.json")
        shards = json.loads(manifest.read_text())["worker"]["grid_shards"]["grid"]
        assert outcome.worker is not None and outcome.worker["grid_shards"]["grid"] == shards
        assert (shards["shards"], shards["cells"]) == (4, 2 * 4 * 4)  # prompts × seeds × variants
        if name == "sharded":  # both actors rendered shards, and the shards rendered every cell
            assert shards["failed"] == [] and len(shards["rendered"]) == 2, shards
            assert sum(shards["rendered"].values()) == 32 and min(shards["rendered"].values()) >= 8
        else:  # the first shard's worker died twice: given up, its 8 cells rendered by the build itself
            assert [f["shard"] for f in shards["failed"]] == [0], shards
            assert "died 2 times" in shards["failed"][0]["problem"]
            assert sum(shards["rendered"].values()) == 24
            assert (cluster.with_name("shard-killed-1")).is_file()
            assert (cluster.with_name("shard-killed-2")).is_file()


def _recipe_with_a_nan_lora(folder: Path) -> Path:
    """A recipe that compiles (headers are fine) but fails on the worker: a LoRA tensor holds a NaN."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lorarecipe.builtin.materialize import builtin_lora_path

    folder.mkdir()
    source = str(builtin_lora_path("tiny-sd/toy"))
    with safe_open(source, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(source)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(folder / "nan.safetensors"), metadata=metadata)
    return write_recipe(
        folder,
        "name: broken\nbase: builtin:tiny-sd\nadapters:\n  nan: {file: nan.safetensors}\n"
        "outputs:\n  lora: {kind: lora, adapter: nan, path: lora}\n",
        "broken.yaml",
    )


def test_an_unreachable_ray_address_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    recipes = write_batch(tmp_path / "recipes")
    address = f"127.0.0.1:{port}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorarecipe",
            "build",
            str(recipes),
            "--out",
            str(tmp_path / "out"),
            "--ray",
            address,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert address in result.stderr and "no Ray cluster answers" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
