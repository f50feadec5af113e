"""Lock files: every input of a recipe pinned to a hub commit and to the sha256 of each file it reads.

Recipe (+ ``--set``) -> ``<stem>.lock.json`` beside it, for every build of the matrix; hub revisions are
resolved with huggingface_hub's own APIs (offline: from the local cache). ``build --frozen`` reads it
back: a missing or stale lock is a ``LockError``, a changed file an ``IntegrityError``. No absolute path,
no timestamp: the same inputs give the same bytes anywhere. Reading and checking a lock is torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputUnavailableError, IntegrityError, LockError, Problem
from ..fs.atomic import atomic_write_text
from ..fs.hashing import sha256_file
from ..fs.hubcache import cached_file, cached_snapshot
from ..fs.json_files import FilePath, check_shape, read_json, shape_problems
from ..fs.paths import check_input_file, confined_path, input_roots
from ..plan import LoadAdapter, LoadBase, Plan, Source
from ..runner.inputs import ResolvedInput, fetch_hint, hub_error, resolve_adapter, resolve_base

__all__ = [
    "LOCK_SUFFIX",
    "LockFile",
    "LockedFile",
    "LockedInput",
    "check_lock_current",
    "create_lock",
    "lock_path",
    "pinned_source",
    "read_lock",
    "resolve_frozen",
    "verify_input_files",
    "write_lock",
]

LOCK_SUFFIX = ".lock.json"
LOCK_FORMAT = 1
_SHA = re.compile(r"^[0-9a-f]{40}$")
# Files a pipeline folder may hold that are weights (only .safetensors of the right variant are read).
_WEIGHT = re.compile(
    r"\.(safetensors|bin|ckpt|pt|pth|onnx|onnx_data|msgpack|h5|pb|gguf)$"
    r"|\.(safetensors|bin|onnx|msgpack|h5)(\.[\w-]+)?\.index(\.[\w-]+)?\.json$"
)


@dataclass(frozen=True)
class LockedFile:
    """One file of an input: its path relative to the input's folder (or the file's name), sha256, size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class LockedInput:
    """One input as locked: its source as written, the commit it resolved to, and its files.

    ``step`` is the reading step (``base``, ``base:config``, ``adapter:<name>``); ``variant`` (a base's
    weight variant) decides which weight files are locked.
    """

    step: str
    kind: str
    ref: str
    filename: str | None
    requested_revision: str | None
    commit: str | None
    files: tuple[LockedFile, ...]
    variant: str | None = None

    def key(self) -> tuple[str, ...]:
        """Identity shared with :meth:`InputUse.key`: the same step reading the same source."""
        parts = (self.step, self.kind, self.ref, self.filename, self.requested_revision, self.variant)
        return tuple(p or "" for p in parts)

    def describe(self) -> str:
        return Source(self.kind, self.ref, self.requested_revision, self.filename).describe()


@dataclass(frozen=True)
class LockFile:
    """A recipe's lock: the recipe text's sha256, the fingerprint of each build, and every input."""

    recipe_sha256: str
    plan_fingerprints: tuple[str, ...]
    inputs: tuple[LockedInput, ...]

    def to_json(self) -> dict[str, Any]:
        return {"lorarecipe_lock": LOCK_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, doc: Any, source: str = "lock file") -> LockFile:
        """Parsed JSON -> LockFile; ``LockError`` naming ``source`` and each key of another shape."""
        shape = check_shape(_LockDoc, doc, source, LockError)
        inputs = tuple(
            LockedInput(**{**i.model_dump(), "files": tuple(LockedFile(**f.model_dump()) for f in i.files)})
            for i in shape.inputs
        )
        return cls(shape.recipe_sha256, tuple(shape.plan_fingerprints), inputs)


class _LockedFileDoc(BaseModel):
    """The shape of a lock file, checked before anything reads it (one place for the format)."""

    model_config = ConfigDict(extra="forbid")
    path: FilePath
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class _LockedInputDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: str
    kind: str
    ref: str
    filename: str | None
    requested_revision: str | None
    commit: str | None
    files: list[_LockedFileDoc]
    variant: str | None = None


class _LockDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lorarecipe_lock: Literal[1]
    recipe_sha256: str
    plan_fingerprints: list[str]
    inputs: list[_LockedInputDoc]


