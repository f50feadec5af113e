"""``lorarecipe lock``: inputs pinned to commits and hashes, offline, against a real Hugging Face cache.

The cache is laid out the way huggingface_hub writes it (``models--org--name/refs/<branch or tag>``
holding a commit SHA, ``snapshots/<sha>/…`` symlinked into ``blobs/``); huggingface_hub and diffusers
resolve from it for real, nothing of lorarecipe is mocked. Expected SHAs, hashes and sizes are computed
here from the source files, independently of lorarecipe's hashing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.cli.commands import cmd_lock as lock_command
from lorarecipe.compiler import compile_recipe
from lorarecipe.errors import InputUnavailableError, IntegrityError, LockError
from lorarecipe.gitops.lock import (
    LockFile,
    check_lock_current,
    create_lock,
    lock_path,
    pinned_source,
    read_lock,
    resolve_frozen,
    verify_input_files,
    write_lock,
)
from lorarecipe.plan import Plan, Source
from lorarecipe.recipe.load import load_recipe
from tests.helpers.hubcache import add_commit, tree
from tests.helpers.recipes import write_recipe

BASE_REPO, LORA_REPO = "lorarecipe-lock/tiny-sd", "lorarecipe-lock/loras"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Base: one commit (main and tag v1) holding, besides the pipeline, files diffusers does not load.
    LoRAs: tag v1 -> style weights, main -> a later commit with other weights under the same name."""
    junk = tmp_path_factory.mktemp("junk")
    (junk / "README.md").write_text("# tiny\n")
    (junk / "weights.bin").write_bytes(b"pickle, never read")
    files = tree(builtin_base_path("tiny-sd"))
    extras = {
        "README.md": junk / "README.md",
        ".gitattributes": junk / "README.md",
        "unet/diffusion_pytorch_model.bin": junk / "weights.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors": files["unet/diffusion_pytorch_model.safetensors"],
    }
    return {
        "base": add_commit(BASE_REPO, {**files, **extras}, ("main", "v1"), label="base"),
        "lora_v1": add_commit(
            LORA_REPO, {"style.safetensors": builtin_lora_path("tiny-sd/style")}, ("v1",), "1"
        ),
        "lora_main": add_commit(
            LORA_REPO, {"style.safetensors": builtin_lora_path("tiny-sd/detail")}, ("main",), "2"
        ),
    }


RECIPE = """\
base: {hub: lorarecipe-lock/tiny-sd, revision: v1}
adapters:
  tagged: {hub: lorarecipe-lock/loras, weight_name: style.safetensors, revision: v1}
  latest: {hub: lorarecipe-lock/loras, weight_name: style.safetensors}
  mine: {file: loras/mine.safetensors}
  detail: builtin:tiny-sd/detail
set_adapters:
  adapters: {tagged: 1.0, latest: 0.5, mine: 0.5, detail: 0.5}
fuse: {lora_scale: 1.0}
outputs:
  fused: {kind: pipeline, path: fused}
"""


@pytest.fixture
def recipe(tmp_path: Path, hub: dict[str, str]) -> Path:
    (tmp_path / "loras").mkdir()
    shutil.copyfile(builtin_lora_path("tiny-sd/style"), tmp_path / "loras" / "mine.safetensors")
    return write_recipe(tmp_path, RECIPE, "demo.yaml")


def _plan(recipe: Path) -> Plan:
    return compile_recipe(load_recipe(recipe))


def _files(lock: LockFile, step: str) -> dict[str, tuple[str, int]]:
    entry = next(i for i in lock.inputs if i.step == step)
    return {f.path: (f.sha256, f.size) for f in entry.files}


def _expected(sources: dict[str, Path]) -> dict[str, tuple[str, int]]:
    return {name: (_sha256(p), p.stat().st_size) for name, p in sources.items()}


def test_lock_pins_commits_and_hashes_every_file(recipe: Path, hub: dict[str, str]) -> None:
    lock = create_lock(recipe)
    inputs = {i.step: i for i in lock.inputs}
    assert sorted(inputs) == ["adapter:detail", "adapter:latest", "adapter:mine", "adapter:tagged", "base"]
    assert lock.recipe_sha256 == _sha256(recipe)
    assert lock.plan_fingerprints == (_plan(recipe).fingerprint(),)

    base = inputs["base"]
    assert (base.kind, base.ref, base.requested_revision, base.commit) == (
        "hub",
        BASE_REPO,
        "v1",
        hub["base"],
    )
    # exactly the pipeline diffusers loads: no README, no .bin, no fp16 variant, no hidden file
    assert _files(lock, "base") == _expected(tree(builtin_base_path("tiny-sd")))

    tagged, latest = inputs["adapter:tagged"], inputs["adapter:latest"]
    assert (tagged.commit, tagged.requested_revision, tagged.filename) == (
        hub["lora_v1"],
        "v1",
        "style.safetensors",
    )
    assert (latest.commit, latest.requested_revision) == (hub["lora_main"], None)
    assert _files(lock, "adapter:tagged") == _expected(
        {"style.safetensors": builtin_lora_path("tiny-sd/style")}
    )
    assert _files(lock, "adapter:latest") == _expected(
        {"style.safetensors": builtin_lora_path("tiny-sd/detail")}
    )

    mine = inputs["adapter:mine"]
    assert (mine.kind, mine.ref, mine.commit) == ("local", "loras/mine.safetensors", None)
    assert _files(lock, "adapter:mine") == _expected(
        {"mine.safetensors": recipe.parent / "loras/mine.safetensors"}
    )
    assert inputs["adapter:detail"].kind == "builtin"
    assert _files(lock, "adapter:detail") == _expected(
        {"detail.safetensors": builtin_lora_path("tiny-sd/detail")}
    )


