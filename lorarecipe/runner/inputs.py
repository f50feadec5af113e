"""Plan sources -> files on this machine (built-in, local, or Hugging Face Hub).

Hub inputs go through huggingface_hub and diffusers' own download logic, so the standard cache is
used and ``HF_HUB_OFFLINE`` is honoured; a model that is not available is an
``InputUnavailableError`` naming the repo, the revision and the command that fetches it. Local
inputs pass the same confinement checks as at compile time (the files may have changed since).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputUnavailableError, LorarecipeError, UnsafeInputError
from ..fs.json_files import read_json
from ..fs.paths import check_input, resolve_input
from ..plan import Source

__all__ = [
    "ResolvedInput",
    "cached_pipeline",
    "fetch_hint",
    "hub_error",
    "resolve_adapter",
    "resolve_base",
    "resolve_config",
]

_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ResolvedInput:
    """A source, the local path it resolved to, and the hub commit when it came from the hub."""

    source: Source
    path: Path
    commit: str | None = None


def fetch_hint(repo: str, revision: str | None, filename: str | None = None) -> str:
    parts = ["hf download", repo]
    if filename:
        parts.append(filename)
    if revision and revision != "main":
        parts += ["--revision", revision]
    return f"fetch it first with `{' '.join(parts)}` (or build online without HF_HUB_OFFLINE=1)"


def _commit_of(path: Path) -> str | None:
    for parent in (path, *path.parents):
        if parent.parent.name == "snapshots" and _SHA.match(parent.name):
            return parent.name
    return None


def hub_error(
    exc: Exception, repo: str, revision: str | None, filename: str | None = None
) -> InputUnavailableError:
    what = f"{repo}" + (f"/{filename}" if filename else "") + f" @ {revision or 'main'}"
    name = type(exc).__name__
    if "RepositoryNotFound" in name:
        reason = "the repository does not exist or is private"
    elif "RevisionNotFound" in name:
        reason = "the revision does not exist"
    elif "EntryNotFound" in name and "Local" not in name:
        reason = "the file does not exist in the repository"
    else:
        reason = "it is not in the local Hugging Face cache and the hub cannot be reached"
    return InputUnavailableError(
        f"hub input {what} is not available: {reason}. {fetch_hint(repo, revision, filename)}"
    )


def _local(source: Source, root: Path, allow_read: Sequence[Path], want_dir: bool) -> Path:
    path = resolve_input(source.ref, root, allow_read)
    if not path.exists():
        raise InputUnavailableError(f"{source.ref} does not exist (resolved to {path})")
    if want_dir and not path.is_dir():
        raise InputUnavailableError(f"{source.ref} is not a folder")
    if not want_dir and not path.is_file():
        raise InputUnavailableError(f"{source.ref} is not a file")
    return path


def _confined(resolved: ResolvedInput, root: Path, allow_read: Sequence[Path]) -> ResolvedInput:
    """The resolved input, once its files passed the read confinement (they may have changed since
    the recipe was compiled)."""
    check_input(resolved.path, resolved.source.kind, root, allow_read, resolved.source.describe())
    return resolved


def resolve_base(
    source: Source,
    root: Path,
    allow_read: Sequence[Path] = (),
    *,
    variant: str | None = None,
    single_file: bool = False,
) -> ResolvedInput:
    """A base model source -> a diffusers folder (or single file) on disk, confined."""
    return _confined(_resolve_base(source, root, allow_read, variant, single_file), root, allow_read)


def _resolve_base(
    source: Source, root: Path, allow_read: Sequence[Path], variant: str | None, single_file: bool
) -> ResolvedInput:
    if source.kind == "builtin":  # materialized ones without importing the builders (torch, diffusers)
        from ..builtin.catalog import materialized_base

        found = materialized_base(source.ref)
        if found is None:
            from ..builtin.materialize import builtin_base_path

            found = builtin_base_path(source.ref)
        return ResolvedInput(source, found)
    if source.kind == "local":
        return ResolvedInput(source, _local(source, root, allow_read, want_dir=not single_file))
    cached = cached_pipeline(source, variant)
    if cached is not None:
        return cached
    from diffusers import DiffusionPipeline

    try:
        folder = DiffusionPipeline.download(
            source.ref, revision=source.revision, variant=variant, use_safetensors=True
        )
    except LorarecipeError:
        raise
    except Exception as exc:
        raise hub_error(exc, source.ref, source.revision) from None
    path = Path(folder)
    return ResolvedInput(source, path, _commit_of(path))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_pipeline(source: Source, variant: str | None) -> ResolvedInput | None:
    """A hub base already complete in the local HF cache, found without importing diffusers (~3 s);
    None when a download or a check for a newer commit may be needed.

    Only for a revision that is a commit SHA (a branch may have moved) or when ``HF_HUB_OFFLINE``
    is set, when every component of ``model_index.json`` is in the snapshot and every model
    component (one with a ``config.json``) has the safetensors weights that diffusers loads for
    ``variant``, all shards present. Anything else goes through ``DiffusionPipeline.download``.
    """
    from ..fs.hubcache import cached_snapshot
    from ..inspect.base_model import weight_files

    if not (source.revision and _SHA.match(source.revision)) and not _offline():
        return None
    found = cached_snapshot(source.ref, source.revision)
    if found is None:
        return None
    commit, folder = found
    try:
        index = read_json(folder / "model_index.json")
        for component, entry in index.items():
            if component.startswith("_") or not (isinstance(entry, list) and entry and entry[0]):
                continue
            sub = folder / component
            if not sub.is_dir() or not any(p.is_file() for p in sub.iterdir()):
                return None
            if (sub / "config.json").is_file():
                files, _ = weight_files(sub, variant)
                if not files or not all(f.is_file() for f in files):
                    return None
    except (OSError, ValueError, AttributeError, LorarecipeError):
        return None
    return ResolvedInput(source, folder, commit)


def resolve_config(source: Source | None, root: Path, allow_read: Sequence[Path] = ()) -> Path | None:
    """The configs folder of a single-file base (local folder or cached hub snapshot)."""
    if source is None:
        return None
    if source.kind == "local":
        return _confined(
            ResolvedInput(source, _local(source, root, allow_read, want_dir=True)), root, allow_read
        ).path
    return resolve_base(source, root, allow_read).path


def resolve_adapter(source: Source, root: Path, allow_read: Sequence[Path] = ()) -> ResolvedInput:
    """A LoRA source -> the exact .safetensors file (never a folder for diffusers to guess in), confined."""
    return _confined(_resolve_adapter(source, root, allow_read), root, allow_read)


def _resolve_adapter(source: Source, root: Path, allow_read: Sequence[Path]) -> ResolvedInput:
    if source.kind == "builtin":
        from ..builtin.catalog import materialized_lora

        found = materialized_lora(source.ref)
        if found is None:
            from ..builtin.materialize import builtin_lora_path

            found = builtin_lora_path(source.ref)
        return ResolvedInput(source, found)
    if source.kind == "local":
        return ResolvedInput(source, _local(source, root, allow_read, want_dir=False))
    if not source.filename or not source.filename.endswith(".safetensors"):
        raise UnsafeInputError(f"{source.ref}: weight_name must name a .safetensors file")
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(source.ref, source.filename, revision=source.revision))
    except Exception as exc:
        raise hub_error(exc, source.ref, source.revision, source.filename) from None
    return ResolvedInput(source, path, _commit_of(path))
