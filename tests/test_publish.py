"""Publishing a finished build to the Hub, through huggingface_hub's real client and a loopback mock.

The build is a real one (tiny built-in models); the Hub is ``tests/helpers/hub_server.MockHub``.
What the server stored is compared with the build folder read directly (not through the manifest),
and the refusals are checked to happen before any request reaches the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lorarecipe.errors import (
    BuildError,
    InputUnavailableError,
    IntegrityError,
    LockError,
    LorarecipeError,
    UsageError,
)
from lorarecipe.publish import (
    MANIFEST_IN_REPO,
    PublishResult,
    PublishSpec,
    publish_build,
    publish_output,
    repo_id_problem,
)
from tests.helpers.hub_server import GITATTRIBUTES, MockHub, loopback_allowed
from tests.helpers.recipes import build_text

RECIPE = """\
name: pubtest
description: A build to publish.
license: apache-2.0
variables:
  style_weight: {weight}
base: builtin:tiny-sd
adapters:
  style: {{builtin: tiny-sd/style, trigger_words: [watercolor]}}
  detail: builtin:tiny-sd/detail
merges:
  both:
    method: cat
    adapters: {{style: "{{{{ style_weight }}}}", detail: 0.5}}
set_adapters:
  adapters: {{style: "{{{{ style_weight }}}}", detail: 0.5}}
fuse: {{lora_scale: 1.0}}
outputs:
  fused: {{kind: pipeline, path: fused}}
  lora: {{kind: lora, adapter: both, path: lora}}
  lora-kohya: {{kind: lora, adapter: both, layout: kohya, path: lora-kohya}}
  grid: {{kind: grid, path: grids/sample.png, prompts: [a cat], seeds: [0], steps: 2, variants: [base, fused]}}
"""


def _build(tmp_path_factory: pytest.TempPathFactory, weight: float) -> Path:
    folder = tmp_path_factory.mktemp(f"build-{weight}")
    return build_text(folder, RECIPE.format(weight=weight)).out_root


@pytest.fixture(scope="session")
def build_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, 0.7)


@pytest.fixture(scope="session")
def build_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, 0.3)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[MockHub]:
    """A started mock Hub, reachable; HF offline mode off and no token in the environment."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, at import, from conftest's "1"
    server = MockHub().start()
    try:
        with loopback_allowed(server.port):
            yield server
    finally:
        server.stop()
    assert server.unexpected == [], "the client called endpoints the mock does not implement"


@pytest.fixture
def api(hub: MockHub) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token=hub.token)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by POSIX relative path, read from disk."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def expected_repo(build: Path, output_folder: str) -> dict[str, bytes]:
    return {
        ".gitattributes": GITATTRIBUTES,
        **folder_bytes(build / output_folder),
        MANIFEST_IN_REPO: (build / "manifest.json").read_bytes(),
    }


def sha256sum_digest(files: dict[str, bytes]) -> str:
    listing = "".join(f"{hashlib.sha256(data).hexdigest()}  {path}\n" for path, data in sorted(files.items()))
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def error_text(exc: LorarecipeError) -> str:
    return "\n".join([str(exc), exc.message, *(f"{p.message} {p.hint}" for p in exc.problems)])


def copy_build(build: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(build, tmp_path / "copy", symlinks=True))


# ---- dry run ------------------------------------------------------------------------------------


def test_dry_run_lists_the_upload_without_any_request(build_a: Path) -> None:
    """conftest's offline mode and blocked sockets stay on: a dry run needs neither network nor token."""
    server = MockHub().start()
    try:
        from huggingface_hub import HfApi

        result = publish_output(
            build_a, "fused", PublishSpec("me/fused"), dry_run=True, api=HfApi(endpoint=server.endpoint)
        )
    finally:
        server.stop()
    assert server.requests == []
    expected = {p: d for p, d in expected_repo(build_a, "fused").items() if p != ".gitattributes"}
    assert {f.path: f.source.read_bytes() for f in result.files} == expected
    assert result.status == "dry-run" and result.commit is None
    assert result.digest == sha256sum_digest(expected)
    assert result.tag == "lorarecipe-" + result.digest.removeprefix("sha256:")[:16]
    assert result.url == f"{server.endpoint}/me/fused"
    assert f"would publish {len(expected)} files" in result.message and result.tag in result.message
    assert json.loads(json.dumps(result.to_json()))["files"][0]["path"] == result.files[0].path


def test_file_outputs_publish_from_their_folder(build_a: Path) -> None:
    grid = publish_output(build_a, "grid", PublishSpec("me/grid"), dry_run=True)
    cells = sorted(p.name for p in (build_a / "grids" / "sample_cells").iterdir())
    assert sorted(f.path for f in grid.files) == sorted(
        ["sample.png", "sample.json", MANIFEST_IN_REPO, *(f"sample_cells/{c}" for c in cells)]
    )


