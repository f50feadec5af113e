"""Where a recipe may read and write: inputs inside its folder, outputs inside the output root.

Recipe-relative input path -> absolute path, or an ``UnsafeInputError``; output path -> normalized
relative path, or a ``ValueError`` message. ``..``, absolute paths and symlinks that escape are
refused unless the command line allows a named directory (``--allow-read DIR``). Pickle suffixes
are refused here too, before any file is opened. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ..errors import UnsafeInputError

__all__ = ["PICKLE_SUFFIXES", "RESERVED_OUTPUTS", "normalize_output_path", "resolve_input", "resolve_output"]

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
RESERVED_OUTPUTS = ("manifest.json", ".lorarecipe")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def resolve_input(ref: str, root: Path, allowed: Sequence[Path] = ()) -> Path:
    """A recipe-relative input path -> its real absolute path, confined to ``root`` or ``allowed``."""
    if "\x00" in ref:
        raise UnsafeInputError(f"path {ref!r} contains a NUL byte")
    if ref.lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeInputError(
            f"{ref}: pickle-based checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run code when loaded; "
            "lorarecipe only reads .safetensors (convert the file first)"
        )
    candidate = Path(ref).expanduser() if ref.startswith("~") else Path(ref)
    real_root = root.resolve()
    full = candidate if candidate.is_absolute() else real_root / candidate
    real = Path(os.path.realpath(full))
    folders = [real_root, *(Path(os.path.realpath(a)) for a in allowed)]
    if not any(_inside(real, folder) for folder in folders):
        why = "is absolute" if candidate.is_absolute() else "leaves the recipe's folder"
        if not candidate.is_absolute() and real != Path(os.path.normpath(full)):
            why = "is a symlink that leaves the recipe's folder"
        raise UnsafeInputError(
            f"input path {ref!r} {why} ({real}); recipes may only read inside {real_root}. "
            "Pass --allow-read DIR to allow another directory"
        )
    return real


def normalize_output_path(rel: str) -> str:
    """Validate an output path relative to the output root; return it in normalized POSIX form."""
    if not rel or "\x00" in rel:
        raise ValueError("output path is empty")
    if rel.startswith(("/", "\\", "~")) or (len(rel) > 1 and rel[1] == ":"):
        raise ValueError(f"output path {rel!r} is absolute; outputs are written inside the output root")
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if ".." in parts:
        raise ValueError(f"output path {rel!r} leaves the output root ('..')")
    clean = [p for p in parts if p not in (".", "")]
    if not clean:
        raise ValueError(f"output path {rel!r} is the output root itself")
    if clean[0] in RESERVED_OUTPUTS:
        raise ValueError(f"output path {rel!r} is reserved for lorarecipe's own files")
    if any(p.startswith(".lorarecipe") for p in clean):
        raise ValueError(f"output path {rel!r} uses a name reserved for lorarecipe's temporary files")
    return "/".join(clean)


def resolve_output(out_root: Path, rel: str) -> Path:
    """Output root + relative path -> absolute path; refuses symlinks that lead out of the root."""
    norm = normalize_output_path(rel)
    real_root = Path(os.path.realpath(out_root))
    target = real_root / norm
    probe = real_root
    for part in PurePosixPath(norm).parts:
        probe = probe / part
        if probe.is_symlink():
            raise UnsafeInputError(
                f"output path {rel!r} goes through a symlink ({probe}); lorarecipe never writes through "
                "symlinks in the output root"
            )
    return target
