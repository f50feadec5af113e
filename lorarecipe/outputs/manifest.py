"""The provenance manifest of a build folder, and ``lorarecipe verify``.

Build facts -> ``manifest.json`` (written last, atomically): the recipe text and sha256, the plan
fingerprint and steps, every input (source, requested revision, resolved commit, sha256, size),
every output file (path, sha256, size), seeds, device, dtypes, library versions, step timings.
``verify`` recomputes every output hash against it. Torch-free (library versions are read from
package metadata).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import IntegrityError, LorarecipeError, Problem
from ..fs.atomic import atomic_write_text
from ..fs.hashing import sha256_file
from ..fs.json_files import FilePath, check_shape, read_json

__all__ = [
    "BUILD_LOCK",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "PREVIOUS_MANIFEST",
    "VerifyResult",
    "file_entry",
    "library_versions",
    "read_manifest",
    "verify_outdir",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
#: The output root's build lock: held by a build while it writes, and by ``publish`` while it reads.
BUILD_LOCK = ".lorarecipe/build.lock"
#: Where a build moves manifest.json while it replaces outputs (restored or replaced when it ends).
PREVIOUS_MANIFEST = ".lorarecipe/previous-manifest.json"
MANIFEST_FORMAT = 1
#: A manifest holds the recipe text (at most 1 MB, up to 6x when JSON-escaped) and the file lists.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_LIBRARIES = (
    "lorarecipe",
    "torch",
    "diffusers",
    "peft",
    "transformers",
    "safetensors",
    "huggingface_hub",
    "accelerate",
    "pillow",
    "numpy",
)


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in _LIBRARIES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def file_entry(path: Path, root: Path) -> dict[str, Any]:
    """{"path": relative posix path, "sha256": …, "size": …} of one output file."""
    return {
        "path": path.relative_to(root).as_posix(),
        "sha256": sha256_file(path, use_cache=False),
        "size": path.stat().st_size,
    }


def write_manifest(out_root: Path, doc: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically; it is the last file of a build."""
    path = out_root / MANIFEST_NAME
    atomic_write_text(
        path, json.dumps({"lorarecipe_manifest": MANIFEST_FORMAT, **doc}, indent=2, sort_keys=True) + "\n"
    )
    return path


class _FileDoc(BaseModel):
    """The parts of a manifest that lorarecipe reads back (verify, publish, incremental builds), checked
    before they are used: one place for the format. Other keys are provenance for people."""

    model_config = ConfigDict(extra="allow")
    path: FilePath
    sha256: str
    size: int = Field(ge=0)


class _OutputDoc(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: FilePath | None = None
    files: list[_FileDoc]


class _ManifestDoc(BaseModel):
    model_config = ConfigDict(extra="allow")
    outputs: dict[str, _OutputDoc]


def read_manifest(path: Path) -> dict[str, Any]:
    """A ``manifest.json`` -> its document, with ``outputs.<name>.files[i]`` checked to be ``{path,
    sha256, size}``; ``IntegrityError`` naming the file and each wrong key (exit 1, never a traceback)."""
    where = f"{path}: unreadable manifest"
    doc: dict[str, Any] = read_json(path, error=IntegrityError, max_bytes=MAX_MANIFEST_BYTES, shown=where)
    check_shape(_ManifestDoc, doc, where, IntegrityError)
    return doc


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    problems: list[Problem]


def _output_folders(root: Path, output: dict[str, Any]) -> list[Path]:
    """The folders an output owns whole (every file in them must be listed): a pipeline or LoRA
    folder, a grid's cells folder."""
    from ..fs.paths import normalize_output_path

    rel = normalize_output_path(str(output.get("path", "")))
    kind = output.get("kind")
    if kind in ("pipeline", "lora"):
        return [root / rel]
    if kind == "grid":
        png = root / rel
        return [png.with_name(png.stem + "_cells")]
    return []


def _verify_output(root: Path, outdir: Path, name: str, output: Any, problems: list[Problem]) -> int:
    """Check one output's files: present, unchanged, regular, inside the root, none unlisted."""
    from ..fs.paths import confined_path

    where = f"{root / MANIFEST_NAME}: outputs.{name}"
    files = output.get("files") if isinstance(output, dict) else None
    if not isinstance(files, list):
        problems.append(Problem(f"{where}: no 'files' list"))
        return 0
    listed: set[Path] = set()
    checked = 0
    for index, entry in enumerate(files):
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            problems.append(Problem(f"{where}.files[{index}]: not a {{path, sha256, size}} entry"))
            continue
        try:
            path = confined_path(root, entry.get("path"), f"{where}.files[{index}].path")
        except LorarecipeError as exc:
            problems.append(Problem(exc.message))
            continue
        checked += 1
        listed.add(path)
        shown = path.relative_to(outdir) if path.is_relative_to(outdir) else path
        if path.is_symlink() or not path.is_file():
            problems.append(Problem(f"{shown}: {'a symlink' if path.is_symlink() else 'missing'}"))
            continue
        actual = sha256_file(path, use_cache=False)
        if actual != entry["sha256"] or path.stat().st_size != entry.get("size"):
            problems.append(Problem(f"{shown}: changed (expected sha256 {entry['sha256']}, found {actual})"))
    try:
        folders = _output_folders(root, output)
    except ValueError as exc:
        problems.append(Problem(f"{where}.path: {exc}"))
        return checked
    for folder in folders:
        present = (
            sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()) if folder.is_dir() else []
        )
        for extra in (p for p in present if p not in listed):
            shown = extra.relative_to(outdir) if extra.is_relative_to(outdir) else extra
            problems.append(Problem(f"{shown}: not in the manifest (a file added to output {name!r})"))
    return checked


def verify_outdir(outdir: Path) -> VerifyResult:
    """Recompute every output file's sha256 and size against the manifest(s) under ``outdir``, and
    report files an output folder holds that its manifest does not list."""
    manifests = sorted(outdir.rglob(MANIFEST_NAME)) if outdir.is_dir() else []
    if not manifests:
        raise IntegrityError(f"{outdir}: no {MANIFEST_NAME} found (is this a lorarecipe build folder?)")
    problems: list[Problem] = []
    checked = 0
    for manifest in manifests:
        if manifest.is_symlink():
            problems.append(Problem(f"{manifest}: a symlink, not a manifest this build wrote"))
            continue
        try:
            outputs = read_manifest(manifest)["outputs"]
        except IntegrityError as exc:
            problems.extend(exc.problems)
            continue
        for name, output in outputs.items():
            checked += _verify_output(manifest.parent, outdir, str(name), output, problems)
    return VerifyResult(checked, problems)
