"""GitOps builds: incremental, reproducible on a fresh machine, many recipes, scriptable."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorarecipe.cli import main
from tests.helpers.recipes import write_recipe

REPO = Path(__file__).resolve().parents[1]

RECIPE = """\
name: inc
base: builtin:tiny-sd
adapters:
  style: builtin:tiny-sd/style
  detail: builtin:tiny-sd/detail
merges:
  both: {method: cat, adapters: [style, detail]}
set_adapters:
  adapters: {style: 0.7, detail: 0.5}
fuse: {lora_scale: 1.0}
outputs:
  fused: {kind: pipeline, path: fused}
  lora: {kind: lora, adapter: both, path: lora}
  grid: {kind: grid, path: grid.png, prompts: [a cat], seeds: [0], steps: 2, variants: [base, mix]}
"""


def _build(recipe: Path, out: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    code = main(["build", str(recipe), "--out", str(out), "--json", *extra])
    doc = json.loads(capsys.readouterr().out)
    assert code == (0 if doc["ok"] else 1)
    return doc["builds"][0]  # type: ignore[no-any-return]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_incremental_rebuilds_only_what_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    out = tmp_path / "out"
    first = _build(recipe, out, capsys=capsys)
    assert first["outputs"] == ["fused", "grid", "lora"] and first["up_to_date"] == []
    before = _mtimes(out)

    again = _build(recipe, out, capsys=capsys)
    assert again["outputs"] == [] and again["up_to_date"] == ["fused", "grid", "lora"]
    assert _mtimes(out) == before  # nothing rewritten, not even the manifest

    recipe.write_text(RECIPE.replace("steps: 2", "steps: 3") + "# a comment\n")
    third = _build(recipe, out, capsys=capsys)
    assert third["outputs"] == ["grid"] and third["up_to_date"] == ["fused", "lora"]
    after = _mtimes(out)
    assert all(after[p] == before[p] for p in before if p.startswith(("fused/", "lora/")))
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {"fused", "grid", "lora"}
    assert (
        manifest["outputs"]["grid"]["built_by_fingerprint"]
        != manifest["outputs"]["fused"]["built_by_fingerprint"]
    )
    assert main(["verify", str(out)]) == 0

    (out / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"changed by hand")
    assert _build(recipe, out, capsys=capsys)["outputs"] == ["lora"]
    assert _build(recipe, out, "--force", capsys=capsys)["outputs"] == ["fused", "grid", "lora"]
    capsys.readouterr()


def test_noop_rebuild_loads_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    out = tmp_path / "out"
    _build(recipe, out, capsys=capsys)
    code = (
        "import sys; from lorarecipe.cli import main; "
        f"assert main(['build', {str(recipe)!r}, '--out', {str(out)!r}, '--quiet']) == 0; "
        "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.name != "manifest.json"
        and not p.relative_to(folder).parts[0].startswith(".lorarecipe")
    }


@pytest.mark.slow
def test_fresh_machines_build_byte_identical_outputs(tmp_path: Path) -> None:
    """Two builds in separate processes, each with an empty lorarecipe and Hugging Face cache."""
    recipe = write_recipe(tmp_path, RECIPE)
    for machine in ("a", "b"):
        env = {
            **os.environ,
            "LORARECIPE_CACHE": str(tmp_path / machine / "cache"),
            "HF_HOME": str(tmp_path / machine / "hf"),
            "PYTHONHASHSEED": "1" if machine == "a" else "2",
        }
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "lorarecipe",
                "build",
                str(recipe),
                "--out",
                str(tmp_path / machine / "out"),
                "--quiet",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr
    a, b = _hashes(tmp_path / "a" / "out"), _hashes(tmp_path / "b" / "out")
    assert a == b and len(a) > 10


def test_many_recipes_failures_do_not_stop_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "recipes"
    folder.mkdir()
    write_recipe(folder, RECIPE.replace("  grid: {kind: grid", "  # grid: {kind: grid"), "good.yaml")
    write_recipe(
        folder, RECIPE.replace("method: cat,", "method: ties, density: 0.5,"), "bad.yaml"
    )  # unequal ranks
    matrix = (
        RECIPE.replace("fuse: {lora_scale: 1.0}", "fuse: {lora_scale: '{{ s }}'}")
        .replace("  lora: {kind: lora", "  # lora: {kind: lora")
        .replace("  grid: {kind: grid", "  # grid: {kind: grid")
    )
    write_recipe(folder, matrix + "matrix:\n  s: [0.5, 1.0]\n", "sweep.yaml")
    code = main(["build", str(folder), "--out", str(tmp_path / "out"), "--json", "--quiet"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["ok"] is False
    results = {(Path(b["recipe"]).name, b["build"]): b["ok"] for b in doc["builds"]}
    assert results == {
        ("bad.yaml", ""): False,
        ("good.yaml", ""): True,
        ("sweep.yaml", "s-0.5"): True,
        ("sweep.yaml", "s-1.0"): True,
    }
    bad = next(b for b in doc["builds"] if b["recipe"].endswith("bad.yaml"))
    assert "needs equal ranks" in bad["problems"][0]["message"] and bad["problems"][0]["line"] == 7
    assert (tmp_path / "out" / "inc" / "s-0.5" / "fused" / "model_index.json").is_file()
    assert (tmp_path / "out" / "inc" / "s-1.0" / "manifest.json").is_file()


def test_frozen_build_refuses_a_missing_stale_or_tampered_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from lorarecipe.builtin.materialize import builtin_lora_path

    shutil.copy(builtin_lora_path("tiny-sd/style"), tmp_path / "mine.safetensors")
    text = RECIPE.replace("style: builtin:tiny-sd/style", "style: {file: mine.safetensors}")
    recipe = write_recipe(tmp_path, text)
    out = tmp_path / "out"
    assert main(["build", str(recipe), "--out", str(out), "--frozen", "--quiet"]) == 1
    assert "no lock file" in capsys.readouterr().err
    assert main(["lock", str(recipe)]) == 0
    assert main(["lock", "--check", str(recipe)]) == 0
    assert main(["build", str(recipe), "--out", str(out), "--frozen", "--quiet"]) == 0
    capsys.readouterr()
    data = bytearray((tmp_path / "mine.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "mine.safetensors").write_bytes(bytes(data))
    assert (
        main(["build", str(recipe), "--out", str(out), "--frozen", "--quiet"]) == 1
    )  # even though up to date
    err = capsys.readouterr().err
    assert "mine.safetensors" in err and "expected" in err
    recipe.write_text(text.replace("steps: 2", "steps: 3"))
    assert main(["lock", "--check", str(recipe)]) == 1
    assert main(["build", str(recipe), "--out", str(out), "--frozen", "--quiet"]) == 1
    assert "is stale" in capsys.readouterr().err


def test_relative_output_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo` uses `--out build/demo`: a relative output root must work end to end."""
    recipe = write_recipe(tmp_path, RECIPE.replace("  grid: {kind: grid", "  # grid: {kind: grid"))
    monkeypatch.chdir(tmp_path)
    assert main(["build", "recipe.yaml", "--out", "build/inc", "--quiet"]) == 0
    assert main(["verify", "build/inc"]) == 0
    assert main(["build", "recipe.yaml", "--quiet"]) == 0  # the default root, build/<name>, is relative too
    assert (tmp_path / "build" / "inc" / "manifest.json").is_file()
    assert recipe.is_file()


