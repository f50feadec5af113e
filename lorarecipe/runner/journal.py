"""manifest.json kept true at every moment of a build, so no kill or full disk can lose it.

Output root + plan -> a manifest that, whenever a build is interrupted, lists exactly the outputs
whose files are complete and unchanged (``lorarecipe verify`` passes on it). Before the build
replaces outputs, their entries are removed (``forget``); each output is listed again once it is
complete at its final path, card included (``record``); the last write (``finish``) adds the build's
recipe, plan, inputs and checks. Every write is atomic. Outputs that are up to date keep the entry
of the build that made them (with the fingerprint of its plan), so the manifest after an incremental
build still says which recipe state produced every file.

An older lorarecipe moved manifest.json aside to ``.lorarecipe/previous-manifest.json`` while it
built; a root a killed old build left that way is read from there once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..fs.json_files import read_json
from ..outputs.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PREVIOUS_MANIFEST,
    file_entry,
    write_manifest,
)

__all__ = ["ManifestJournal"]


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file() or path.is_symlink():
        return None
    try:
        doc = read_json(path, expect=None, max_bytes=MAX_MANIFEST_BYTES)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), dict):
        return None
    doc["outputs"] = {k: v for k, v in doc["outputs"].items() if isinstance(k, str) and isinstance(v, dict)}
    return doc


class ManifestJournal:
    """The manifest of one output root while a build writes into it (under the root's lock)."""

    def __init__(self, out_root: Path, outputs: Iterable[str]) -> None:
        """Start from the root's manifest; entries of outputs the recipe no longer has are dropped
        when the build finishes (``outputs``: every output of the plan)."""
        self.out_root = out_root
        self.known = set(outputs)
        self.doc = _read(out_root / MANIFEST_NAME) or _read(out_root / PREVIOUS_MANIFEST) or {"outputs": {}}
        self.doc["build_complete"] = False

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        outputs: dict[str, dict[str, Any]] = self.doc["outputs"]
        return outputs

    def forget(self, names: Iterable[str]) -> None:
        """Unlist outputs about to be replaced (written only if one was listed)."""
        gone = [n for n in names if n in self.outputs]
        for name in gone:
            del self.outputs[name]
        if gone or not (self.out_root / MANIFEST_NAME).is_file():
            self._write()

    def record(
        self,
        name: str,
        entry: dict[str, Any],
        files: Iterable[Path],
        known: Mapping[Path, tuple[str, int]] | None = None,
    ) -> None:
        """List a complete output: ``entry`` (kind, path, executor, …) plus every file's hash (``known``:
        hashes computed while writing, used when the file's size still matches)."""
        self.outputs[name] = {**entry, "files": [self._entry(p, known or {}) for p in files]}
        self._write()

    def _entry(self, path: Path, known: Mapping[Path, tuple[str, int]]) -> dict[str, Any]:
        found = known.get(path)
        if found is not None and path.stat().st_size == found[1]:
            return {"path": path.relative_to(self.out_root).as_posix(), "sha256": found[0], "size": found[1]}
        return file_entry(path, self.out_root)

    def unlist(self, name: str) -> dict[str, Any]:
        """Unlist a listed output whose files are about to change; returns its entry for ``relist``."""
        entry = self.outputs.pop(name)
        self._write()
        return entry

    def relist(self, name: str, entry: dict[str, Any], changed: Iterable[Path]) -> None:
        """List an output again after some of its files were (re)written: those are hashed anew."""
        fresh = {e["path"]: e for e in (file_entry(p, self.out_root) for p in changed)}
        kept = [e for e in entry["files"] if e.get("path") not in fresh]
        self.outputs[name] = {
            **entry,
            "files": sorted([*kept, *fresh.values()], key=lambda e: str(e["path"])),
        }
        self._write()

    def finish(self, doc: dict[str, Any]) -> Path:
        """The final manifest: ``doc`` (recipe, plan, inputs, checks, …) with the listed outputs of the
        plan; removes an older build's set-aside manifest."""
        outputs = {k: v for k, v in sorted(self.outputs.items()) if k in self.known}
        self.doc = {**doc, "outputs": outputs, "build_complete": True}
        path = self._write()
        try:
            (self.out_root / PREVIOUS_MANIFEST).unlink(missing_ok=True)
        except OSError as exc:
            raise BuildError(
                f"cannot remove {self.out_root / PREVIOUS_MANIFEST}: {exc.strerror or exc}"
            ) from None
        return path

    def _write(self) -> Path:
        try:
            return write_manifest(self.out_root, self.doc)
        except OSError as exc:
            raise BuildError(f"cannot write {self.out_root / MANIFEST_NAME}: {exc.strerror or exc}") from None