# ---- publishing ---------------------------------------------------------------------------------


def test_publish_uploads_the_build_byte_for_byte(build_a: Path, hub: MockHub, api: Any) -> None:
    result = publish_output(build_a, "fused", PublishSpec("me/fused"), api=api)

    assert result.status == "published"
    assert hub.files("me/fused") == expected_repo(build_a, "fused")
    assert b"](images/sample.png)" in hub.files("me/fused")["README.md"]  # the card's grid is there too
    assert hub.repos["me/fused"].private
    (commit,) = hub.commits_to("me/fused")
    manifest = json.loads((build_a / "manifest.json").read_text())
    assert commit.summary == "Publish fused from lorarecipe recipe pubtest"
    assert commit.message.endswith(
        f"\n\nLorarecipe-Fingerprint: {manifest['fingerprint']}\nLorarecipe-Digest: {result.digest}"
    )
    assert result.digest == sha256sum_digest(
        {p: d for p, d in hub.files("me/fused").items() if p != ".gitattributes"}
    )
    assert hub.tags("me/fused") == {result.tag: commit.oid}
    assert result.commit == commit.oid == hub.head("me/fused")
    assert result.url == f"{hub.endpoint}/me/fused/commit/{commit.oid}"
    assert hub.token not in repr(result) and hub.token not in json.dumps(result.to_json())


def test_publish_build_several_outputs(build_a: Path, hub: MockHub, api: Any) -> None:
    results = publish_build(
        build_a, {"lora": PublishSpec("me/lora"), "grid": PublishSpec("me/grid")}, api=api
    )
    assert [r.status for r in results] == ["published", "published"]
    assert hub.files("me/lora") == expected_repo(build_a, "lora")
    assert hub.files("me/grid") == expected_repo(build_a, "grids")  # the grid is alone in its folder


def test_second_publish_is_unchanged_and_makes_no_commit(build_a: Path, hub: MockHub, api: Any) -> None:
    first = publish_output(build_a, "lora", PublishSpec("me/lora"), api=api)
    seen = len(hub.requests)
    again = publish_output(build_a, "lora", PublishSpec("me/lora"), api=api)
    assert again.status == "unchanged" and again.commit == first.commit
    assert again.message == f"already published at {first.commit} (tag {first.tag})"
    assert len(hub.commits_to("me/lora")) == 1
    assert [(r.method, r.path) for r in hub.requests[seen:]] == [("GET", "/api/models/me/lora/refs")]


def test_a_changed_build_makes_exactly_one_new_commit(
    build_a: Path, build_b: Path, hub: MockHub, api: Any
) -> None:
    a = publish_output(build_a, "lora", PublishSpec("me/lora"), api=api)
    b = publish_output(build_b, "lora", PublishSpec("me/lora"), api=api)
    assert b.status == "published" and b.digest != a.digest
    assert [c.oid for c in hub.commits_to("me/lora")] == [a.commit, b.commit]
    assert hub.commits_to("me/lora")[1].parent == a.commit
    assert hub.files("me/lora") == expected_repo(build_b, "lora")
    assert hub.tags("me/lora") == {a.tag: a.commit, b.tag: b.commit}
    assert publish_output(build_b, "lora", PublishSpec("me/lora"), api=api).status == "unchanged"

    # Back to build A: its tag exists but is not the head, so the branch is brought back to A's files.
    back = publish_output(build_a, "lora", PublishSpec("me/lora"), api=api)
    assert back.status == "published" and len(hub.commits_to("me/lora")) == 3
    assert hub.files("me/lora") == expected_repo(build_a, "lora")
    assert hub.tags("me/lora")[a.tag] == a.commit and f"stays at {a.commit}" in back.message
    # ... and once there, publishing A again changes nothing: the client finds no file to commit.
    again = publish_output(build_a, "lora", PublishSpec("me/lora"), api=api)
    assert (again.status, again.commit, len(hub.commits_to("me/lora"))) == ("unchanged", back.commit, 3)
    assert again.message.startswith(f"already published at {back.commit}; tag {a.tag} stays at {a.commit}")


def test_the_repo_equals_the_output_stale_files_are_deleted(build_a: Path, hub: MockHub, api: Any) -> None:
    hub.add_repo("me/lora", {"old/weights.bin": b"old", "README.md": b"# old\n"})
    publish_output(build_a, "lora", PublishSpec("me/lora"), api=api)
    kohya = publish_output(build_a, "lora-kohya", PublishSpec("me/lora"), api=api)
    assert kohya.deleted == ("pytorch_lora_weights.safetensors",)
    assert hub.commits_to("me/lora")[-1].deleted == ["pytorch_lora_weights.safetensors"]
    assert hub.files("me/lora") == expected_repo(build_a, "lora-kohya")


