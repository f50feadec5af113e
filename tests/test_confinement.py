"""Issue 12, reads and writes outside the allowed folders, and nothing lost: end to end through the CLI.

Every case is armed: a secret file lies outside the recipe's folder (its content must never appear
in any output or message), a marker folder outside ``--out`` must stay empty, and an input the build
must not touch is hashed before and after. The answer to a hostile input is exit 1 with a message
naming the path, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.cli import main
from tests.helpers.cli import Cli

SECRET = "lorarecipe-confinement-secret-51c9"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    (tmp_path / "project").mkdir()
    return Cli(capsys, tmp_path / "project")


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the recipe's folder that nothing may read or copy."""
    path = tmp_path / "outside" / "secret.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"token": SECRET}), encoding="utf-8")
    return path


def _base(folder: Path) -> Path:
    """A private copy of the built-in tiny SD base as a local diffusers folder."""
    target = folder / "base"
    shutil.copytree(builtin_base_path("tiny-sd"), target)
    return target


def _lora(folder: Path, name: str = "style.safetensors") -> Path:
    target = folder / name
    shutil.copyfile(builtin_lora_path("tiny-sd/style"), target)
    return target


LOCAL = """\
base: {path: base}
adapters:
  style: {file: style.safetensors}
fuse: {adapters: [style]}
outputs:
  fused: {kind: pipeline, path: fused}
"""


def _everything(root: Path) -> bytes:
    """The bytes of every regular file under ``root`` (to search outputs for the secret)."""
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- a local base folder is input too -----------------------------------------------------------


@pytest.mark.parametrize("name", ["..", "../escape", "/abs", "a/b", "tok\\en"])
def test_component_names_that_are_not_plain_folder_names_are_refused(cli: Cli, name: str) -> None:
    base = _base(cli.folder)
    _lora(cli.folder)
    index = json.loads((base / "model_index.json").read_text())
    index[name] = ["transformers", "CLIPTokenizer"]
    (base / "model_index.json").write_text(json.dumps(index))
    cli.refused(cli("validate", str(cli.recipe(LOCAL))), "is not a plain folder name")
    cli.refused(cli.build(LOCAL), "is not a plain folder name")
    assert not (cli.folder / "out" / "fused").exists()


@pytest.mark.parametrize("where", ["tokenizer/vocab.json", "extra.txt", "unet/notes/readme.txt"])
def test_a_symlink_out_of_the_base_folder_is_refused_and_never_copied(
    cli: Cli, secret: Path, where: str
) -> None:
    base = _base(cli.folder)
    _lora(cli.folder)
    link = base / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    cli.refused(cli("validate", str(cli.recipe(LOCAL))), "outside the folders it may be read from")
    for executor in ("auto", "diffusers"):
        cli.refused(cli.build(LOCAL, "--executor", executor), "outside the folders it may be read from")
        assert SECRET not in cli.text
    out = cli.folder / "out"
    assert not out.exists() or SECRET.encode() not in _everything(out)


def test_a_symlink_to_a_folder_outside_is_refused(cli: Cli, secret: Path) -> None:
    base = _base(cli.folder)
    _lora(cli.folder)
    (base / "vae" / "more").symlink_to(secret.parent, target_is_directory=True)
    cli.refused(cli.build(LOCAL), "outside the folders it may be read from")
    assert SECRET.encode() not in _everything(cli.folder)


def test_symlinks_that_stay_inside_the_allowed_roots_are_fine(cli: Cli, tmp_path: Path) -> None:
    """A base folder may link to files elsewhere in the recipe's folder, or in a --allow-read one."""
    base = _base(cli.folder)
    _lora(cli.folder)
    shared = tmp_path / "shared-configs"
    shared.mkdir()
    os.replace(base / "scheduler" / "scheduler_config.json", shared / "scheduler_config.json")
    (base / "scheduler" / "scheduler_config.json").symlink_to(shared / "scheduler_config.json")
    os.replace(base / "vae" / "config.json", cli.folder / "vae-config.json")
    (base / "vae" / "config.json").symlink_to(cli.folder / "vae-config.json")
    cli.refused(cli.build(LOCAL), "outside the folders it may be read from")  # not allowed yet
    assert cli.build(LOCAL, "--allow-read", str(shared)) == 0, cli.text
    assert main(["verify", str(cli.folder / "out")]) == 0


