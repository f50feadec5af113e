"""Crash safety: a killed, concurrent or disk-full build never leaves a broken output or cache entry.

- ``atomic_dir`` swaps an existing folder in one ``renameat2(RENAME_EXCHANGE)`` on Linux (the final
  path is never empty) and falls back to two renames elsewhere, whose kill window is repaired by the
  next build; both paths are tested, including a real SIGKILL between the steps.
- A real ``lorarecipe build`` subprocess is killed with SIGKILL at chosen moments: the trigger is the
  build's own temporary files appearing on disk (deterministic, unlike sleeping a fraction of the
  build time), so every kill lands inside a write. After each kill every file at a final path is
  complete and valid, leftovers are only ``.lorarecipe-tmp-*``, and the next build completes and
  verifies. The same is done while the built-in model cache is materialized for the first time.
- A second build into the same output root is refused (exit 1, folder named) while the first one is
  paused in the middle of a write, and does not touch the first one's files.
- ENOSPC while writing -> exit 1 with the errno's message at the recipe line, no traceback, and the
  previous version of the output being written byte-identical.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lorarecipe.cli import main
from lorarecipe.compiler import compile_recipe
from lorarecipe.fs import atomic
from lorarecipe.fs.atomic import TMP_PREFIX, atomic_dir, atomic_file, clean_stale_temporaries
from lorarecipe.recipe.load import load_recipe
from lorarecipe.runner import LOCK_NAME  # the output root's build lock, relative to the root

REPO = Path(__file__).resolve().parents[1]
LINUX_EXCHANGE = pytest.mark.skipif(atomic._renameat2 is None, reason="renameat2 is Linux/glibc only")
CARD_FILES = re.compile(r"(^|/)(README\.md|images/.*)$")  # model cards are added after the folder swap

# Every output kind, small enough that a build takes seconds on two CPU cores.
RECIPE = """\
name: crash
variables: {w: 0.7}
base: builtin:tiny-sd
adapters:
  style: builtin:tiny-sd/style
  detail: {builtin: tiny-sd/detail, trigger_words: [fine detail]}
merges:
  both:
    method: cat
    adapters: {style: 1.0, detail: 0.5}
set_adapters:
  adapters: {style: "{{ w }}", detail: 0.5}
fuse:
  lora_scale: 1.0
outputs:
  fused: {kind: pipeline, path: fused}
  checkpoint: {kind: single_file, path: fused.safetensors}
  lora: {kind: lora, adapter: both, path: lora}
  grid:
    kind: grid
    path: grids/g.png
    prompts: [a cat]
    seeds: [0]
    steps: 2
    variants: [base]
"""


# ---- atomic_dir / atomic_file: the two replacement paths and what a kill between steps leaves ----


def _folder(path: Path, marker: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "marker").write_text(marker)
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "data.bin").write_bytes(marker.encode() * 100)


def _replace(final: Path, marker: str) -> None:
    with atomic_dir(final) as tmp:
        _folder(tmp, marker)


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"{TMP_PREFIX}*"))


@LINUX_EXCHANGE
def test_replacing_a_folder_is_one_atomic_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With RENAME_EXCHANGE the final path always holds a complete folder, even mid-replacement."""
    final = tmp_path / "out"
    _replace(final, "v0")

    def no_fallback(tmp: Path, final: Path) -> None:
        raise AssertionError("the two-rename fallback must not run where RENAME_EXCHANGE works")

    monkeypatch.setattr(atomic, "_replace_by_two_renames", no_fallback)
    missing: list[str] = []
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            try:
                text = (final / "marker").read_text()
            except FileNotFoundError:
                missing.append("marker")
                continue
            if len(text) != 2:
                missing.append(text)

    observer = threading.Thread(target=observe)
    observer.start()
    try:
        for i in range(1, 150):
            _replace(final, f"v{i % 10}")
    finally:
        stop.set()
        observer.join()
    assert missing == [], "a reader saw no folder (or a partial one) at the final path"
    assert (final / "marker").read_text() == "v9"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("why", ["no renameat2", "filesystem says EINVAL"])
