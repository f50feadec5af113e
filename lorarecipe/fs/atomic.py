"""Crash-safe file output: temporary path in the same folder, fsync, then rename into place.

A reader never sees a half-written file at a final path: a SIGKILL at any moment leaves either the
previous file or the new one (plus, at worst, a ``.lorarecipe-tmp-*`` leftover that the next build
removes). A folder that already exists is swapped with the new one in a single
``renameat2(RENAME_EXCHANGE)`` on Linux, so the final path is never empty; elsewhere (or on a
filesystem without it) the old folder is moved aside first, under a name that
``clean_stale_temporaries`` moves back if a kill struck between the two renames. An fsync failure
(ENOSPC, EIO) is an error, never ignored: it means the data may not be on disk. Torch-free.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "TMP_PREFIX",
    "atomic_dir",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "cache_root",
    "clean_stale_temporaries",
    "fsync_dir",
]

TMP_PREFIX = ".lorarecipe-tmp-"
_ASIDE = "old-"  # TMP_PREFIX + "old-<hex>-<name>": a previous version moved aside, not a partial write
_ASIDE_NAME = re.compile(rf"^{re.escape(TMP_PREFIX + _ASIDE)}[0-9a-f]{{12}}-(?P<name>.+)$")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errno values meaning "this kernel / filesystem cannot exchange": fall back to two renames
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def cache_root() -> Path:
    """lorarecipe's own cache (built-in models, build keys): $LORARECIPE_CACHE or ~/.cache/lorarecipe."""
    env = os.environ.get("LORARECIPE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorarecipe"


def fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_sibling(final: Path, kind: str = "") -> Path:
    return final.parent / f"{TMP_PREFIX}{kind}{uuid.uuid4().hex[:12]}-{final.name}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_Renameat2 = Callable[[int, bytes, int, bytes, int], int]


def _load_renameat2() -> _Renameat2 | None:
    """glibc's ``renameat2`` (2.28+) through ctypes, or None on other platforms and C libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2: _Renameat2 | None = _load_renameat2()


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (both must exist); False when the platform cannot.

    False means nothing happened and the caller should fall back; any other failure raises ``OSError``.
    """
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success fsync and rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_file(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``final`` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))


def _fsync_tree(root: Path) -> None:
    """fsync every regular file, then every folder, under ``root``; a file that fails raises."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not stat.S_ISREG(path.lstat().st_mode):
                continue  # symlinks and special files have no data of ours to flush
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(dirpath))


def _replace_by_two_renames(tmp: Path, final: Path) -> None:
    """Fallback without RENAME_EXCHANGE: move the old entry aside, move the new one in.

    A kill between the two renames leaves no entry at ``final`` but the old one under a name
    that ``clean_stale_temporaries`` restores; a failed second rename is undone at once.
    """
    aside = _tmp_sibling(final, _ASIDE)
    os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    _remove(aside)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success it replaces ``final`` as a whole."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if not (final.exists() or final.is_symlink()):
            os.replace(tmp, final)
            fsync_dir(final.parent)
        elif exchange_paths(tmp, final):
            fsync_dir(final.parent)  # ``tmp`` now holds the previous version; removed below
        else:
            _replace_by_two_renames(tmp, final)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def clean_stale_temporaries(root: Path) -> list[Path]:
    """Remove ``.lorarecipe-tmp-*`` leftovers of killed builds under ``root`` (call under the build lock).

    A previous version moved aside by the two-rename fallback is moved back when nothing took its
    place (the kill struck between the renames); it is not listed among the removed paths.
    """
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted([*dirnames, *filenames]):
            if not name.startswith(TMP_PREFIX):
                continue
            path = Path(dirpath) / name
            aside = _ASIDE_NAME.match(name)
            if aside is not None:
                original = Path(dirpath) / aside["name"]
                if not (original.exists() or original.is_symlink()):
                    os.replace(path, original)
                    fsync_dir(Path(dirpath))
                    continue
            _remove(path)
            removed.append(path)
        dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
    return removed
