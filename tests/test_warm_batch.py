"""Warm workers: a batch loads each base once, and every build equals the same build made alone.

The oracle is a cold build: each recipe × matrix build in its own fresh process, its pipeline loaded
for it alone. The warm batch runs the same builds one after another on one pipeline (different
adapters, merges, mixes, fuses and fused grids in turn), so any state a build leaves behind (a LoRA
layer, a fused weight, a hook, a scheduler setting) would change a later build's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorarecipe.gitops.batch import BatchOptions, build_recipes, plan_jobs
from lorarecipe.gitops.jobs import BuildJob, run_job
from lorarecipe.recipe.load import find_recipe_files
from tests.helpers.batch_builds import FOLDERS, assert_same_builds, forget_rendered_cells


@pytest.mark.slow
def test_warm_batch_is_byte_identical_to_each_build_alone(
    cold_batch: dict[str, Path], tmp_path: Path
) -> None:
    options = BatchOptions(out=tmp_path / "warm", executor="diffusers")
    forget_rendered_cells()
    outcomes = build_recipes(find_recipe_files([str(cold_batch["recipes"])]), options, several=True)
    assert [o.ok for o in outcomes] == [True] * 4, [o.problems for o in outcomes]
    # one pipeline load for the whole batch: every later build reused it
    assert [o.worker["pipeline"]["loaded"] for o in outcomes if o.worker] == [1, 0, 0, 0]
    assert_same_builds(cold_batch["cold"], tmp_path / "warm")
    for folder in FOLDERS:
        manifest = json.loads((tmp_path / "warm" / folder / "manifest.json").read_text())
        assert manifest["worker"]["pipeline"]["reused"] == (0 if folder == "mix" else 1)
        assert manifest["outputs"]["grid"]["compiled"] is None


def _fresh(pipe_path: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_warm_pipeline_after_a_build_equals_a_fresh_load(cold_batch: dict[str, Path], tmp_path: Path) -> None:
    """After a build that loaded, merged, mixed, fused and rendered, the warm pipeline handed to the
    next build equals a pipeline loaded afresh: same tensors bit for bit, no PEFT layer or config,
    the same module attributes and hooks, the same scheduler (config and state)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lorarecipe.builtin.materialize import builtin_base_path
    from lorarecipe.plan import LoadBase
    from lorarecipe.runner.pipeline.warm import WarmPipelines

    options = BatchOptions(out=tmp_path / "out", executor="diffusers")
    (job,) = plan_jobs([cold_batch["recipes"] / "mix.yaml"], options, False)
    assert isinstance(job, BuildJob)
    pipelines = WarmPipelines()
    assert run_job(job, options.settings, pipelines).ok
    base = job.plan.step("base")
    assert isinstance(base, LoadBase)
    path = builtin_base_path("tiny-sd")
    warm, _ = pipelines.acquire(base, path, None, "cpu")
    assert (pipelines.loads, pipelines.reuses, pipelines.reloads) == (1, 1, 0)
    fresh = _fresh(path)
    for name in ("unet", "text_encoder", "vae"):
        ours, theirs = getattr(warm, name), getattr(fresh, name)
        assert not any(isinstance(m, BaseTunerLayer) for m in ours.modules())
        assert not getattr(ours, "peft_config", None)
        mine = dict(ours.state_dict())
        assert mine.keys() == theirs.state_dict().keys()
        assert all(torch.equal(mine[k], v) for k, v in theirs.state_dict().items()), name
        modules = dict(theirs.named_modules())
        for key, module in ours.named_modules():
            assert sorted(vars(module)) == sorted(vars(modules[key])), (name, key)
            assert len(module._forward_hooks) == len(modules[key]._forward_hooks)
            assert len(module._forward_pre_hooks) == len(modules[key]._forward_pre_hooks)
    assert sorted(vars(warm)) == sorted(vars(fresh))
    assert dict(warm.scheduler.config) == dict(fresh.scheduler.config)
    assert sorted(vars(warm.scheduler)) == sorted(vars(fresh.scheduler))
    assert torch.equal(warm.scheduler.timesteps, fresh.scheduler.timesteps)
    assert warm.get_list_adapters() == {} and not getattr(warm, "_merged_adapters", set())
    # a fast tokenizer keeps the last call's padding/truncation: it must be the loaded one again
    assert warm.tokenizer.backend_tokenizer.to_str() == fresh.tokenizer.backend_tokenizer.to_str()


@pytest.mark.slow
def test_a_warm_pipeline_that_cannot_be_proven_pristine_is_reloaded(tmp_path: Path) -> None:
    import torch

    from lorarecipe.builtin.materialize import builtin_base_path
    from lorarecipe.compiler import compile_recipe
    from lorarecipe.plan import LoadBase
    from lorarecipe.recipe.load import load_recipe
    from lorarecipe.runner.pipeline.warm import WarmPipelines
    from tests.helpers.recipes import DEMO_LIKE, write_recipe

    base = compile_recipe(load_recipe(write_recipe(tmp_path, DEMO_LIKE))).step("base")
    assert isinstance(base, LoadBase)
    path = builtin_base_path("tiny-sd")
    pipelines = WarmPipelines()
    first, _ = pipelines.acquire(base, path, None, "cpu")
    first.unet.register_forward_hook(lambda *args: None)  # something cleaning cannot undo
    second, _ = pipelines.acquire(base, path, None, "cpu")
    assert second is not first and (pipelines.loads, pipelines.reloads) == (2, 1)
    first, _ = pipelines.acquire(base, path, None, "cpu")
    assert first is second and pipelines.reuses == 1
    first.to(dtype=torch.float16)  # a cast: a different pipeline now
    assert pipelines.acquire(base, path, None, "cpu")[0] is not first and pipelines.loads == 3


@pytest.mark.slow
def test_a_saved_pipeline_does_not_depend_on_whether_its_grid_was_rendered(tmp_path: Path) -> None:
    """The grid's calls leave padding/truncation on the fast tokenizer, which save_pretrained writes
    into tokenizer.json; with every cell cached the grid makes no call. The saved pipeline holds the
    tokenizer as loaded either way."""
    from lorarecipe.cli import main
    from tests.helpers.recipes import DEMO_LIKE, write_recipe

    text = (
        DEMO_LIKE
        + "  grid: {kind: grid, path: grid.png, prompts: [a cat], seeds: [0], steps: 2, variants: [mix]}\n"
    )
    recipe = write_recipe(tmp_path, text)
    forget_rendered_cells()
    for out in ("rendered", "cached"):
        assert (
            main(["build", str(recipe), "--out", str(tmp_path / out), "--executor", "diffusers", "--quiet"])
            == 0
        )
    manifest = json.loads((tmp_path / "cached" / "manifest.json").read_text())
    assert manifest["outputs"]["grid"]["files"]  # built from cached cells: no pipeline call at all
    tokenizer = "fused/tokenizer/tokenizer.json"
    assert (tmp_path / "rendered" / tokenizer).read_bytes() == (tmp_path / "cached" / tokenizer).read_bytes()
