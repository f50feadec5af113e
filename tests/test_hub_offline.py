"""Hub inputs through the real huggingface_hub/diffusers code, offline, against a real cache layout.

The cache is built the way huggingface_hub lays it out (``models--org--name/refs/<ref>`` holding a
commit SHA, ``snapshots/<sha>/…`` linking into ``blobs/``); nothing of lorarecipe is mocked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.cli import main
from lorarecipe.fs.hubcache import cached_file, hub_cache_dir
from tests.helpers.hubcache import add_commit, tree
from tests.helpers.recipes import build_text, compile_text, write_recipe


@pytest.fixture(scope="module")
def hub_repos() -> dict[str, str]:
    base_sha = add_commit("lorarecipe-test/tiny-sd", tree(builtin_base_path("tiny-sd")), ("main", "v1"))
    lora_sha = add_commit("lorarecipe-test/loras", {"style.safetensors": builtin_lora_path("tiny-sd/style")})
    return {"base": base_sha, "lora": lora_sha}


RECIPE = """\
base: {hub: lorarecipe-test/tiny-sd, revision: v1}
adapters:
  style: {hub: lorarecipe-test/loras, weight_name: style.safetensors}
fuse: {adapters: [style], lora_scale: 1.0}
outputs:
  fused: {kind: pipeline, path: fused}
"""


def test_cache_lookup_agrees_with_huggingface_hub(hub_repos: dict[str, str]) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    assert hub_cache_dir() == Path(constants.HF_HUB_CACHE)
    for repo, name, rev in [
        ("lorarecipe-test/tiny-sd", "model_index.json", "v1"),
        ("lorarecipe-test/tiny-sd", "unet/config.json", hub_repos["base"]),
        ("lorarecipe-test/loras", "style.safetensors", None),
        ("lorarecipe-test/loras", "nope.safetensors", None),
        ("lorarecipe-test/tiny-sd", "model_index.json", "v2"),
        ("nobody/nothing", "x.json", None),
    ]:
        theirs = try_to_load_from_cache(repo, name, revision=rev)
        ours = cached_file(repo, name, rev)
        assert (ours[1] if ours else None) == (Path(theirs) if isinstance(theirs, str) else None), (
            repo,
            name,
            rev,
        )


def test_cached_hub_inputs_are_checked_statically(tmp_path: Path, hub_repos: dict[str, str]) -> None:
    plan = compile_text(tmp_path, RECIPE)
    statuses = {c.subject: c.status for c in plan.checks}
    assert statuses["base"] == "ok" and statuses["adapters.style"] == "ok"
    assert plan.family is None  # a StableDiffusionPipeline 32 wide: SD 1.x or 2.x cannot be told apart


def test_build_from_the_cache_offline_records_the_commits(tmp_path: Path, hub_repos: dict[str, str]) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    build_text(tmp_path, RECIPE)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    inputs = {i["step"]: i for i in manifest["inputs"]}
    assert inputs["base"]["requested_revision"] == "v1"
    assert inputs["base"]["resolved_commit"] == hub_repos["base"]
    assert inputs["adapter:style"]["resolved_commit"] == hub_repos["lora"]
    assert (tmp_path / "out" / "fused" / "model_index.json").is_file()


def test_missing_hub_model_names_repo_revision_and_fix(
    tmp_path: Path, hub_repos: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_recipe(tmp_path, RECIPE.replace("revision: v1", "revision: v2"))
    assert main(["build", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "hub input lorarecipe-test/tiny-sd @ v2 is not available" in err
    assert "hf download lorarecipe-test/tiny-sd --revision v2" in err
    assert f"{path}:1:1: error: base:" in err.replace(str(Path.cwd()) + "/", "")
    assert not (tmp_path / "out" / "fused").exists()


def test_a_complete_cached_snapshot_resolves_as_diffusers_does(hub_repos: dict[str, str]) -> None:
    """The cache fast path (no diffusers import) finds the folder DiffusionPipeline.download finds."""
    from diffusers import DiffusionPipeline

    from lorarecipe.plan import Source
    from lorarecipe.runner.inputs import cached_pipeline

    for revision in ("v1", hub_repos["base"]):
        ours = cached_pipeline(Source("hub", "lorarecipe-test/tiny-sd", revision), None)
        theirs = DiffusionPipeline.download(
            "lorarecipe-test/tiny-sd", revision=revision, use_safetensors=True
        )
        assert ours is not None and ours.commit == hub_repos["base"]
        assert ours.path == Path(theirs)


def test_an_incomplete_snapshot_or_a_branch_online_goes_through_diffusers(
    hub_repos: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorarecipe.plan import Source
    from lorarecipe.runner.inputs import cached_pipeline

    files = tree(builtin_base_path("tiny-sd"))
    partial = {k: v for k, v in files.items() if not k.startswith("unet/diffusion_pytorch_model")}
    sha = add_commit("lorarecipe-test/partial", partial, label="partial")
    assert cached_pipeline(Source("hub", "lorarecipe-test/partial", sha), None) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, a branch may have moved: ask the hub
    assert cached_pipeline(Source("hub", "lorarecipe-test/tiny-sd", "v1"), None) is None
    assert cached_pipeline(Source("hub", "lorarecipe-test/tiny-sd", hub_repos["base"]), None) is not None