def test_without_exchange_two_renames_replace_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """macOS, musl, old kernels, filesystems without RENAME_EXCHANGE: same result, two renames."""
    if why == "no renameat2":
        monkeypatch.setattr(atomic, "_renameat2", None)
    else:

        def refuses(*args: object) -> int:
            ctypes.set_errno(errno.EINVAL)
            return -1

        monkeypatch.setattr(atomic, "_renameat2", refuses)
    used: list[Path] = []
    real = atomic._replace_by_two_renames

    def spy(tmp: Path, final: Path) -> None:
        used.append(final)
        real(tmp, final)

    monkeypatch.setattr(atomic, "_replace_by_two_renames", spy)
    final = tmp_path / "out"
    _replace(final, "v0")
    _replace(final, "v1")
    assert used == [final]  # the first write had nothing to replace
    assert (final / "marker").read_text() == "v1"
    assert (final / "sub" / "data.bin").read_bytes() == b"v1" * 100
    assert _leftovers(tmp_path) == []


def test_exchange_errors_other_than_unsupported_are_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(*args: object) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(atomic, "_renameat2", fails)
    final = tmp_path / "out"
    _replace(final, "v0")
    with pytest.raises(OSError, match="Input/output error"):
        _replace(final, "v1")
    assert (final / "marker").read_text() == "v0"
    assert _leftovers(tmp_path) == []


def test_failed_second_rename_puts_the_previous_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic, "_renameat2", None)
    final = tmp_path / "out"
    _replace(final, "v0")
    real = os.replace
    calls: list[str] = []

    def second_fails(src: object, dst: object) -> None:
        calls.append(str(dst))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="No space left"):
        _replace(final, "v1")
    monkeypatch.setattr(os, "replace", real)
    assert (final / "marker").read_text() == "v0"
    assert _leftovers(tmp_path) == []


_KILL_MIDWAY = """\
import os, signal, sys
from pathlib import Path
from lorarecipe.fs import atomic

final, step = Path(sys.argv[1]), sys.argv[2]
if step == "fallback":
    atomic._renameat2 = None
    real = os.replace
    calls = []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # between "old aside" and "new in"
        real(src, dst)
    atomic.os.replace = replace
else:
    def remove(path):
        os.kill(os.getpid(), signal.SIGKILL)  # swapped, previous version not deleted yet
    atomic._remove = remove
with atomic.atomic_dir(final) as tmp:
    (tmp / "marker").write_text("new")
"""