def test_lock_file_is_canonical_deterministic_and_machine_independent(recipe: Path) -> None:
    first = write_lock(recipe, create_lock(recipe))
    assert first == recipe.parent / "demo.lock.json" == lock_path(recipe)
    text = first.read_text(encoding="utf-8")
    again = write_lock(recipe, create_lock(recipe)).read_text(encoding="utf-8")
    assert text == again
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert doc["lorarecipe_lock"] == 1
    from huggingface_hub import constants

    for where in (str(recipe.parent), str(constants.HF_HUB_CACHE), str(Path.home()), "/tmp"):
        assert where not in text
    assert all(not f["path"].startswith("/") for i in doc["inputs"] for f in i["files"])
    assert read_lock(recipe) == create_lock(recipe)


def test_check_lock_current_names_what_changed(recipe: Path, hub: dict[str, str]) -> None:
    lock = create_lock(recipe)
    assert check_lock_current(recipe, lock, [_plan(recipe)]) == []

    changed = (
        RECIPE.replace("revision: v1}\nadapters", f"revision: {hub['base']}}}\nadapters")
        .replace("  detail: builtin:tiny-sd/detail\n", "  extra: builtin:tiny-sd/style\n")
        .replace("detail: 0.5}", "extra: 0.5}")
    )
    write_recipe(recipe.parent, changed, "demo.yaml")
    reasons = check_lock_current(recipe, lock, [_plan(recipe)])
    assert reasons[0].startswith(f"{recipe} changed since it was locked")
    assert f"base: revision v1 -> {hub['base']} (hub {BASE_REPO})" in reasons
    assert "adapter:extra: input added (builtin tiny-sd/style)" in reasons
    assert "adapter:detail: input removed (builtin tiny-sd/detail)" in reasons
    assert len(reasons) == 4


