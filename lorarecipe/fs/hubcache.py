"""Read-only lookups in the local Hugging Face cache, without importing huggingface_hub.

(repo id, revision, filename) -> cached path and commit SHA, or None. ``validate``/``plan`` use it
to check hub inputs that are already cached; importing ``huggingface_hub.file_download`` alone
costs ~280 ms here, more than half of validate's budget. The layout (``models--org--name/refs``,
``snapshots/<sha>``) and the environment variables follow huggingface_hub's
``try_to_load_from_cache``; ``tests/test_hub_offline.py`` checks both agree. Downloads, locks and
online resolution use huggingface_hub itself (``runner.inputs``, ``gitops.lock``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["cached_file", "cached_snapshot", "hub_cache_dir"]

_SHA = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def repo_folder_name(repo_id: str, repo_type: str = "model") -> str:
    """'org/name' -> 'models--org--name' (huggingface_hub's naming)."""
    return "--".join([f"{repo_type}s", *repo_id.split("/")])


def cached_snapshot(
    repo_id: str, revision: str | None, cache_dir: Path | None = None
) -> tuple[str, Path] | None:
    """(commit sha, snapshot folder) of ``revision`` (branch, tag or sha) if it is in the cache."""
    repo_cache = (cache_dir or hub_cache_dir()) / repo_folder_name(repo_id)
    if not repo_cache.is_dir():
        return None
    commit = revision or "main"
    ref_file = repo_cache / "refs" / commit
    if "/" not in commit and ".." not in commit and ref_file.is_file():
        commit = ref_file.read_text(encoding="utf-8", errors="replace").strip()
    if not _SHA.match(commit):
        return None
    snapshot = repo_cache / "snapshots" / commit
    return (commit, snapshot) if snapshot.is_dir() else None


def cached_file(
    repo_id: str, filename: str, revision: str | None, cache_dir: Path | None = None
) -> tuple[str, Path] | None:
    """(commit sha, path) of ``filename`` at ``revision`` if it is in the cache."""
    if filename.startswith("/") or ".." in Path(filename).parts:
        return None
    found = cached_snapshot(repo_id, revision, cache_dir)
    if found is None:
        return None
    commit, snapshot = found
    path = snapshot / filename
    return (commit, path) if path.is_file() else None