@dataclass(frozen=True)
class InputUse:
    """One input a plan reads: the reading step, the source as written, and how it is read."""

    step: str
    source: Source
    role: str  # "base" | "config" | "adapter"
    variant: str | None = None
    single_file: bool = False

    def key(self) -> tuple[str, ...]:
        s = self.source
        return (self.step, s.kind, s.ref, s.filename or "", s.revision or "", self.variant or "")


def plan_inputs(plans: Sequence[Plan]) -> list[InputUse]:
    """Every input read by ``plans``, once each, in first-use order (a matrix shares most inputs)."""
    uses: dict[tuple[str, ...], InputUse] = {}
    for plan in plans:
        for step in plan.steps:
            found: list[InputUse] = []
            if isinstance(step, LoadBase):
                found.append(InputUse(step.id, step.source, "base", step.variant, step.single_file))
                if step.config is not None:
                    found.append(InputUse(f"{step.id}:config", step.config, "config"))
            elif isinstance(step, LoadAdapter):  # a checkpoint difference is a folder, read like a base
                found.append(InputUse(step.id, step.source, "base" if step.difference else "adapter"))
            for use in found:
                uses.setdefault(use.key(), use)
    return list(uses.values())


def lock_path(recipe: Path) -> Path:
    """``recipes/demo.yaml`` -> ``recipes/demo.lock.json`` (beside the recipe, committed with it)."""
    return recipe.with_name(recipe.stem + LOCK_SUFFIX)