def test_a_first_build_on_an_empty_cache_is_up_to_date_afterwards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The built-in models are made during the first build: its state must still record their
    hashes, or the second build rebuilds everything."""
    monkeypatch.setenv("LORARECIPE_CACHE", str(tmp_path / "empty-cache"))
    recipe = write_recipe(tmp_path, RECIPE)
    first = _build(recipe, tmp_path / "out", capsys=capsys)
    assert first["outputs"] == ["fused", "grid", "lora"]
    again = _build(recipe, tmp_path / "out", capsys=capsys)
    assert again["outputs"] == [] and again["up_to_date"] == ["fused", "grid", "lora"]


def test_a_first_build_that_materializes_its_inputs_records_their_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a first build the build keys are hashed in the background while the build runs; an input
    that did not exist yet when that started (a built-in materialized by the build) is hashed once it
    does, so the next build is up to date."""
    monkeypatch.setenv("LORARECIPE_CACHE", str(tmp_path / "fresh-cache"))  # built-ins not materialized
    recipe = write_recipe(tmp_path, RECIPE.replace("  grid: {kind: grid", "  # grid: {kind: grid"))
    out = tmp_path / "out"
    assert _build(recipe, out, capsys=capsys)["outputs"] == ["fused", "lora"]
    again = _build(recipe, out, capsys=capsys)
    assert again["outputs"] == [] and again["up_to_date"] == ["fused", "lora"]
