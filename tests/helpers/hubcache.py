"""Build real Hugging Face cache layouts in tests (refs/, snapshots/<sha>/ linking into blobs/)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_commit(repo: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",), label: str = "") -> str:
    """Put ``files`` (name -> source) into the HF cache as one commit named by ``refs``; returns its SHA.

    The SHA is derived from ``repo`` and ``label``, so one repo can hold several commits.
    """
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    sha = hashlib.sha1(f"{repo}@{label}".encode()).hexdigest()
    for name, source in files.items():
        blob = root / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = root / "snapshots" / sha / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(sha)
    return sha


def tree(folder: Path) -> dict[str, Path]:
    """Every file below ``folder`` by its relative POSIX path."""
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
