"""The refusals of publishing: a finished, verified build only, and exactly what it wrote.

Build folder + output names -> one :class:`StagedOutput` each (the files to upload with their repo
paths and sha256, re-hashed now, and the content digest naming them), or one ``IntegrityError``
listing every problem: no manifest, changed, missing or extra files, temporaries of an unfinished
build, a card showing an image that is not published. No network; never writes but the lock file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..diagnostics import did_you_mean
from ..errors import IntegrityError, LockError, Problem, UsageError
from ..fs.atomic import TMP_PREFIX
from ..fs.hashing import sha256_file
from ..outputs.manifest import BUILD_LOCK, MANIFEST_NAME, PREVIOUS_MANIFEST, read_manifest

__all__ = [
    "MANIFEST_IN_REPO",
    "TAG_PREFIX",
    "PublishFile",
    "StagedOutput",
    "build_lock_held",
    "content_digest",
    "stage_outputs",
]

MANIFEST_IN_REPO = "lorarecipe-manifest.json"  # the build's manifest.json, renamed so it clashes with nothing
TAG_PREFIX = "lorarecipe-"
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(<?([^)\s>]+)")


@dataclass(frozen=True)
class PublishFile:
    """One file of the published tree: its path in the repo, content hash, size, and local source."""

    path: str
    sha256: str
    size: int
    source: Path


@dataclass(frozen=True)
class StagedOutput:
    """One output, verified: the files to upload and what the commit says about them."""

    output: str
    kind: str
    files: tuple[PublishFile, ...]
    digest: str
    fingerprint: str
    recipe: str
    build: str
    version: str

    @property
    def tag(self) -> str:
        """``lorarecipe-<first 16 hex of the digest>``: marks a repo state holding exactly these files."""
        return TAG_PREFIX + self.digest.split(":", 1)[1][:16]


def content_digest(files: Iterable[PublishFile]) -> str:
    """Paths + sha256 -> ``sha256:<hex>`` of the ``sha256sum``-style listing, sorted by path.

    It names exactly what would be uploaded: the same files at the same paths give the same tag.
    """
    listing = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
    return "sha256:" + hashlib.sha256(listing.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def build_lock_held(out_root: Path) -> Iterator[None]:
    """Hold the build lock so no build rewrites the files between hashing and uploading them.

    A folder where the lock cannot be taken for lack of write access (or without ``filelock``)
    is published unlocked: no lorarecipe build can write there either.
    """
    lock: Any = None
    try:
        from filelock import FileLock, Timeout

        (out_root / BUILD_LOCK).parent.mkdir(exist_ok=True)
        lock = FileLock(str(out_root / BUILD_LOCK))
        lock.acquire(timeout=0)
    except ImportError:
        lock = None
    except Timeout:
        raise LockError(
            f"a lorarecipe build is writing to {out_root}; publish when it has finished"
        ) from None
    except OSError:
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _read_manifest(out_root: Path) -> dict[str, Any]:
    """``out_root/manifest.json`` -> its document; missing or unreadable means not a finished build."""
    if not out_root.is_dir():
        raise UsageError(f"{out_root}: no such build folder")
    path = out_root / MANIFEST_NAME
    if not path.is_file():
        why = (
            "a build is running there or was interrupted; let `lorarecipe build` finish"
            if (out_root / PREVIOUS_MANIFEST).is_file()
            else "is this a lorarecipe build folder? build it first"
        )
        raise IntegrityError(f"{out_root}: no {MANIFEST_NAME} ({why})")
    try:
        doc = read_manifest(path)
    except IntegrityError as exc:
        raise IntegrityError(f"{exc.message}; rebuild the folder", exc.problems) from None
    if doc.get("build_complete") is False:
        raise IntegrityError(
            f"{out_root}: the last build into this folder did not finish (a build is running there or "
            "was interrupted); let `lorarecipe build` finish"
        )
    return doc


def _leftovers(out_root: Path) -> list[Problem]:
    """``.lorarecipe-tmp-*`` anywhere under the root: a build is writing, or one was killed."""
    found: list[Problem] = []
    for dirpath, dirnames, filenames in os.walk(out_root):
        for name in sorted([*dirnames, *filenames]):
            if name.startswith(TMP_PREFIX):
                shown = (Path(dirpath) / name).relative_to(out_root)
                found.append(Problem(f"{shown}: temporary file of an unfinished build", hint="rebuild first"))
        dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
    return found


def _walk_files(folder: Path) -> Iterator[Path]:
    """Every file and symlink under ``folder`` (symlinks are not followed; temporaries are skipped)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if d not in links and not d.startswith(TMP_PREFIX)]
        for name in [*filenames, *links]:
            if not name.startswith(TMP_PREFIX):
                yield Path(dirpath) / name