@pytest.mark.parametrize("step", ["fallback", pytest.param("exchange", marks=LINUX_EXCHANGE)])
def test_sigkill_between_the_steps_of_a_folder_swap_is_repaired(tmp_path: Path, step: str) -> None:
    """The two-rename window leaves no folder at the final path; the next build's cleanup puts the
    previous version back. After an exchange, only the previous version is left to delete."""
    final = tmp_path / "out"
    _folder(final, "old")
    proc = subprocess.run([sys.executable, "-c", _KILL_MIDWAY, str(final), step], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    if step == "fallback":
        assert not final.exists()
        assert [p.name.startswith(TMP_PREFIX + "old-") for p in tmp_path.iterdir()].count(True) == 1
        expected = "old"
    else:
        assert (final / "marker").read_text() == "new"
        expected = "new"
    clean_stale_temporaries(tmp_path)
    assert (final / "marker").read_text() == expected
    assert (final / "sub" / "data.bin").read_bytes() == b"old" * 100 if expected == "old" else True
    assert _leftovers(tmp_path) == []


def _enospc_on_files(monkeypatch: pytest.MonkeyPatch, when: Callable[[str], bool]) -> list[str]:
    """Make ``os.fsync`` of a regular file whose path satisfies ``when`` fail with ENOSPC (as a full
    disk reports delayed-allocation failures); returns the paths it failed."""
    real = os.fsync
    failed: list[str] = []

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            path = os.readlink(f"/proc/self/fd/{fd}")
            if when(path):
                failed.append(path)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_fsync_failure_inside_a_folder_is_an_error_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync error means the data may never reach the disk: the folder must not be swapped in."""
    final = tmp_path / "out"
    _replace(final, "v0")
    failed = _enospc_on_files(monkeypatch, lambda p: p.endswith(("data.bin", "f.bin")))
    with pytest.raises(OSError, match="No space left on device"):
        _replace(final, "v1")
    assert failed and (final / "marker").read_text() == "v0"
    with pytest.raises(OSError, match="No space left on device"), atomic_file(tmp_path / "f.bin") as tmp:
        tmp.write_bytes(b"x")
    assert not (tmp_path / "f.bin").exists()
    assert _leftovers(tmp_path) == []


def test_a_failing_writer_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    final = tmp_path / "f.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer crashed")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as folder:
        (folder / "x").write_text("half")
        raise RuntimeError("writer crashed")
    assert final.read_text() == "old" and not (tmp_path / "d").exists()
    assert _leftovers(tmp_path) == []


def test_cleanup_keeps_finished_outputs_and_removes_only_temporaries(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / f"{TMP_PREFIX}0123456789ab-x.safetensors").write_bytes(b"partial")
    (tmp_path / f"{TMP_PREFIX}0123456789ab-dir").mkdir()
    (tmp_path / f"{TMP_PREFIX}0123456789ab-dir" / "f").write_text("partial")
    (tmp_path / f"{TMP_PREFIX}old-0123456789ab-kept").mkdir()  # its original still exists: delete
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "f").write_text("current")
    removed = clean_stale_temporaries(tmp_path)
    assert len(removed) == 3
    assert _leftovers(tmp_path) == [] and (tmp_path / "kept" / "f").read_text() == "current"


# ---- real builds killed with SIGKILL ----


def _lorarecipe(
    *args: str, env: dict[str, str] | None = None, stderr: Path | None = None
) -> subprocess.Popen[bytes]:
    """``python -m lorarecipe …`` as a child process (stderr to a file: no pipe to fill up)."""
    handle = open(stderr, "wb") if stderr else subprocess.DEVNULL  # noqa: SIM115 (closed by the child's exit)
    child = subprocess.Popen(
        [sys.executable, "-m", "lorarecipe", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=handle,
    )
    _CHILDREN.append(child)
    return child


_CHILDREN: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_orphan_builds() -> Iterator[None]:
    """A failed assertion must not leave a (possibly SIGSTOPped) build running after the test."""
    yield
    while _CHILDREN:
        child = _CHILDREN.pop()
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()


def _tmp_named(root: Path, name: str, *, non_empty: bool = False) -> Callable[[], bool]:
    """True once a temporary for final name ``name`` exists under ``root`` (a write has begun);
    with ``non_empty``, once that temporary folder has something in it (the write is under way)."""
    pattern = re.compile(rf"^{re.escape(TMP_PREFIX)}[0-9a-f]{{12}}-{re.escape(name)}$")

    def ready() -> bool:
        with contextlib.suppress(OSError):
            for dirpath, dirnames, filenames in os.walk(root):
                for found in (n for n in [*dirnames, *filenames] if pattern.match(n)):
                    if not non_empty or any(os.scandir(Path(dirpath) / found)):
                        return True
        return False

    return ready


def _wait_for(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the build ended (exit {proc.returncode}) before the kill point"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.002)


def _sigkill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _file_is_valid(path: Path) -> None:
    """Complete and parseable: safetensors by lorarecipe's strict reader and by safetensors itself."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from lorarecipe.inspect import read_header

        header = read_header(path)
        assert set(load_file(str(path))) == set(header.tensors), path
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    elif path.suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    else:
        path.read_bytes()


def _fingerprint_of(path: Path) -> str:
    from lorarecipe.inspect import read_header

    return read_header(path).metadata["lorarecipe.fingerprint"]


def _final_files(out: Path) -> dict[str, Path]:
    """Every file at a final path (temporaries and the lock excluded), checked complete and valid."""
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(TMP_PREFIX) or path == out / LOCK_NAME:
                continue
            _file_is_valid(path)
            files[path.relative_to(out).as_posix()] = path
    return files


def _fingerprint(recipe: Path, w: str) -> str:
    return compile_recipe(load_recipe(recipe, {"w": w})).fingerprint()


@pytest.fixture(scope="module")
def warm_cache() -> None:
    """Materialize the built-ins once, so the timed subprocesses measure builds, not the cache."""
    from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path

    builtin_base_path("tiny-sd")
    builtin_lora_path("tiny-sd/style")
    builtin_lora_path("tiny-sd/detail")


@pytest.mark.slow
def test_sigkill_mid_write_leaves_complete_outputs_and_a_second_build_is_refused(
    tmp_path: Path, warm_cache: None
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    snapshots: list[dict[str, Path]] = []

    # 1. First build, paused with SIGSTOP while its first output is half written (lock held).
    first = _lorarecipe("build", str(recipe), "--out", str(out), "--quiet")
    _wait_for(first, _tmp_named(out, "lora"))
    first.send_signal(signal.SIGSTOP)
    try:
        partial = _leftovers(out)
        err = tmp_path / "second.err"
        second = _lorarecipe("build", str(recipe), "--out", str(out), "--quiet", stderr=err)
        assert second.wait(timeout=240) == 1
        message = err.read_text()
        assert f"another lorarecipe build is writing to {out}" in message
        assert "Traceback" not in message
        assert first.poll() is None, "the first build must still be running: the builds overlapped"
        assert _leftovers(out) == partial, "the refused build touched the running build's files"
    finally:
        first.send_signal(signal.SIGCONT)
    # ... then killed once its last output is at its final path (model cards and manifest pending).
    _wait_for(first, lambda: (out / "grids" / "g.png").exists())  # checkpoints stream first; the grid is last
    _sigkill(first)
    snapshots.append(_final_files(out))
    assert {"fused.safetensors", "lora/pytorch_lora_weights.safetensors", "grids/g.png"} <= set(snapshots[0])
    old = _fingerprint(recipe, "0.7")
    assert _fingerprint_of(out / "fused" / "unet" / "diffusion_pytorch_model.safetensors") == old

    # 2. A changed rebuild, killed while it replaces the existing pipeline folder.
    rebuild = _lorarecipe("build", str(recipe), "--out", str(out), "--quiet", "--set", "w=0.3")
    _wait_for(rebuild, _tmp_named(out, "fused", non_empty=True))
    _sigkill(rebuild)
    snapshots.append(_final_files(out))
    # the folder being replaced is still the previous, complete one
    assert _fingerprint_of(out / "fused" / "unet" / "diffusion_pytorch_model.safetensors") == old
    assert _fingerprint_of(out / "fused.safetensors") == old
    assert _fingerprint_of(out / "lora" / "pytorch_lora_weights.safetensors") in (
        old,
        _fingerprint(recipe, "0.3"),
    )

    # 3. The next build cleans up, completes and verifies.
    err = tmp_path / "final.err"
    final = _lorarecipe("build", str(recipe), "--out", str(out), "--quiet", stderr=err)
    assert final.wait(timeout=300) == 0, err.read_text()
    assert _leftovers(out) == []
    files = _final_files(out)
    assert main(["verify", str(out)]) == 0
    for name, path in files.items():
        if path.suffix == ".safetensors":
            assert _fingerprint_of(path) == old, name
    # every folder seen after a kill was whole: the same files as a finished build (cards aside)
    for snapshot in snapshots:
        for rel in snapshot:
            assert rel in files or CARD_FILES.search(rel), f"{rel} is not an output file"
        folders = {rel.split("/")[0] for rel in snapshot if "/" in rel and not rel.startswith(".")}
        for folder in folders:
            seen = {r for r in snapshot if r.startswith(folder + "/") and not CARD_FILES.search(r)}
            want = {r for r in files if r.startswith(folder + "/") and not CARD_FILES.search(r)}
            if folder == "grids":  # a grid is its PNG, its JSON sidecar and a cells folder, each atomic
                seen = {r for r in seen if "_cells/" in r}
                want = {r for r in want if "_cells/" in r} if seen else set()
            assert seen == want, folder


LORA_ONLY = """\
base: builtin:tiny-sd
adapters:
  style: builtin:tiny-sd/style
outputs:
  lora: {kind: lora, adapter: style, path: lora, card: false}
"""


@pytest.mark.slow
def test_sigkill_while_the_builtin_cache_is_first_materialized(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(LORA_ONLY)
    cache = tmp_path / "cache"
    env = {"LORARECIPE_CACHE": str(cache)}
    bases = cache / "builtin"
    build = _lorarecipe("build", str(recipe), "--out", str(tmp_path / "out"), "--quiet", env=env)
    _wait_for(build, _tmp_named(bases, "tiny-sd", non_empty=True))  # save_pretrained under way
    _sigkill(build)
    assert _leftovers(cache), "the kill was meant to land inside the cache write"
    for base in bases.rglob("bases/tiny-sd"):
        assert (base / "model_index.json").is_file()  # a folder at the final path is complete
    err = tmp_path / "again.err"
    again = _lorarecipe("build", str(recipe), "--out", str(tmp_path / "out"), "--quiet", env=env, stderr=err)
    assert again.wait(timeout=300) == 0, err.read_text()
    assert _leftovers(cache) == []
    entries = sorted(cache.rglob("*.safetensors"))
    assert len(entries) >= 4  # unet, vae, text encoder, the LoRA
    for path in entries:
        _file_is_valid(path)
    assert main(["verify", str(tmp_path / "out")]) == 0


# ---- disk full while writing: exit 1, a located message, the previous output intact ----

NO_GRID = textwrap.dedent(
    """\
    name: diskfull
    variables: {w: 0.7}
    base: builtin:tiny-sd
    adapters:
      style: builtin:tiny-sd/style
      detail: builtin:tiny-sd/detail
    merges:
      both: {method: cat, adapters: {style: 1.0, detail: 0.5}}
    set_adapters:
      adapters: {style: "{{ w }}", detail: 0.5}
    fuse:
      lora_scale: 1.0
    outputs:
      lora: {kind: lora, adapter: both, path: lora}
      fused: {kind: pipeline, path: fused, card: false}
      checkpoint: {kind: single_file, path: fused.safetensors}
    """
)
BOOKKEEPING = ("manifest.json", ".lorarecipe/")  # lorarecipe's own files, not outputs
NEEDS_PROC = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p != root / LOCK_NAME
    }


def _outputs_only(digests: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in digests.items() if not k.startswith(BOOKKEEPING)}


@pytest.fixture(scope="module")
def previous_build(tmp_path_factory: pytest.TempPathFactory, warm_cache: None) -> Path:
    folder = tmp_path_factory.mktemp("diskfull")
    recipe = folder / "recipe.yaml"
    recipe.write_text(NO_GRID)
    assert main(["build", str(recipe), "--out", str(folder / "out"), "--quiet"]) == 0
    return folder


def _copy_of(previous: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the previous build (recipe, output root) for a test to break."""
    import shutil

    shutil.copytree(previous, tmp_path / "b", symlinks=True)
    return tmp_path / "b" / "recipe.yaml", tmp_path / "b" / "out"


def _rebuild(recipe: Path, out: Path, *extra: str) -> int:
    """Rebuild every output (``--force``: the up-to-date check would skip unchanged ones)."""
    return main(["build", str(recipe), "--out", str(out), "--quiet", "--force", *extra])


def _under_tmp_for(name: str) -> Callable[[str], bool]:
    """A file path inside a temporary written for the final entry ``name``."""
    pattern = re.compile(rf"/{re.escape(TMP_PREFIX)}[0-9a-f]{{12}}-{re.escape(name)}(/|$)")
    return lambda path: pattern.search(path) is not None


@pytest.mark.slow
@NEEDS_PROC
@pytest.mark.parametrize(
    ("failing", "line"),
    [("fused", 15), ("fused.safetensors", 16), ("lora", 14)],
    ids=["first-output", "single-file", "lora-folder"],
)
def test_disk_full_while_writing_exits_1_and_keeps_the_previous_output(
    previous_build: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failing: str,
    line: int,
) -> None:
    recipe, out = _copy_of(previous_build, tmp_path)
    before = _digests(out)
    failed = _enospc_on_files(monkeypatch, _under_tmp_for(failing))
    code = _rebuild(recipe, out, "--set", "w=0.3")
    err = capsys.readouterr().err
    assert failed, "the simulated disk error was never hit"
    assert code == 1, err
    assert "No space left on device" in err and "Traceback" not in err
    assert f"recipe.yaml:{line}:" in err  # located at the output's recipe line
    assert _leftovers(out) == []
    after = _digests(out)
    kept = {k: v for k, v in before.items() if k == failing or k.startswith(failing + "/")}
    assert kept and all(after.get(k) == v for k, v in kept.items()), "the previous output changed"
    if failing == "fused":  # streamed first: nothing was replaced yet, every previous output is untouched
        assert _outputs_only(after) == _outputs_only(before)
    # the manifest lists exactly what is complete: verify passes, and the next build restores it whole
    assert main(["verify", str(out)]) == 0, capsys.readouterr().err
    monkeypatch.undo()
    assert _rebuild(recipe, out) == 0 and main(["verify", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["build_complete"] is True


@pytest.mark.slow
@NEEDS_PROC
@pytest.mark.parametrize("failing", ["manifest.json", "README.md", "state.json"])
def test_disk_full_outside_an_output_step_is_a_clean_error(
    previous_build: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failing: str,
) -> None:
    recipe, out = _copy_of(previous_build, tmp_path)
    before = (out / "manifest.json").read_bytes()
    failed = _enospc_on_files(monkeypatch, _under_tmp_for(failing))
    code = _rebuild(recipe, out)
    err = capsys.readouterr().err
    assert failed, "the simulated disk error was never hit"
    assert _leftovers(out) == []
    assert "Traceback" not in err, err
    assert code == 1 and "No space left on device" in err
    # whatever failed, manifest.json stands and is true (it lists only complete, unchanged outputs);
    # the next build restores a complete one
    assert (out / "manifest.json").is_file() and main(["verify", str(out)]) == 0
    if failing == "manifest.json":  # its first write (before any output is replaced) failed
        assert (out / "manifest.json").read_bytes() == before
    monkeypatch.undo()
    assert _rebuild(recipe, out) == 0 and main(["verify", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["build_complete"] is True


@pytest.mark.slow
@NEEDS_PROC
def test_a_failed_rebuild_never_leaves_a_manifest_that_contradicts_the_files(
    previous_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a rebuild that fails (or is killed) half-way, manifest.json is either gone or true."""
    recipe, out = _copy_of(previous_build, tmp_path)
    _enospc_on_files(monkeypatch, _under_tmp_for("fused.safetensors"))
    assert _rebuild(recipe, out, "--set", "w=0.3") == 1
    monkeypatch.undo()
    capsys.readouterr()
    if (out / "manifest.json").exists():
        assert main(["verify", str(out)]) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_build_state_is_recorded_while_the_output_root_is_locked(
    previous_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from lorarecipe.gitops import incremental

    recipe, out = _copy_of(previous_build, tmp_path)
    unlocked: list[bool] = []
    real = incremental.record_state

    def record_state(out_root: Path, *args: object, **kwargs: object) -> None:
        assert (out_root / LOCK_NAME).is_file()
        with open(out_root / LOCK_NAME, "a") as handle:  # another open file: flock conflicts
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                unlocked.append(False)
            else:
                fcntl.flock(handle, fcntl.LOCK_UN)
                unlocked.append(True)
        real(out_root, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(incremental, "record_state", record_state)
    assert _rebuild(recipe, out, "--set", "w=0.3") == 0
    assert unlocked == [False], "state.json was written without holding the output root's lock"