def test_a_fifo_in_the_base_folder_is_refused_without_hanging(cli: Cli) -> None:
    base = _base(cli.folder)
    _lora(cli.folder)
    os.mkfifo(base / "tokenizer" / "special_tokens_map.json")
    cli.refused(cli("validate", str(cli.recipe(LOCAL))), "is not a regular file or folder")


def test_a_lora_file_that_is_a_symlink_out_of_the_recipe_folder_is_refused(cli: Cli, tmp_path: Path) -> None:
    _base(cli.folder)
    (tmp_path / "outside-loras").mkdir()
    outside = _lora(tmp_path / "outside-loras")
    (cli.folder / "style.safetensors").symlink_to(outside)
    cli.refused(cli.build(LOCAL), "style.safetensors")
    assert not (cli.folder / "out" / "fused").exists()


# ---- the recipe file itself ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["secret", "/proc/self/environ", "/dev/zero"])
def test_a_recipe_that_is_a_symlink_out_of_its_folder_is_refused_before_it_is_read(
    cli: Cli, secret: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    monkeypatch.setenv("LORARECIPE_TEST_SECRET", SECRET)
    link = cli.folder / "recipe.yaml"
    link.symlink_to(secret if target == "secret" else target)
    for command in ("validate", "plan"):
        code = cli(command, str(link))
        assert code == 1, cli.text
        assert "outside the recipe's folder" in cli.text and "Traceback" not in cli.text
        assert SECRET not in cli.text
    code = cli("validate", str(cli.folder))  # found by a folder scan too
    assert code == 1 and SECRET not in cli.text and "outside the recipe's folder" in cli.text


def test_error_snippets_quote_only_the_recipe_that_was_read(cli: Cli, secret: Path) -> None:
    """A recipe replaced after it was read (or a problem naming another file) never makes the CLI
    print another file's lines."""
    import io

    from lorarecipe.cli.commands import print_problems
    from lorarecipe.errors import Problem, SourceSpan

    stream = io.StringIO()
    print_problems([Problem("boom", span=SourceSpan(str(secret), 1, 1))], stream)
    assert SECRET not in stream.getvalue()


# ---- lock files and manifests are untrusted --------------------------------------------------------


def _locked(cli: Cli) -> Path:
    _base(cli.folder)
    _lora(cli.folder)
    recipe = cli.recipe(LOCAL)
    assert cli("lock", str(recipe)) == 0, cli.text
    return recipe


@pytest.mark.parametrize(
    "path", ["../../outside/secret.json", "/etc/passwd", "unet/../../../outside/secret.json"]
)
def test_paths_in_a_lock_file_stay_inside_their_input(cli: Cli, secret: Path, path: str) -> None:
    recipe = _locked(cli)
    lock = recipe.with_name("recipe.lock.json")
    doc = json.loads(lock.read_text())
    base = next(i for i in doc["inputs"] if i["step"] == "base")
    base["files"][0]["path"] = path
    lock.write_text(json.dumps(doc))
    code = cli.build(LOCAL, "--frozen")
    assert code == 1 and "Traceback" not in cli.text, cli.text
    assert "leaves" in cli.text or "resolves outside" in cli.text, cli.text
    assert SECRET not in cli.text


def test_a_lock_file_that_is_a_symlink_out_of_the_recipe_folder_is_refused(cli: Cli, secret: Path) -> None:
    recipe = _locked(cli)
    lock = recipe.with_name("recipe.lock.json")
    lock.unlink()
    lock.symlink_to(secret)
    for argv in (
        ("lock", str(recipe), "--check"),
        ("build", str(recipe), "--out", str(cli.folder / "o"), "--frozen"),
    ):
        assert cli(*argv) == 1, cli.text
        assert "outside the folders it may be read from" in cli.text and SECRET not in cli.text


def _built(cli: Cli) -> Path:
    _base(cli.folder)
    _lora(cli.folder)
    assert cli.build(LOCAL) == 0, cli.text
    return cli.folder / "out"


@pytest.mark.parametrize("path", ["../outside/secret.json", "/etc/hostname", "fused/../../x"])
def test_paths_in_a_manifest_stay_inside_the_output_root(cli: Cli, path: str) -> None:
    out = _built(cli)
    doc = json.loads((out / "manifest.json").read_text())
    doc["outputs"]["fused"]["files"][0]["path"] = path
    (out / "manifest.json").write_text(json.dumps(doc))
    assert cli("verify", str(out)) == 1
    assert "Traceback" not in cli.text and ("leaves" in cli.text or "resolves outside" in cli.text), cli.text


@pytest.mark.parametrize(
    "stray", ["fused/unet/evil.pkl", "fused/unet/diffusion_pytorch_model.fp16.safetensors"]
)
def test_verify_reports_files_the_manifest_does_not_list(cli: Cli, stray: str) -> None:
    out = _built(cli)
    assert cli("verify", str(out)) == 0
    (out / stray).write_bytes(b"not from this build")
    assert cli("verify", str(out)) == 1
    assert f"{stray}: not in the manifest" in cli.text, cli.text


# ---- the output root's own state is never written through a symlink --------------------------------


@pytest.mark.parametrize(
    "entry", [".lorarecipe", "manifest.json", ".lorarecipe/build.lock", ".lorarecipe/state.json"]
)
def test_state_symlinks_in_the_output_root_are_refused(cli: Cli, tmp_path: Path, entry: str) -> None:
    out = _built(cli)
    marker = tmp_path / "marker"
    marker.mkdir()
    (marker / "build.lock").write_text("keep")
    (marker / "state.json").write_text("keep")
    before = {p.name: p.read_bytes() for p in marker.iterdir()}
    target = out / entry
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    target.symlink_to(
        marker if entry == ".lorarecipe" else marker / Path(entry).name,
        target_is_directory=entry == ".lorarecipe",
    )
    code = cli.build(LOCAL, "--force")
    assert code == 1 and "is a symlink" in cli.text and "Traceback" not in cli.text, cli.text
    assert {p.name: p.read_bytes() for p in marker.iterdir()} == before


def test_the_default_output_root_is_not_written_through_a_symlinked_build_folder(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull request may commit ``build`` as a symlink; the default ``build/<name>`` must not follow it."""
    _base(cli.folder)
    _lora(cli.folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cli.folder / "build").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.chdir(cli.folder)
    assert cli("build", str(cli.recipe(LOCAL)), "--quiet") == 1
    assert "goes through a symlink" in cli.text, cli.text
    assert list(elsewhere.iterdir()) == []


# ---- no output may replace or live inside an input -----------------------------------------------


def test_an_output_may_not_replace_an_input(cli: Cli) -> None:
    _base(cli.folder)
    lora = _lora(cli.folder)
    before = _digest(lora)
    text = LOCAL.replace(
        "fused: {kind: pipeline, path: fused}", "ckpt: {kind: single_file, path: style.safetensors}"
    )
    code = cli("build", str(cli.recipe(text)), "--out", str(cli.folder), "--quiet")
    cli.refused(code, "would overwrite or be written inside the input")
    assert _digest(lora) == before


def test_an_output_folder_may_not_contain_an_input(cli: Cli) -> None:
    _base(cli.folder)
    (cli.folder / "loras").mkdir()
    lora = _lora(cli.folder / "loras")
    text = LOCAL.replace("style.safetensors", "loras/style.safetensors").replace("path: fused", "path: loras")
    code = cli("build", str(cli.recipe(text)), "--out", str(cli.folder), "--quiet")
    cli.refused(code, "would overwrite or be written inside the input")
    assert lora.is_file()


def test_the_output_root_may_not_be_inside_an_input(cli: Cli) -> None:
    base = _base(cli.folder)
    _lora(cli.folder)
    files = sorted(p.relative_to(base) for p in base.rglob("*"))
    code = cli("build", str(cli.recipe(LOCAL)), "--out", str(base / "out"), "--quiet")
    assert code == 1 and "would overwrite or be written inside the input" in cli.text, cli.text
    assert (
        sorted(
            p.relative_to(base) for p in base.rglob("*") if ".lorarecipe" not in p.parts and p.name != "out"
        )
        == files
    )


def test_the_recipe_and_its_lock_are_protected(cli: Cli) -> None:
    """``--out`` the recipe's folder with an output at the recipe's own name is refused."""
    _base(cli.folder)
    _lora(cli.folder)
    text = LOCAL.replace("path: fused", "path: recipe.yaml")
    recipe = cli.recipe(text)
    before = recipe.read_bytes()
    code = cli("build", str(recipe), "--out", str(cli.folder), "--quiet")
    assert code == 1 and "would overwrite or be written inside the input" in cli.text, cli.text
    assert recipe.read_bytes() == before


# ---- nothing lost, nothing half-done ------------------------------------------------------------------


def test_a_folder_at_its_final_path_always_has_its_card(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every folder swapped into place already holds README.md (cards are written before the swap)."""
    from lorarecipe.fs import atomic

    _base(cli.folder)
    _lora(cli.folder)
    seen: list[tuple[str, bool]] = []
    real = atomic._fsync_tree

    def spy(root: Path) -> None:
        if (root / "model_index.json").is_file() or any(root.glob("*.safetensors")):
            seen.append((root.name, (root / "README.md").is_file()))
        real(root)

    monkeypatch.setattr(atomic, "_fsync_tree", spy)
    text = LOCAL.replace("outputs:\n", "outputs:\n  lora: {kind: lora, adapter: style, path: lora}\n")
    for executor in ("auto", "diffusers"):
        seen.clear()
        assert cli.build(text, "--executor", executor, "--force") == 0, cli.text
        assert len(seen) == 2 and all(card for _, card in seen), seen


def test_a_failure_at_the_last_manifest_write_leaves_a_true_manifest(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final manifest write fails (disk full): the manifest the journal wrote last still stands,
    lists every output that is complete, and verify passes; the next build completes it."""
    from lorarecipe.runner import journal

    out = _built(cli)
    real = journal.write_manifest

    def fail_last(out_root: Path, doc: dict[str, object]) -> Path:
        if doc.get("build_complete"):
            raise OSError(28, "No space left on device")
        return real(out_root, doc)

    monkeypatch.setattr(journal, "write_manifest", fail_last)
    code = cli.build(LOCAL.replace("fuse: {adapters: [style]}", "fuse: {adapters: [style], lora_scale: 0.5}"))
    assert code == 1 and "Traceback" not in cli.text and "No space left" in cli.text, cli.text
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["build_complete"] is False and set(doc["outputs"]) == {"fused"}
    assert cli("verify", str(out)) == 0, cli.text
    monkeypatch.setattr(journal, "write_manifest", real)
    assert cli.build(LOCAL) == 0 and cli("verify", str(out)) == 0
    assert json.loads((out / "manifest.json").read_text())["build_complete"] is True


def test_an_interrupted_build_unlists_what_it_replaces_and_the_next_build_rebuilds_it(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output unlisted by an interrupted build is rebuilt by the next plain build, even though its
    inputs did not change (it is not treated as up to date while the manifest does not list it)."""
    out = _built(cli)
    from lorarecipe.runner.streaming import stream

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(stream, "stream_fuse", fail)
    assert cli.build(LOCAL, "--force") == 1
    assert json.loads((out / "manifest.json").read_text())["outputs"] == {}
    assert cli("verify", str(out)) == 0
    monkeypatch.undo()
    assert cli("build", str(cli.folder / "recipe.yaml"), "--out", str(out), "--quiet", "--json") == 0
    assert json.loads(cli.text)["builds"][0]["outputs"] == ["fused"]
    assert cli("verify", str(out)) == 0


# ---- a fuse or a cast that overflows the output dtype is refused, naming the tensors ---------------


def _big_lora(folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(builtin_lora_path("tiny-sd/style")))
    from lorarecipe.outputs.safetensors_meta import read_metadata

    meta = read_metadata(builtin_lora_path("tiny-sd/style"))
    path = folder / "style.safetensors"
    save_file({k: v * 3000.0 for k, v in tensors.items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_merged_lora_file_that_overflows_its_dtype_is_refused(cli: Cli, dtype: str) -> None:
    _base(cli.folder)
    _big_lora(cli.folder)
    text = f"""\
base: {{path: base}}
adapters:
  style: {{file: style.safetensors}}
merges:
  big: {{method: cat, adapters: {{style: 30000.0}}}}
outputs:
  lora: {{kind: lora, adapter: big, path: lora, dtype: {dtype}}}
"""
    code = cli.build(text)
    if dtype == "bfloat16":  # bf16 has float32's range: nothing overflows
        assert code == 0, cli.text
        return
    cli.refused(code, "overflow float16", "lora_")
    assert not (cli.folder / "out" / "lora").exists()


@pytest.mark.parametrize("executor", ["streaming", "diffusers"])
def test_a_fused_checkpoint_that_overflows_float16_is_refused_in_both_executors(
    cli: Cli, executor: str
) -> None:
    _base(cli.folder)
    _big_lora(cli.folder)
    text = LOCAL.replace("fuse: {adapters: [style]}", "fuse: {adapters: [style], lora_scale: 100.0}").replace(
        "path: fused}", "path: fused, dtype: float16}"
    )
    code = cli.build(text, "--executor", executor)
    assert code == 1 and "Traceback" not in cli.text, cli.text
    assert "overflow" in cli.text and "float16" in cli.text, cli.text
    assert not (cli.folder / "out" / "fused").exists()
