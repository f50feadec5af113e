"""``publish:`` in recipes and ``lorarecipe publish`` / ``build --publish``, end to end through the CLI.

huggingface_hub's real client talks to the loopback mock Hub (``tests/helpers/hub_server``), found
the way CI finds the real one: the endpoint and ``HF_TOKEN`` from the environment. What the server
stored is compared with the build folder; refusals are checked to happen before any request.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorarecipe.cli import main
from tests.helpers.hub_server import MockHub, loopback_allowed
from tests.helpers.recipes import write_recipe

RECIPE = """\
name: pubcli
variables:
  w: 0.7
base: builtin:tiny-sd
adapters:
  style: builtin:tiny-sd/style
fuse: {adapters: [style], lora_scale: "{{ w }}"}
outputs:
  fused:
    kind: pipeline
    path: fused
    publish: {repo: "lorarecipe-test/{{ name }}-{{ output }}", commit_message: "fused at w={{ w }}"}
  lora:
    kind: lora
    adapter: style
    path: lora
    publish: {repo: "lorarecipe-test/{{ name }}-{{ output }}", private: false}
  ckpt: {kind: single_file, path: ckpt.safetensors}
"""


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[MockHub]:
    """The mock Hub as the default endpoint, a token in the environment, offline mode off."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = MockHub().start()
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_TOKEN", server.token)
    try:
        with loopback_allowed(server.port):
            yield server
    finally:
        server.stop()
    assert server.unexpected == []


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_publish_then_publish_again_is_a_no_op(
    hub: MockHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    out = tmp_path / "out"
    code, stdout, err = _run(
        capsys, "build", str(recipe), "--out", str(out), "--quiet", "--json", "--publish"
    )
    assert code == 0, err
    doc = json.loads(stdout)
    published = {r["output"]: r for o in doc["published"] for r in o["published"]}
    assert set(published) == {"fused", "lora"}  # ckpt has no publish section
    assert published["fused"]["repo"] == "lorarecipe-test/pubcli-fused"
    assert published["lora"]["repo"] == "lorarecipe-test/pubcli-lora"
    assert all(r["status"] == "published" and r["commit"] in r["url"] for r in published.values())
    commits = {c.repo: c for c in hub.commits}
    assert commits["lorarecipe-test/pubcli-fused"].message.startswith("fused at w=0.7")
    assert hub.repos["lorarecipe-test/pubcli-lora"].private is False
    assert hub.repos["lorarecipe-test/pubcli-fused"].private is True
    lora_file = out / "lora" / "pytorch_lora_weights.safetensors"
    assert (
        hub.files("lorarecipe-test/pubcli-lora")["pytorch_lora_weights.safetensors"] == lora_file.read_bytes()
    )

    before = len(hub.commits)
    code, stdout, err = _run(capsys, "publish", str(recipe), "--out", str(out), "--json")
    assert code == 0, err
    results = [r for o in json.loads(stdout)["published"] for r in o["published"]]
    assert {r["status"] for r in results} == {"unchanged"} and len(hub.commits) == before


def test_dry_run_sends_nothing_and_says_what_would_go(
    hub: MockHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    out = tmp_path / "out"
    assert _run(capsys, "build", str(recipe), "--out", str(out), "--quiet")[0] == 0
    code, _, err = _run(capsys, "publish", str(recipe), "--out", str(out), "--dry-run")
    assert code == 0, err
    assert "would publish" in err and "lorarecipe-test/pubcli-fused" in err
    assert hub.requests == []


def test_publish_refuses_a_stale_or_missing_build_before_any_request(
    hub: MockHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "publish", str(recipe), "--out", str(out))
    assert code == 1 and "build" in err and "Traceback" not in err
    assert _run(capsys, "build", str(recipe), "--out", str(out), "--quiet")[0] == 0
    recipe.write_text(RECIPE.replace("w: 0.7", "w: 0.4"))  # the folder now holds another state
    code, _, err = _run(capsys, "publish", str(recipe), "--out", str(out))
    assert code == 1 and "was built from another state of the recipe" in err, err
    assert hub.requests == []


def test_publish_settings_never_rebuild_and_are_not_in_the_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    out = tmp_path / "out"
    assert _run(capsys, "build", str(recipe), "--out", str(out), "--quiet")[0] == 0
    first = json.loads(_run(capsys, "plan", str(recipe), "--json")[1])
    recipe.write_text(RECIPE.replace("lorarecipe-test/{{ name }}-{{ output }}", "other-org/{{ output }}"))
    second = json.loads(_run(capsys, "plan", str(recipe), "--json")[1])
    assert first["fingerprint"] == second["fingerprint"]
    assert [p["repo"] for p in second["publish"]] == ["other-org/fused", "other-org/lora"]
    code, stdout, _ = _run(capsys, "build", str(recipe), "--out", str(out), "--json")
    assert code == 0 and json.loads(stdout)["builds"][0]["outputs"] == []  # nothing rebuilt


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('"lorarecipe-test/{{ name }}-{{ output }}", commit', '"not a repo id", commit'),
        ('"lorarecipe-test/{{ name }}-{{ output }}", private', '"lorarecipe-test/{{ nope }}", private'),
    ],
)
def test_bad_repo_ids_are_located_compile_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str, message: str
) -> None:
    recipe = write_recipe(tmp_path, RECIPE.replace(change, message))
    code, _, err = _run(capsys, "validate", str(recipe))
    assert code == 1 and "Traceback" not in err
    assert "recipe.yaml:" in err and "publish.repo" in err, err


def test_two_outputs_or_two_matrix_builds_may_not_publish_to_one_repo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    same = RECIPE.replace("{{ name }}-{{ output }}", "{{ name }}")
    code, _, err = _run(capsys, "validate", str(write_recipe(tmp_path, same)))
    assert code == 1 and "already publishes to lorarecipe-test/pubcli" in err, err
    matrix = RECIPE.replace("variables:\n  w: 0.7", "matrix:\n  w: [0.5, 0.7]")
    code, _, err = _run(capsys, "validate", str(write_recipe(tmp_path, matrix, "m.yaml")))
    assert code == 1 and "both publish" in err and "{{ build }}" in err, err
    fixed = matrix.replace("{{ name }}-{{ output }}", "{{ name }}-{{ output }}-{{ build }}")
    assert _run(capsys, "validate", str(write_recipe(tmp_path, fixed, "f.yaml")))[0] == 0


def test_validate_never_publishes_nor_imports_the_hub_client(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    code = (
        "import sys; from lorarecipe.cli import main; code = main(['validate', sys.argv[1]]); "
        "print(code, sorted({'huggingface_hub', 'torch'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True)
    assert result.stdout.strip() == "0 []", result.stderr


def test_build_publish_does_nothing_when_a_build_failed(
    hub: MockHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "recipes").mkdir()
    good = write_recipe(tmp_path / "recipes", RECIPE, "a.yaml")
    write_recipe(good.parent, RECIPE.replace("builtin:tiny-sd/style", "builtin:tiny-sd/nope"), "b.yaml")
    code, _, err = _run(
        capsys, "build", str(good.parent), "--out", str(tmp_path / "out"), "--quiet", "--publish"
    )
    assert code == 1 and "nope" in err
    assert hub.requests == []