def _listed_files(
    out_root: Path, base: PurePosixPath, listed: list[Any], where: str
) -> tuple[dict[str, PublishFile], list[Problem]]:
    """The manifest's file entries -> {repo path: file}, each re-hashed; missing or changed ones refused."""
    files: dict[str, PublishFile] = {}
    problems: list[Problem] = []
    for item in listed:
        path = PurePosixPath(str(item.get("path", "")) if isinstance(item, dict) else "")
        if path.is_absolute() or ".." in path.parts or not path.is_relative_to(base) or path == base:
            problems.append(Problem(f"{MANIFEST_NAME} lists {path} outside {base}", path=where))
            continue
        local, in_repo = out_root / path, path.relative_to(base).as_posix()
        if local.is_symlink() or not local.is_file():
            what = "a symlink; builds never write one" if local.is_symlink() else "missing"
            problems.append(Problem(f"{path}: {what}", path=where, hint="rebuild this output"))
            continue
        actual, size = sha256_file(local, use_cache=False), local.stat().st_size
        if actual != item.get("sha256") or size != item.get("size"):
            message = f"{path}: changed since the build (sha256 {actual}, manifest {item.get('sha256')})"
            problems.append(Problem(message, path=where, hint="rebuild, or `lorarecipe verify` the folder"))
            continue
        files[in_repo] = PublishFile(in_repo, actual, size, local)
    return files, problems


def _unpublished_images(files: dict[str, PublishFile], where: str) -> list[Problem]:
    """A model card showing a relative image that is not among the files would show it broken."""
    problems: list[Problem] = []
    for card in (f for f in files.values() if PurePosixPath(f.path).name == "README.md"):
        text = card.source.read_text(encoding="utf-8", errors="replace")
        for link in _IMAGE_LINK.findall(text):
            relative = ":" not in link and not link.startswith(("/", "#"))
            if relative and (PurePosixPath(card.path).parent / link).as_posix() not in files:
                problems.append(
                    Problem(f"{card.path} shows {link}, which is not part of the output", path=where)
                )
    return problems


def _stage(out_root: Path, doc: dict[str, Any], output: str) -> tuple[StagedOutput | None, list[Problem]]:
    """One output of the manifest -> its upload list, or the problems found.

    A folder output is published from inside the folder (its content at the repo root); a file
    output (single file, grid) from its parent folder, with the files and folders the manifest lists
    (a grid's PNG, JSON sidecar and ``<stem>_cells/``). Files there that the manifest does not list
    are refused, so the repo holds exactly what the build wrote, plus the manifest.
    """
    outputs: dict[str, Any] = doc["outputs"]
    entry = outputs.get(output)
    if not isinstance(entry, dict):
        hint = did_you_mean(output, outputs) or f"built outputs: {', '.join(sorted(outputs)) or 'none'}"
        raise UsageError(f"output {output!r} is not in {out_root / MANIFEST_NAME}; {hint}")
    where = f"outputs.{output}"
    rel, listed = entry.get("path"), entry.get("files")
    if not isinstance(rel, str) or not isinstance(listed, list) or not listed:
        return None, [Problem(f"{MANIFEST_NAME} lists no files for this output", path=where)]
    if (out_root / rel).is_symlink():
        return None, [Problem(f"{rel}: a symlink; builds never write one", path=where, hint="rebuild")]
    folder = (out_root / rel).is_dir()
    base = PurePosixPath(rel) if folder else PurePosixPath(rel).parent
    files, problems = _listed_files(out_root, base, listed, where)
    roots = {out_root / base} if folder else {out_root / base / p.split("/")[0] for p in files if "/" in p}
    for root in sorted(roots):
        for local in _walk_files(root):
            if local.relative_to(out_root / base).as_posix() not in files:
                hint = "remove it, or rebuild: only what the build wrote is published"
                problems.append(
                    Problem(f"{local.relative_to(out_root)}: not written by the build", where, hint=hint)
                )
    problems += _unpublished_images(files, where)
    if MANIFEST_IN_REPO in files:
        problems.append(Problem(f"the output has its own {MANIFEST_IN_REPO}", path=where))
    if problems:
        return None, problems
    manifest = out_root / MANIFEST_NAME
    files[MANIFEST_IN_REPO] = PublishFile(
        MANIFEST_IN_REPO, sha256_file(manifest, use_cache=False), manifest.stat().st_size, manifest
    )
    ordered = tuple(sorted(files.values(), key=lambda f: f.path))
    recipe = doc.get("recipe")
    recipe = recipe if isinstance(recipe, dict) else {}
    libraries = doc.get("libraries")
    libraries = libraries if isinstance(libraries, dict) else {}
    return StagedOutput(
        output=output,
        kind=str(entry.get("kind", "output")),
        files=ordered,
        digest=content_digest(ordered),
        fingerprint=str(doc.get("fingerprint", "unknown")),
        recipe=str(recipe.get("name") or "recipe"),
        build=str(recipe.get("build") or ""),
        version=str(libraries.get("lorarecipe", "?")),
    ), []


def stage_outputs(out_root: Path, outputs: Sequence[str]) -> list[StagedOutput]:
    """Build folder + output names -> their verified upload lists (call under :func:`build_lock_held`).

    Every problem of every output is collected first and raised as one ``IntegrityError``; an
    output the manifest does not list is a ``UsageError``.
    """
    doc = _read_manifest(out_root)
    problems = _leftovers(out_root)
    staged: list[StagedOutput] = []
    for output in outputs:
        one, found = _stage(out_root, doc, output)
        problems += found
        staged += [one] if one is not None else []
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        raise IntegrityError(f"{out_root} is not a finished, verified build ({count})", problems)
    return staged