def _online_commit(repo: str, revision: str | None, filename: str | None) -> str | None:
    """The only network calls: the commit ``revision`` names on the hub now (None if not reported)."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    if filename:
        commit = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision)).commit_hash
    else:
        commit = HfApi().model_info(repo, revision=revision).sha
    return str(commit) if commit else None


def resolve_commit(source: Source) -> str:
    """A hub source -> the commit SHA of its revision: online from the hub, else from the local cache.

    A 40-hex revision is already a commit. Offline (``HF_HUB_OFFLINE``) or with the hub unreachable, the
    cache's ``refs/<revision>`` names it; what the hub says does not exist is an error, not a fallback.
    """
    from huggingface_hub import constants

    repo, revision, filename = source.ref, source.revision, source.filename
    if revision and _SHA.match(revision):
        return revision
    reason = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    if not constants.is_offline_mode():
        from huggingface_hub import errors as hf

        try:
            commit = _online_commit(repo, revision, filename)
        except (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.RemoteEntryNotFoundError) as exc:
            raise hub_error(exc, repo, revision, filename) from None
        except Exception:  # unreachable or failing hub (its HTTP library varies by version): use the cache
            commit = None
        if commit:
            return commit
        reason = "the hub cannot be reached and it is not in the local Hugging Face cache"
    found = cached_file(repo, filename, revision) if filename else cached_snapshot(repo, revision)
    if found is None:
        what = repo + (f"/{filename}" if filename else "") + f" @ {revision or 'main'}"
        raise InputUnavailableError(
            f"hub input {what} is not available: {reason}. {fetch_hint(repo, revision, filename)}"
        )
    return found[0]


def _visible_files(folder: Path) -> list[str]:
    """Every file under ``folder`` whose path has no hidden part, as sorted POSIX relative paths."""
    names = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return sorted(n.as_posix() for n in names if not any(part.startswith(".") for part in n.parts))


def _pipeline_files(folder: Path, variant: str | None, *, weights: bool) -> list[str]:
    """The files ``from_pretrained`` reads in a snapshot: model_index.json, each component's configs and
    (``weights``) its .safetensors for ``variant``, picked by diffusers' own rules. Other variants, .bin
    files or a README cached earlier are left out: the lock must not depend on what else is cached.
    """
    from diffusers.pipelines.pipeline_loading_utils import variant_compatible_siblings

    where = f"{folder.parent.parent.name} @ {folder.name}"
    index = read_json(
        folder / "model_index.json", error=InputUnavailableError, shown=f"{where}: model_index.json"
    )
    components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]}
    inside = [f for f in _visible_files(folder) if "/" in f and f.split("/")[0] in components]
    chosen = {"model_index.json", *(f for f in inside if not _WEIGHT.search(f))}
    if weights:
        safetensors = [f for f in inside if f.endswith(".safetensors") or ".safetensors.index" in f]
        try:
            usable, _ = variant_compatible_siblings(safetensors, variant=variant)
        except ValueError as exc:
            raise InputUnavailableError(f"{where}: {exc}") from None
        chosen.update(usable)
        for name in sorted(components):
            if f"{name}/config.json" in chosen and not any(f.startswith(f"{name}/") for f in usable):
                what = f" for variant {variant!r}" if variant else ""
                raise InputUnavailableError(f"{where}: no {name} .safetensors{what} cached (incomplete?)")
    return sorted(chosen)


def _resolve_path(use: InputUse, source: Source, root: Path, allow_read: Sequence[Path]) -> Path:
    """Where ``source`` (pinned, for hub inputs) is on disk, found as the runner finds it (a config
    folder resolves like a base folder: that is what ``resolve_config`` does)."""
    if use.role == "adapter":
        return resolve_adapter(source, root, allow_read).path
    return resolve_base(source, root, allow_read, variant=use.variant, single_file=use.single_file).path


def _hash_files(path: Path, names: Sequence[str] | None = None) -> tuple[LockedFile, ...]:
    if not path.is_dir():
        return (LockedFile(path.name, sha256_file(path), path.stat().st_size),)
    return tuple(
        LockedFile(n, sha256_file(path / n), (path / n).stat().st_size)
        for n in sorted(names if names is not None else _visible_files(path))
    )


def lock_input(use: InputUse, root: Path, allow_read: Sequence[Path] = ()) -> LockedInput:
    """One input -> its commit (hub) and the hashes of the files it will be read from."""
    src = use.source
    commit = resolve_commit(src) if src.kind == "hub" else None
    path = _resolve_path(
        use, Source(src.kind, src.ref, commit or src.revision, src.filename), root, allow_read
    )
    names = None
    if src.kind == "hub" and use.role != "adapter":
        names = _pipeline_files(path, use.variant, weights=use.role == "base")
    files = _hash_files(path, names)
    return LockedInput(use.step, src.kind, src.ref, src.filename, src.revision, commit, files, use.variant)


def create_lock(
    recipe: Path, overrides: Mapping[str, str] | None = None, allow_read: Sequence[Path] = ()
) -> LockFile:
    """Recipe file -> LockFile: compile every build, resolve every input, hash every file it reads."""
    from ..compiler import compile_recipe_file

    text = recipe.read_bytes()
    plans = compile_recipe_file(recipe, overrides, allow_read)
    inputs = [lock_input(use, recipe.resolve().parent, allow_read) for use in plan_inputs(plans)]
    return LockFile(
        hashlib.sha256(text).hexdigest(),
        tuple(p.fingerprint() for p in plans),
        tuple(sorted(inputs, key=LockedInput.key)),
    )


def write_lock(recipe: Path, lock: LockFile) -> Path:
    """Write ``lock`` beside ``recipe`` atomically as canonical JSON (sorted keys, indent 2, newline)."""
    path = lock_path(recipe)
    atomic_write_text(path, json.dumps(lock.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def read_lock(recipe: Path) -> LockFile:
    """The lock beside ``recipe``; ``LockError`` naming the file and the fix if missing or unreadable.

    The lock is untrusted input like the recipe: it must be a regular file in the recipe's folder (a
    symlink out of it is refused before it is read)."""
    path = lock_path(recipe)
    fix = f"run `lorarecipe lock {recipe}` to (re)create it"
    if not path.is_file() and not path.is_symlink():
        raise LockError(f"{path}: no lock file for {recipe}; {fix}")
    check_input_file(path, (Path(os.path.realpath(recipe.parent)),), "lock file")
    try:
        doc = read_json(path, error=LockError, expect=None)
        lines = shape_problems(_LockDoc, doc)
    except LockError as exc:
        doc, lines = None, [exc.message.removeprefix(f"{path}: ")]
    if lines:
        problems = [Problem(f"{path}: unreadable lock file ({line}); {fix}") for line in lines]
        raise LockError(problems[0].message, problems)
    return LockFile.from_json(doc, str(path))


def check_lock_current(recipe: Path, lock: LockFile, plans: Sequence[Plan]) -> list[str]:
    """Why ``lock`` no longer describes ``recipe`` compiled as ``plans`` (empty: it is current).

    The recipe text, the plans' fingerprints (other ``--set`` values change them) and the set of
    inputs are compared; a changed revision or variant is reported as such, not as add + remove.
    """
    try:
        now = hashlib.sha256(recipe.read_bytes()).hexdigest()
    except OSError as exc:
        return [f"cannot read {recipe}: {exc.strerror or exc}"]
    reasons = []
    if now != lock.recipe_sha256:
        reasons.append(
            f"{recipe} changed since it was locked (sha256 {now[:12]}…, locked {lock.recipe_sha256[:12]}…)"
        )
    elif tuple(p.fingerprint() for p in plans) != lock.plan_fingerprints:
        reasons.append("the compiled builds differ from the locked ones (other --set values or lorarecipe)")
    wanted = {u.key(): u for u in plan_inputs(plans)}
    locked = {i.key(): i for i in lock.inputs}
    removed = [i for k, i in locked.items() if k not in wanted]
    for key, use in wanted.items():
        if key in locked:
            continue
        same = (use.step, use.source.kind, use.source.ref, use.source.filename)
        before = next((i for i in removed if (i.step, i.kind, i.ref, i.filename) == same), None)
        if before is not None:
            removed.remove(before)
            old, new = before.requested_revision or "main", use.source.revision or "main"
            what = f"revision {old} -> {new}" if old != new else f"variant {before.variant} -> {use.variant}"
            reasons.append(f"{use.step}: {what} ({use.source.kind} {use.source.ref})")
        else:
            reasons.append(f"{use.step}: input added ({use.source.describe()})")
    reasons.extend(f"{i.step}: input removed ({i.describe()})" for i in removed)
    return reasons


def verify_input_files(locked: LockedInput, root: Path, within: Sequence[Path] = ()) -> None:
    """Rehash (no stat cache) each locked file under ``root`` (the input's folder, or the file itself);
    ``IntegrityError`` naming every changed file with the expected and the actual sha256. A local folder
    must hold no unlocked file either; a hub snapshot may (files of other downloads).
    """
    problems: list[Problem] = []
    hint = "restore it, or run `lorarecipe lock` again if the change is intended"
    for entry in locked.files:
        # the lock names these paths: each must stay inside the input's folder (checked before it is
        # hashed), and be a regular file (the input folder passed the read confinement already)
        what = f"lock file: {locked.step}"
        path = confined_path(root, entry.path, what, within) if root.is_dir() else root
        name = f"{locked.describe()}: {entry.path}" if root.is_dir() else locked.describe()
        regular = path.is_file()
        actual = sha256_file(path, use_cache=False) if regular else "(missing)"
        if actual != entry.sha256 or not regular or path.stat().st_size != entry.size:
            message = f"{name} changed since it was locked: expected sha256 {entry.sha256}, found {actual}"
            problems.append(Problem(f"{message} ({path})", hint=hint))
    if locked.kind == "local" and root.is_dir():
        extra = sorted(set(_visible_files(root)) - {f.path for f in locked.files})
        problems += [Problem(f"{locked.describe()}: {n} is not in the lock", hint=hint) for n in extra]
    if problems:
        raise IntegrityError(problems[0].message, problems)


def pinned_source(locked: LockedInput) -> Source:
    """The source a ``--frozen`` build reads: hub inputs at the locked commit, others as written."""
    if locked.kind != "hub":
        return Source(locked.kind, locked.ref, locked.requested_revision, locked.filename)
    if not locked.commit or not _SHA.match(locked.commit):
        raise LockError(f"{locked.step}: no commit locked for {locked.describe()}; run `lorarecipe lock`")
    return Source("hub", locked.ref, revision=locked.commit, filename=locked.filename)


def resolve_frozen(
    plan: Plan, lock: LockFile, recipe_root: Path, allow_read: Sequence[Path] = ()
) -> dict[str, ResolvedInput]:
    """Plan + current lock -> {step id: input} at the locked commits, every file rehashed against it."""
    locked = {i.key(): i for i in lock.inputs}
    out: dict[str, ResolvedInput] = {}
    for use in plan_inputs([plan]):
        entry = locked.get(use.key())
        if entry is None:
            raise LockError(f"{use.step}: {use.source.describe()} is not in the lock; run `lorarecipe lock`")
        path = _resolve_path(use, pinned_source(entry), recipe_root, allow_read)
        verify_input_files(entry, path, input_roots(entry.kind, recipe_root, allow_read))
        out[use.step] = ResolvedInput(use.source, path, entry.commit)
    return out
