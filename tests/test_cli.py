"""The command line: exit codes, JSON documents, GitHub annotations, schema in sync, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorarecipe.cli import main
from tests.helpers.recipes import DEMO_LIKE, write_recipe

REPO = Path(__file__).resolve().parents[1]


def test_validate_examples_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(REPO / "recipes")]) == 0
    assert "recipes OK" in capsys.readouterr().err


def test_validate_reports_errors_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_recipe(tmp_path, DEMO_LIKE.replace("method: cat", "method: lnear"), "bad.yaml")
    write_recipe(tmp_path, DEMO_LIKE, "good.yaml")
    assert main(["validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:7:13: error: merges.both.method: unknown method 'lnear'" in err.replace(
        str(Path.cwd()) + "/", ""
    )
    assert "^^^^^ did you mean 'linear'?" in err


def test_validate_json_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_recipe(tmp_path, DEMO_LIKE.replace("method: cat", "method: lnear"), "bad.yaml")
    assert main(["validate", "--json", str(tmp_path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    (problem,) = doc["files"][0]["problems"]
    assert problem["line"] == 7 and problem["col"] == 13 and problem["path"] == "merges.both.method"
    assert problem["hint"] == "did you mean 'linear'?"


def test_validate_github_annotations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_recipe(tmp_path, DEMO_LIKE.replace("method: cat", "method: lnear"), "bad.yaml")
    assert main(["validate", "--format", "github", str(tmp_path)]) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("::error file=")
    assert ",line=7,col=13," in line
    assert line.endswith("::merges.both.method: unknown method 'lnear' (did you mean 'linear'?)")


def test_plan_json_is_stable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path, DEMO_LIKE)
    assert main(["plan", "--json", str(path)]) == 0
    first = capsys.readouterr().out
    assert main(["plan", "--json", str(path)]) == 0
    assert capsys.readouterr().out == first
    doc = json.loads(first)
    assert doc["fingerprint"].startswith("sha256:")
    assert [s["op"] for s in doc["steps"]][:3] == ["load_base", "load_adapter", "load_adapter"]
    assert doc["steps"][1]["origin"] == {"path": "adapters.style", "line": 3, "col": 3}


def test_plan_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(write_recipe(tmp_path, DEMO_LIKE))]) == 0
    out = capsys.readouterr().out
    assert "├─ merge          both = cat(style×1, detail×0.5)" in out
    assert "fuse           style=0.7, detail=0.5  lora_scale=1  -> fused checkpoint" in out
    assert "estimated peak memory:" in out


def test_exit_codes_usage_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert main(["plan", str(write_recipe(tmp_path, DEMO_LIKE)), "--set", "nope=1"]) == 2
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 1
    assert main(["plan", str(tmp_path)]) == 1  # a folder where a file belongs
    assert main(["--version"]) == 0
    capsys.readouterr()


def test_internal_errors_exit_3(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import lorarecipe.compiler

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(lorarecipe.compiler, "compile_recipe", boom)
    assert main(["plan", str(write_recipe(tmp_path, DEMO_LIKE))]) == 3
    assert "this is a bug" in capsys.readouterr().err


MERGE_ONLY = """\
base: builtin:tiny-sd
adapters:
  style: builtin:tiny-sd/style
  detail: builtin:tiny-sd/detail
merges:
  both:
    method: cat
    adapters: [style, detail]
outputs:
  lora: {kind: lora, adapter: both, path: lora}
"""


@pytest.mark.parametrize(
    ("failure", "code", "expected"),
    [
        (
            RuntimeError("index out of range in a helper"),
            3,
            "internal error in step merge:both: RuntimeError",
        ),
        (OSError(28, "No space left on device"), 1, "step merge:both failed: OSError: [Errno 28] No space"),
        (MemoryError(), 1, "step merge:both failed: out of memory"),
        (
            RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
            1,
            "step merge:both failed: RuntimeError",
        ),
    ],
    ids=["bug", "disk-full", "memory", "device-oom"],
)
def test_a_failure_inside_a_step_is_a_bug_unless_the_user_can_act_on_it(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    failure: BaseException,
    code: int,
    expected: str,
) -> None:
    """An unexpected exception in a step exits 3 asking for a report, located at the step's recipe
    line (``merges.both`` is on line 6); a full disk or an out-of-memory is the user's to fix: exit 1."""
    import lorarecipe.runner.pipeline.merge

    def fail(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(lorarecipe.runner.pipeline.merge, "merge_adapters", fail)
    recipe = write_recipe(tmp_path, MERGE_ONLY)
    assert main(["build", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == code
    err = capsys.readouterr().err
    assert expected in err
    assert f"{recipe}:6:3: error: merges.both: " in err.replace(str(Path.cwd()) + "/", "")
    assert ("this is a bug in lorarecipe, please report it" in err) == (code == 3)
    assert not (tmp_path / "out" / "lora").exists()


def test_schema_file_is_in_sync(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == (REPO / "schemas" / "recipe.schema.json").read_text()


def test_validate_and_plan_never_import_torch() -> None:
    code = (
        "import sys; from lorarecipe.cli import main; "
        f"assert main(['validate', {str(REPO / 'recipes')!r}]) == 0; "
        f"assert main(['plan', {str(REPO / 'recipes' / 'demo.yaml')!r}]) == 0; "
        "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers', 'safetensors', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_public_api_is_pinned() -> None:
    import lorarecipe

    assert sorted(lorarecipe.__all__) == sorted(
        [
            "BuildError",
            "ExecutorRefusal",
            "InputUnavailableError",
            "IntegrityError",
            "InternalError",
            "LockError",
            "LorarecipeError",
            "Problem",
            "RecipeCompileError",
            "RecipeError",
            "RecipeSyntaxError",
            "RecipeValidationError",
            "StepFailedError",
            "StreamingUnsupported",
            "UnsafeInputError",
            "UsageError",
            "__version__",
            "compile_recipe",
            "load_recipe",
            "run_plan",
        ]
    )
    assert callable(lorarecipe.load_recipe) and callable(lorarecipe.compile_recipe)


def test_text_mode_says_what_was_rebuilt_and_counts_the_steps_it_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --json: the closing line counts the step lines printed, and the summary names the outputs
    rebuilt and those up to date (no empty matrix 'build' column for a recipe without a matrix)."""
    from lorarecipe.runner.progress import LineReporter

    monkeypatch.setattr("lorarecipe.runner.progress.make_reporter", lambda quiet, lines=False: LineReporter())
    recipe = write_recipe(
        tmp_path, MERGE_ONLY + "  fused: {kind: pipeline, path: fused}\nfuse: {adapters: [style]}\n"
    )
    out = str(tmp_path / "out")
    assert main(["build", str(recipe), "--out", out]) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    title = lines.index("build recipe")
    done = next(i for i, line in enumerate(lines) if line.startswith("build recipe: done, "))
    steps = [line for line in lines[title + 1 : done] if line.startswith("  ") and ": " not in line]
    assert lines[done] == f"build recipe: done, {len(steps)} steps"
    header, row = lines[done + 1], lines[done + 2]
    assert header.split() == ["recipe", "result", "time", "rebuilt", "up", "to", "date", "output"]
    assert "fused, lora" in row and row.split()[-1] == out

    # only the LoRA output's merge changes: the fused pipeline is up to date
    recipe.write_text(recipe.read_text().replace("method: cat", "method: svd"))
    assert main(["build", str(recipe), "--out", out]) == 0
    row = capsys.readouterr().err.splitlines()[-1]
    cells = row.split()
    assert cells[cells.index("ok") + 2 : cells.index("ok") + 4] == ["lora", "fused"]
