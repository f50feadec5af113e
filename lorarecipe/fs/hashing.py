"""sha256 of files, with a stat-keyed cache so unchanged multi-GB inputs are hashed once.

Path -> hex digest. The cache (``<lorarecipe cache>/hashes.json``) is keyed by real path, size,
mtime and inode; any change of those rehashes. ``--frozen`` builds bypass the cache for inputs, so a
file modified with a forged mtime is still caught. Torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

from .atomic import atomic_write_text, cache_root
from .json_files import read_json

__all__ = ["path_digest", "sha256_file", "sha256_text"]

_CHUNK = 4 * 1024 * 1024
_memory: dict[str, str] = {}
_running: dict[str, threading.Event] = {}  # key -> set when the thread hashing that file is done
_lock = threading.Lock()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _key(path: Path) -> str:
    st = path.stat()
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _cache_file() -> Path:
    return cache_root() / "hashes.json"


def _load_cache() -> dict[str, str]:
    with contextlib.suppress(OSError, ValueError):
        data = read_json(_cache_file())
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    return {}


def sha256_file(path: Path, *, use_cache: bool = True) -> str:
    """Hex sha256 of a file's bytes. Thread-safe: a file being hashed by another thread (a build
    hashes its inputs in the background while it streams them) is waited for, not hashed twice."""
    key = _key(path)
    if use_cache:
        with _lock:
            if key in _memory:
                return _memory[key]
            running = _running.get(key)
            if running is None:
                _running[key] = threading.Event()
        if running is not None:
            running.wait()
            if key in _memory:
                return _memory[key]
            return sha256_file(path, use_cache=use_cache)  # the other thread failed: try ourselves
        try:
            return _hash_and_remember(path, key)
        finally:
            with _lock:
                _running.pop(key).set()
    return _hash(path)


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_and_remember(path: Path, key: str) -> str:
    big = path.stat().st_size > 64 * 1024 * 1024  # only big files are worth a disk entry
    if big:
        disk = _load_cache()
        if key in disk:
            _memory[key] = disk[key]
            return disk[key]
    value = _hash(path)
    _memory[key] = value
    if big:
        with contextlib.suppress(OSError), _lock:
            cache = _load_cache()
            cache[key] = value
            _cache_file().parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(_cache_file(), json.dumps(cache, sort_keys=True))
    return value


def path_digest(path: Path) -> str | None:
    """The content hash of a file (its sha256) or of a folder (the sorted list of every visible file's
    relative path and sha256, as canonical JSON); None when the path does not exist."""
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        entries = []
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path)
            if any(part.startswith(".") for part in rel.parts):
                continue
            entries.append([rel.as_posix(), sha256_file(file)])
        return json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return None
