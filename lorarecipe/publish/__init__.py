"""Publish finished, verified build outputs to the Hugging Face Hub.

Build folder + {output: :class:`PublishSpec`} -> one :class:`PublishResult` per output: a Hub commit
whose tree equals the output (its files, model card and card images, plus the build's manifest as
``lorarecipe-manifest.json``), tagged ``lorarecipe-<digest>``; or "unchanged" when that tag already
marks the branch head. Anything but a finished build whose files re-hash equal to its manifest is
refused before the first request (``stage``). Torch-free; huggingface_hub is imported only to
publish for real (``hub``), a dry run makes no request. Never prints, never shows the token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import UsageError
from .stage import (
    MANIFEST_IN_REPO,
    TAG_PREFIX,
    PublishFile,
    StagedOutput,
    build_lock_held,
    content_digest,
    stage_outputs,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = [
    "MANIFEST_IN_REPO",
    "TAG_PREFIX",
    "PublishFile",
    "PublishResult",
    "PublishSpec",
    "Status",
    "content_digest",
    "publish_build",
    "publish_output",
    "repo_id_problem",
    "revision_problem",
]

Status = Literal["published", "unchanged", "dry-run"]
_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
_BRANCH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}$")


def repo_id_problem(repo: object) -> str | None:
    """Why ``repo`` is not a Hub model repo id ``namespace/name`` (huggingface_hub's rules), or None.

    For a recipe validator: raise ``ValueError`` with it, so the error points at the recipe line.
    """
    if not isinstance(repo, str) or repo.count("/") != 1:
        return f"repo {repo!r} must be 'namespace/name' (a user or organization, then the repo name)"
    if not all(_NAME.match(part) for part in repo.split("/")):
        return (
            f"repo {repo!r}: use letters, digits, '-', '_' and '.', at most 96 per part, "
            "not starting or ending with '-' or '.'"
        )
    if "--" in repo or ".." in repo or repo.endswith(".git"):
        return f"repo {repo!r}: '--', '..' and a '.git' ending are not allowed in Hub repo ids"
    return None


def revision_problem(revision: object) -> str | None:
    """Why ``revision`` is not a branch name to commit to, or None (pull-request refs are not branches)."""
    if (
        not isinstance(revision, str)
        or not _BRANCH.match(revision)
        or any(bad in revision for bad in ("..", "//", "@{"))
        or revision.endswith(("/", ".", ".lock"))
        or revision.startswith("refs/")
    ):
        return f"revision {revision!r} is not a branch name (letters, digits, '-', '_', '.', '/')"
    return None


@dataclass(frozen=True)
class PublishSpec:
    """Where one output goes: what the user wrote, templates already rendered; validated here.

    ``repo``: ``namespace/name``. ``private``: the visibility of a repo lorarecipe creates (an
    existing repo keeps its own). ``revision``: the branch committed to. ``create``: create a
    missing repo or branch (a branch starts from ``main``); with False a missing one is an error.
    ``commit_message``: first line the summary, the rest the body (default: names the recipe and
    output); the ``Lorarecipe-Fingerprint``/``Lorarecipe-Digest`` trailers are always appended.
    """

    repo: str
    private: bool = True
    revision: str = "main"
    create: bool = True
    commit_message: str | None = None

    def __post_init__(self) -> None:
        problem = repo_id_problem(self.repo) or revision_problem(self.revision)
        if problem is None and self.commit_message is not None and not self.commit_message.strip():
            problem = "commit_message is empty (leave it out for the default)"
        if problem:
            raise UsageError(problem)


@dataclass(frozen=True)
class PublishResult:
    """What happened to one output: the commit its branch is at, and the files it holds."""

    output: str
    repo: str
    revision: str
    commit: str | None  # None for a dry run
    url: str  # the commit's page; the repo's page for a dry run
    status: Status
    files: tuple[PublishFile, ...]  # the whole published tree, not only what changed
    tag: str
    digest: str
    deleted: tuple[str, ...] = ()  # remote files the commit removed (no longer part of the output)
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["files"] = [{**asdict(f), "source": str(f.source)} for f in self.files]
        doc["deleted"] = list(self.deleted)
        return doc


def _dry_run(staged: StagedOutput, spec: PublishSpec, api: HfApi | None) -> PublishResult:
    """What would be uploaded, without a request (the endpoint is not even contacted)."""
    endpoint = (
        str(api.endpoint) if api is not None else os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    )
    size = sum(f.size for f in staged.files)
    message = f"would publish {len(staged.files)} files ({size} bytes) to {spec.repo}@{spec.revision}"
    return PublishResult(
        output=staged.output,
        repo=spec.repo,
        revision=spec.revision,
        commit=None,
        url=f"{endpoint.rstrip('/')}/{spec.repo}",
        status="dry-run",
        files=staged.files,
        tag=staged.tag,
        digest=staged.digest,
        message=f"{message} and tag {staged.tag}",
    )


def publish_build(
    out_root: Path,
    specs: Mapping[str, PublishSpec],
    *,
    dry_run: bool = False,
    api: HfApi | None = None,
) -> list[PublishResult]:
    """Build folder + {output: PublishSpec} -> one PublishResult per output, in order.

    Every output is verified, with the build lock held, before the first request, so a refused
    build publishes nothing. ``dry_run`` makes no request and needs no token: it returns what
    would be uploaded. ``api`` is a configured ``HfApi`` (endpoint, token); default: HF's own,
    which reads ``HF_ENDPOINT``/``HF_TOKEN`` or the stored login.
    """
    out_root = Path(out_root)
    if not specs:
        raise UsageError("nothing to publish: no output has a publish target")
    targets = [(s.repo, s.revision) for s in specs.values()]
    if len(set(targets)) != len(targets):
        raise UsageError("two outputs publish to the same repo and branch; give each its own")
    with build_lock_held(out_root):
        staged = stage_outputs(out_root, list(specs))
        if dry_run:
            return [_dry_run(s, specs[s.output], api) for s in staged]
        try:
            from .hub import client_and_token, push
        except ModuleNotFoundError as exc:
            if exc.name != "huggingface_hub":
                raise
            raise UsageError("publishing needs huggingface_hub: pip install 'lorarecipe[build]'") from None
        client, token = client_and_token(api)
        return [push(client, specs[s.output], s, token) for s in staged]


def publish_output(
    out_root: Path,
    output: str,
    spec: PublishSpec,
    *,
    dry_run: bool = False,
    api: HfApi | None = None,
) -> PublishResult:
    """One output of a finished build -> its PublishResult (see :func:`publish_build`)."""
    return publish_build(out_root, {output: spec}, dry_run=dry_run, api=api)[0]
