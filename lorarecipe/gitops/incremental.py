"""Incremental builds: which outputs are already up to date, decided without importing torch.

Plan + inputs on disk -> a build key per output: the sha256 of the output's part of the plan (its
step and every step it depends on, without source positions), the content hashes of the inputs in
that part, and the versions of the libraries that compute it. An output whose key and files match
what the previous build recorded in ``<out>/.lorarecipe/state.json`` is skipped; a rebuild with
nothing changed loads no model. The recipe text is not part of the key (a comment or another output's
settings do not rebuild it); the manifest records, per output, which recipe and plan built it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..builtin.catalog import builtin_base_dir, builtin_lora_file
from ..errors import BuildError, LorarecipeError
from ..fs.atomic import atomic_write_text
from ..fs.hashing import path_digest
from ..fs.hubcache import cached_file, cached_snapshot
from ..fs.json_files import check_shape, read_json
from ..fs.paths import resolve_input
from ..outputs.manifest import MANIFEST_NAME, library_versions
from ..plan import LoadAdapter, LoadBase, Plan, Source, canonical_json

__all__ = ["STATE_DIR", "has_state", "output_keys", "record_state", "stale_outputs"]

STATE_DIR = ".lorarecipe"
_KEY_LIBRARIES = ("lorarecipe", "torch", "diffusers", "peft", "transformers", "safetensors")


@dataclass(frozen=True)
class InputDigest:
    """Content hash of one input (a file or every file of a folder)."""

    sha256: str
    commit: str | None = None


def _local_path(source: Source, recipe_root: Path, allow_read: Sequence[Path], is_base: bool) -> Path | None:
    if source.kind == "builtin":
        path = builtin_base_dir(source.ref) if is_base else builtin_lora_file(source.ref)
        complete = (path / "model_index.json").is_file() if is_base else path.is_file()
        return path if complete else None
    if source.kind == "local":
        try:
            return resolve_input(source.ref, recipe_root, allow_read)
        except LorarecipeError:
            return None
    if is_base:
        found = cached_snapshot(source.ref, source.revision)
        return found[1] if found else None
    found_file = cached_file(source.ref, source.filename or "", source.revision)
    return found_file[1] if found_file else None


def input_digest(
    step: LoadBase | LoadAdapter, recipe_root: Path, allow_read: Sequence[Path] = ()
) -> InputDigest | None:
    """The content hash of a base or adapter input, or None if it is not on this machine yet."""
    path = _local_path(step.source, recipe_root, allow_read, isinstance(step, LoadBase))
    if path is None:
        return None
    digest = path_digest(path)
    return InputDigest(digest) if digest is not None else None


def output_keys(plan: Plan, recipe_root: Path, allow_read: Sequence[Path] = ()) -> dict[str, str | None]:
    """Output name -> build key (None when an input is not available locally: must build)."""
    versions = library_versions()
    libraries = {k: versions.get(k) for k in _KEY_LIBRARIES}
    digests: dict[str, InputDigest | None] = {}
    keys: dict[str, str | None] = {}
    for step in plan.output_steps():
        name = step.output
        part = sorted(plan.dependencies(step.id), key=lambda s: s.id)
        inputs: dict[str, str | None] = {}
        for dep in part:
            if isinstance(dep, (LoadBase, LoadAdapter)):
                if dep.id not in digests:
                    digests[dep.id] = input_digest(dep, recipe_root, allow_read)
                found = digests[dep.id]
                inputs[dep.id] = found.sha256 if found else None
        if any(v is None for v in inputs.values()):
            keys[name] = None
            continue
        doc = {"steps": [s.payload() for s in part], "inputs": inputs, "libraries": libraries}
        import hashlib

        keys[name] = hashlib.sha256(canonical_json(doc).encode()).hexdigest()
    return keys


def _state_path(out_root: Path) -> Path:
    return out_root / STATE_DIR / "state.json"


class _StateOutput(BaseModel):
    """One output as ``state.json`` records it: its build key and each file's [size, mtime_ns]."""

    model_config = ConfigDict(extra="forbid")
    key: str
    files: dict[str, Annotated[list[int], Field(min_length=2, max_length=2)]]


class _StateDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state_format: Literal[1]
    outputs: dict[str, _StateOutput]


def _read_state(out_root: Path) -> dict[str, _StateOutput]:
    """The outputs recorded by the previous build ({} when there was none); a state file of another
    shape is a ``BuildError`` naming it and the key (exit 1), not a guess."""
    path = _state_path(out_root)
    if not path.exists():
        return {}
    where = f"{path} (build state; delete it to rebuild everything)"
    doc = check_shape(_StateDoc, read_json(path, error=BuildError, shown=where), where, BuildError)
    return doc.outputs


def has_state(out_root: Path) -> bool:
    """Whether a build recorded any output in this root (else every output is to be built)."""
    return bool(_read_state(out_root))


def _listed_outputs(out_root: Path) -> set[str]:
    """The outputs manifest.json lists (an interrupted build unlists what it was replacing)."""
    path = out_root / MANIFEST_NAME
    if path.is_symlink():
        return set()
    with contextlib.suppress(OSError, ValueError, RecursionError):
        doc = read_json(path, expect=None)
        if isinstance(doc, dict) and isinstance(doc.get("outputs"), dict):
            return {str(k) for k in doc["outputs"]}
    return set()


def stale_outputs(out_root: Path, keys: dict[str, str | None]) -> set[str]:
    """Outputs whose key changed, is unknown, that the manifest does not list, or whose files are
    gone or touched since recorded."""
    state = _read_state(out_root)
    listed = _listed_outputs(out_root)
    stale = set()
    for name, key in keys.items():
        entry = state.get(name)
        if key is None or entry is None or entry.key != key or name not in listed:
            stale.add(name)
            continue
        for rel, (size, mtime_ns) in entry.files.items():
            path = out_root / rel
            try:
                st = path.stat()
            except OSError:
                stale.add(name)
                break
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                stale.add(name)
                break
    return stale


def record_state(out_root: Path, keys: dict[str, str | None], written: dict[str, list[Path]]) -> None:
    """Remember each built output's key and its files' size/mtime (for the next up-to-date check)."""
    try:
        recorded = _read_state(out_root)
    except BuildError:  # --force skipped the check; this rewrite replaces the unreadable state
        recorded = {}
    outputs: dict[str, Any] = {k: v.model_dump() for k, v in recorded.items() if k in keys}
    for name, files in written.items():
        key = keys.get(name)
        if key is None:
            outputs.pop(name, None)
            continue
        outputs[name] = {
            "key": key,
            "files": {
                p.relative_to(out_root).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns] for p in files
            },
        }
    path = _state_path(out_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        path, json.dumps({"state_format": 1, "outputs": outputs}, indent=2, sort_keys=True) + "\n"
    )