def test_custom_message_branch_and_public_repo(build_a: Path, hub: MockHub, api: Any) -> None:
    spec = PublishSpec("me/grid", private=False, revision="dev", commit_message="Release v1\n\nFirst grid.")
    result = publish_output(build_a, "grid", spec, api=api)
    assert result.revision == "dev" and not hub.repos["me/grid"].private
    assert set(hub.files("me/grid", "main")) == {".gitattributes"}
    assert hub.files("me/grid", "dev") == expected_repo(build_a, "grids")
    commit = hub.commits_to("me/grid")[-1]
    assert (commit.summary, commit.description.split("\n\n")[0]) == ("Release v1", "First grid.")
    assert "\n\nLorarecipe-Fingerprint: sha256:" in commit.description


def test_a_missing_repo_without_create_is_an_error(build_a: Path, hub: MockHub, api: Any) -> None:
    with pytest.raises(InputUnavailableError) as caught:
        publish_output(build_a, "lora", PublishSpec("me/absent", create=False), api=api)
    assert "me/absent does not exist on the Hub" in caught.value.message
    assert "create: true" in str(caught.value.problems[0].hint)
    assert "me/absent" not in hub.repos and hub.commits == []


# ---- token, offline, Hub errors -----------------------------------------------------------------


def test_a_missing_token_is_a_usage_error_before_any_request(build_a: Path, hub: MockHub) -> None:
    from huggingface_hub import HfApi

    with pytest.raises(UsageError) as caught:
        publish_output(build_a, "lora", PublishSpec("me/lora"), api=HfApi(endpoint=hub.endpoint))
    assert "HF_TOKEN" in caught.value.message and "hf auth login" in caught.value.message
    assert hub.requests == []


def test_the_token_comes_from_hf_token(build_a: Path, hub: MockHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", hub.token)
    result = publish_output(build_a, "lora", PublishSpec("me/lora"), api=HfApi(endpoint=hub.endpoint))
    assert result.status == "published"
    assert {r.authorization for r in hub.requests} == {f"Bearer {hub.token}"}


@pytest.mark.parametrize("how", ["environment", "read at import"])
def test_offline_mode_is_a_clear_error(
    how: str, build_a: Path, hub: MockHub, api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    if how == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="publishing needs the network, but HF_HUB_OFFLINE"):
        publish_output(build_a, "lora", PublishSpec("me/lora"), api=api)
    assert hub.requests == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    "setup, error, words",
    [
        (
            lambda h: setattr(h, "reject_token", True),
            UsageError,
            ["me/lora", "401", "HF_TOKEN", "hf auth login"],
        ),
        (lambda h: setattr(h, "forbid_create", True), UsageError, ["me/lora", "403", "write access"]),
        (lambda h: setattr(h, "race_commit", True), BuildError, ["me/lora changed while publishing (412)"]),
        (lambda h: setattr(h, "fail_with", (500, "boom")), BuildError, ["answered 500", "me/lora", "boom"]),
        (
            lambda h: setattr(h, "fail_with", (503, f"echo {h.token}")),
            BuildError,
            ["answered 503", "echo ***"],
        ),
    ],
    ids=["bad-token", "no-permission", "race", "server-error", "token-echoed"],
)
def test_hub_errors_become_lorarecipe_errors_without_the_token(
    setup: Callable[[MockHub], None],
    error: type[LorarecipeError],
    words: list[str],
    build_a: Path,
    hub: MockHub,
    api: Any,
) -> None:
    setup(hub)
    with pytest.raises(error) as caught:
        publish_output(build_a, "lora", PublishSpec("me/lora"), api=api)
    text = error_text(caught.value)
    assert all(word in text for word in words), text
    assert hub.token not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_an_unreachable_hub_is_a_build_error(build_a: Path, hub: MockHub) -> None:
    from huggingface_hub import HfApi

    port = _free_port()
    with loopback_allowed(port), pytest.raises(BuildError, match="cannot reach the Hub to publish me/lora"):
        api = HfApi(endpoint=f"http://127.0.0.1:{port}", token=hub.token)
        publish_output(build_a, "lora", PublishSpec("me/lora"), api=api)


# ---- refusals: only a finished, verified build ------------------------------------------------


def _flip_a_byte(root: Path) -> str:
    path = root / "fused" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))
    return "fused/unet/diffusion_pytorch_model.safetensors: changed since the build"


def _extra_file(root: Path) -> str:
    (root / "fused" / "notes.txt").write_text("mine")
    return "fused/notes.txt: not written by the build"


def _extra_grid_cell(root: Path) -> str:
    (root / "grids" / "sample_cells" / "extra.png").write_bytes(b"png")
    return "grids/sample_cells/extra.png: not written by the build"