def test_lock_command_writes_and_checks(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(recipe=str(recipe), check=True, set=None, allow_read=[])
    with pytest.raises(LockError, match=r"no lock file for .*run `lorarecipe lock "):
        lock_command(args)
    assert lock_command(argparse.Namespace(**{**vars(args), "check": False})) == 0
    assert f"wrote {lock_path(recipe)} (5 inputs, 14 files)" in capsys.readouterr().err
    assert lock_command(args) == 0
    recipe.write_text(RECIPE.replace("latest: 0.5", "latest: 0.25"), encoding="utf-8")
    with pytest.raises(LockError) as info:
        lock_command(args)
    assert len(info.value.problems) == 1  # the recipe changed; its plan did too, but that is one reason
    assert info.value.problems[0].message.startswith(
        f"{lock_path(recipe)} is stale: {recipe} changed since it was locked (sha256 "
    )
    assert info.value.problems[0].hint == f"run `lorarecipe lock {recipe}` to update it"


def test_frozen_inputs_are_pinned_and_verified(recipe: Path, hub: dict[str, str]) -> None:
    lock = create_lock(recipe)
    plan = _plan(recipe)
    resolved = resolve_frozen(plan, lock, recipe.parent)
    assert resolved["base"].commit == hub["base"] and resolved["base"].path.name == hub["base"]
    assert resolved["adapter:latest"].commit == hub["lora_main"]
    assert resolved["adapter:tagged"].source == Source("hub", LORA_REPO, "v1", "style.safetensors")
    assert pinned_source(next(i for i in lock.inputs if i.step == "adapter:tagged")) == Source(
        "hub", LORA_REPO, hub["lora_v1"], "style.safetensors"
    )

    mine = recipe.parent / "loras" / "mine.safetensors"
    expected = _sha256(mine)
    data = bytearray(mine.read_bytes())
    data[-1] ^= 1  # same size, one bit flipped
    mine.write_bytes(bytes(data))
    locked = next(i for i in lock.inputs if i.step == "adapter:mine")
    with pytest.raises(IntegrityError) as info:
        verify_input_files(locked, mine)
    message = str(info.value)
    assert "loras/mine.safetensors" in message
    assert f"expected sha256 {expected}, found {_sha256(mine)}" in message
    with pytest.raises(IntegrityError, match=r"loras/mine\.safetensors changed since it was locked"):
        resolve_frozen(plan, lock, recipe.parent)


def test_local_folder_base_and_matrix(tmp_path: Path) -> None:
    shutil.copytree(builtin_base_path("tiny-sd"), tmp_path / "mybase")
    (tmp_path / "mybase" / ".DS_Store").write_text("hidden")
    text = """\
matrix: {scale: [0.5, 1.0]}
base: {path: mybase}
adapters:
  style: builtin:tiny-sd/style
fuse: {adapters: [style], lora_scale: "{{ scale }}"}
outputs:
  fused: {kind: pipeline, path: fused}
"""
    recipe = write_recipe(tmp_path, text)
    lock = create_lock(recipe)
    assert len(lock.plan_fingerprints) == 2 and len(set(lock.plan_fingerprints)) == 2
    assert [i.step for i in lock.inputs] == ["adapter:style", "base"]  # shared by both builds: once
    assert _files(lock, "base") == _expected(tree(builtin_base_path("tiny-sd")))
    (tmp_path / "mybase" / "unet" / "extra.safetensors").write_bytes(b"new")
    base = next(i for i in lock.inputs if i.step == "base")
    with pytest.raises(IntegrityError, match=r"local mybase: unet/extra.safetensors is not in the lock"):
        verify_input_files(base, tmp_path / "mybase")


def test_builtin_base_is_locked(tmp_path: Path) -> None:
    text = "base: builtin:tiny-sd\nadapters: {s: builtin:tiny-sd/style}\noutputs:\n  l: {kind: lora, adapter: s, path: l}\n"
    lock = create_lock(write_recipe(tmp_path, text))
    assert [(i.step, i.kind, i.ref, i.commit) for i in lock.inputs][1:] == [
        ("base", "builtin", "tiny-sd", None)
    ]
    assert _files(lock, "base") == _expected(tree(builtin_base_path("tiny-sd")))


def test_missing_lock_names_file_and_fix(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "base: builtin:tiny-sd\n", "nolock.yaml")
    with pytest.raises(LockError) as info:
        read_lock(recipe)
    assert str(info.value) == (
        f"{tmp_path / 'nolock.lock.json'}: no lock file for {recipe}; run `lorarecipe lock {recipe}` to (re)create it"
    )
    lock_path(recipe).write_text('{"lorarecipe_lock": 1, "inputs": "oops"}')
    with pytest.raises(LockError, match=r"nolock.lock.json: unreadable lock file .*run `lorarecipe lock "):
        read_lock(recipe)


def test_revision_not_in_cache_is_unavailable(recipe: Path) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    write_recipe(
        recipe.parent,
        RECIPE.replace("style.safetensors, revision: v1", "style.safetensors, revision: v9"),
        "demo.yaml",
    )
    with pytest.raises(InputUnavailableError) as info:
        create_lock(recipe)
    assert str(info.value) == (
        f"hub input {LORA_REPO}/style.safetensors @ v9 is not available: HF_HUB_OFFLINE is set and it is not in "
        f"the local Hugging Face cache. fetch it first with `hf download {LORA_REPO} style.safetensors --revision v9` "
        "(or build online without HF_HUB_OFFLINE=1)"
    )
    write_recipe(
        recipe.parent, RECIPE.replace("revision: v1}\nadapters", "revision: v2}\nadapters"), "demo.yaml"
    )
    with pytest.raises(InputUnavailableError, match=f"hf download {BASE_REPO} --revision v2"):
        create_lock(recipe)


def test_variant_locks_the_variant_weights_diffusers_picks(recipe: Path) -> None:
    """unet has an fp16 file, the other components do not: diffusers loads fp16 there, the rest as is."""
    lock = create_lock(recipe)
    write_recipe(
        recipe.parent, RECIPE.replace("revision: v1}", "revision: v1, variant: fp16}", 1), "demo.yaml"
    )
    fp16 = create_lock(recipe)
    expected = tree(builtin_base_path("tiny-sd"))
    expected["unet/diffusion_pytorch_model.fp16.safetensors"] = expected.pop(
        "unet/diffusion_pytorch_model.safetensors"
    )
    assert _files(fp16, "base") == _expected(expected)
    reasons = check_lock_current(recipe, lock, [_plan(recipe)])
    assert f"base: variant None -> fp16 (hub {BASE_REPO})" in reasons


def test_checking_a_lock_never_imports_torch(recipe: Path) -> None:
    """``lock --check`` runs in CI before any model is needed: reading and comparing stay torch-free."""
    write_lock(recipe, create_lock(recipe))
    code = (
        "import sys, argparse; from lorarecipe.cli.commands import cmd_lock as lock_command; "
        f"assert lock_command(argparse.Namespace(recipe={str(recipe)!r}, check=True, set=None, allow_read=[])) == 0; "
        "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers', 'huggingface_hub') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