def _missing_file(root: Path) -> str:
    (root / "fused" / "images" / "sample.png").unlink()
    return "fused/images/sample.png: missing"


def _missing_manifest(root: Path) -> str:
    (root / "manifest.json").unlink()
    return "no manifest.json (is this a lorarecipe build folder? build it first)"


def _build_interrupted(root: Path) -> str:
    (root / "manifest.json").rename(root / ".lorarecipe" / "previous-manifest.json")
    return "a build is running there or was interrupted"


def _leftover(root: Path) -> str:
    (root / "lora" / ".lorarecipe-tmp-0123456789ab-README.md").write_text("half")
    return "lora/.lorarecipe-tmp-0123456789ab-README.md: temporary file of an unfinished build"


def _symlinked_output(root: Path) -> str:
    (root / "lora").rename(root / "elsewhere")
    (root / "lora").symlink_to(root / "elsewhere", target_is_directory=True)
    return "lora: a symlink; builds never write one"


@pytest.mark.parametrize(
    "tamper",
    [
        _flip_a_byte,
        _extra_file,
        _extra_grid_cell,
        _missing_file,
        _missing_manifest,
        _build_interrupted,
        _leftover,
        _symlinked_output,
    ],
)
def test_an_unverified_build_is_refused_before_any_request(
    tamper: Callable[[Path], str], build_a: Path, tmp_path: Path, hub: MockHub, api: Any
) -> None:
    root = copy_build(build_a, tmp_path)
    expected = tamper(root)
    specs = {"fused": PublishSpec("me/fused"), "lora": PublishSpec("me/lora"), "grid": PublishSpec("me/grid")}
    for dry_run in (True, False):
        with pytest.raises(IntegrityError) as caught:
            publish_build(root, specs, api=api, dry_run=dry_run)
        assert expected in error_text(caught.value)
    assert hub.requests == []


def test_an_intact_copy_publishes(build_a: Path, tmp_path: Path, hub: MockHub, api: Any) -> None:
    """The refusals above come from the tampering, not from the copy."""
    root = copy_build(build_a, tmp_path)
    assert publish_output(root, "fused", PublishSpec("me/fused"), api=api).status == "published"


def test_a_running_build_holds_the_lock(build_a: Path, tmp_path: Path, hub: MockHub, api: Any) -> None:
    from filelock import FileLock

    root = copy_build(build_a, tmp_path)
    with FileLock(str(root / ".lorarecipe" / "build.lock")), pytest.raises(LockError, match="is writing to"):
        publish_output(root, "fused", PublishSpec("me/fused"), api=api)
    assert hub.requests == []


def test_an_unknown_output_is_a_usage_error(build_a: Path) -> None:
    with pytest.raises(UsageError, match=r"output 'fuse' is not in .*did you mean 'fused'"):
        publish_output(build_a, "fuse", PublishSpec("me/fused"), dry_run=True)


def test_two_outputs_to_one_repo_branch_are_refused(build_a: Path) -> None:
    with pytest.raises(UsageError, match="same repo and branch"):
        publish_build(build_a, {"lora": PublishSpec("me/x"), "lora-kohya": PublishSpec("me/x")}, dry_run=True)


# ---- the spec -----------------------------------------------------------------------------------

REPO_IDS = [
    "me/model",
    "my-org/sd_1.5-lora",
    "a/b",
    "_x/y_",
    "model",
    "a/b/c",
    "me/-model",
    "me/model-",
    "me/.model",
    "me/mo--del",
    "me/mo..del",
    "me/model.git",
    "me/mo del",
    "me/café",
    "me/" + "x" * 96,
    "me/" + "x" * 97,
    "",
]


@pytest.mark.parametrize("repo", REPO_IDS)
def test_repo_ids_follow_huggingface_hub(repo: str) -> None:
    """Same verdict as huggingface_hub's own validator, and a namespace is required."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
        theirs = "/" in repo
    except HFValidationError:
        theirs = False
    assert (repo_id_problem(repo) is None) == theirs
    if not theirs:
        with pytest.raises(UsageError, match="repo"):
            PublishSpec(repo)


@pytest.mark.parametrize("revision", ["", "refs/pr/1", "a..b", "dev/", "-x", "has space", "x.lock"])
def test_bad_revisions_are_refused(revision: str) -> None:
    with pytest.raises(UsageError, match="is not a branch name"):
        PublishSpec("me/model", revision=revision)


def test_result_fields() -> None:
    assert list(PublishResult.__dataclass_fields__) == [
        "output",
        "repo",
        "revision",
        "commit",
        "url",
        "status",
        "files",
        "tag",
        "digest",
        "deleted",
        "message",
    ]


def test_importing_publish_is_light() -> None:
    code = "import sys, lorarecipe.publish; print(sorted({'torch', 'huggingface_hub'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
