"""The Hub side of publishing: one verified output -> at most one commit and one tag.

``StagedOutput`` + ``PublishSpec`` + ``HfApi`` -> ``PublishResult``. Every call goes through
huggingface_hub's own client (``create_commit`` picks regular, LFS or xet uploads); its exceptions
become lorarecipe errors naming the repo, with a hint, and the token is scrubbed from every message.
Imported only to publish for real: importing it imports huggingface_hub.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub import errors as hf

from ..errors import BuildError, InputUnavailableError, IntegrityError, LorarecipeError, Problem, UsageError
from .stage import StagedOutput

if TYPE_CHECKING:
    from . import PublishResult, PublishSpec, Status

__all__ = ["OFFLINE_MESSAGE", "TOKEN_HINT", "client_and_token", "push"]

TOKEN_HINT = "set HF_TOKEN to a token with write access or run `hf auth login`"
OFFLINE_MESSAGE = (
    "publishing needs the network, but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set; "
    "unset it to publish, or make a dry run"
)
_KEPT_REMOTE = frozenset({".gitattributes"})  # the Hub's own file (LFS rules for git clones): never deleted


def _error(cls: type[LorarecipeError], message: str, hint: str | None, where: str) -> LorarecipeError:
    """A lorarecipe error; a usage error carries its hint in the message (the CLI prints only that)."""
    if cls is UsageError:
        return UsageError(f"{message}; {hint}" if hint else message)
    return cls(message, [Problem(message, path=where, hint=hint)])


def _is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE now, or as huggingface_hub read them at its import."""
    env = any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return env or bool(constants.is_offline_mode())


def client_and_token(api: HfApi | None) -> tuple[HfApi, str]:
    """(client, token): the token of ``HfApi(token=…)``, else HF's own (``HF_TOKEN``, `hf auth login`)."""
    if _is_offline():
        raise UsageError(OFFLINE_MESSAGE)
    from .. import __version__

    client = api if api is not None else HfApi(library_name="lorarecipe", library_version=__version__)
    token = client.token if client.token is not None else get_token()
    if not isinstance(token, str) or not token:
        raise UsageError(f"publishing needs a Hugging Face token with write access; {TOKEN_HINT}")
    return client, token


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The client's connection errors (httpx2 in huggingface_hub 2.x, httpx in 1.x) and the OS's."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        error = getattr(sys.modules.get(name), "TransportError", None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


def _scrub(text: object, token: str) -> str:
    return str(text).replace(token, "***") if token else str(text)


def _http_error(exc: Any, repo: str, token: str, where: str) -> LorarecipeError:
    """A huggingface_hub HTTP error -> the lorarecipe error saying what to do, with the repo named."""
    status = getattr(getattr(exc, "response", None), "status_code", 0)
    server = _scrub(getattr(exc, "server_message", None) or "", token).strip().splitlines()
    said = f" (the Hub said: {server[0]})" if server else ""
    if isinstance(exc, hf.RevisionNotFoundError):
        return _error(InputUnavailableError, f"a revision of {repo} was not found{said}", None, where)
    if status == 404 or (isinstance(exc, hf.RepositoryNotFoundError) and status != 403):
        hint = "check the repo name and that the token's account can see it"
        return _error(InputUnavailableError, f"{repo} was not found on the Hub ({status}){said}", hint, where)
    if status == 401:
        return _error(UsageError, f"the Hub rejected the token for {repo} (401){said}", TOKEN_HINT, where)
    if status == 403:
        hint = f"the token needs write access to the namespace; {TOKEN_HINT}"
        return _error(UsageError, f"the token may not write to {repo} (403){said}", hint, where)
    if status in (409, 412):
        hint = "someone else pushed meanwhile; publish again"
        return _error(BuildError, f"{repo} changed while publishing ({status}){said}", hint, where)
    hint = "try again later" + (" (rate limited)" if status == 429 else "")
    return _error(BuildError, f"the Hub answered {status} while publishing {repo}{said}", hint, where)


@contextlib.contextmanager
def _hub_errors(repo: str, token: str, where: str) -> Iterator[None]:
    """Turn the client's exceptions into lorarecipe errors (no traceback, no token); quiet its logs."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)  # e.g. its "No files have been modified" warning: the result says it
    try:
        yield
    except hf.OfflineModeIsEnabled:
        raise UsageError(OFFLINE_MESSAGE) from None
    except hf.HfHubHTTPError as exc:
        raise _http_error(exc, repo, token, where) from None
    except _transport_errors() as exc:
        message = f"cannot reach the Hub to publish {repo}: {_scrub(exc, token)}"
        raise _error(BuildError, message, "check the network connection and HF_ENDPOINT", where) from None
    except ValueError as exc:  # the client's own refusals, e.g. README.md metadata the Hub rejects
        message = f"the Hub client refused to publish {repo}: {_scrub(exc, token)}"
        raise _error(BuildError, message, None, where) from None
    finally:
        log.setLevel(level)


def commit_message(spec: PublishSpec, staged: StagedOutput) -> tuple[str, str]:
    """(summary, description): the message or a default, then the fingerprint and digest trailers."""
    build = f" [{staged.build}]" if staged.build else ""
    default = (
        f"Publish {staged.output} from lorarecipe recipe {staged.recipe}{build}\n\n"
        f"Output '{staged.output}' ({staged.kind}) built by lorarecipe {staged.version}; every file "
        "was re-hashed against the build's manifest (lorarecipe-manifest.json) before upload."
    )
    summary, _, body = (spec.commit_message or default).strip().partition("\n")
    trailers = f"Lorarecipe-Fingerprint: {staged.fingerprint}\nLorarecipe-Digest: {staged.digest}"
    return summary.strip(), (f"{body.strip()}\n\n{trailers}" if body.strip() else trailers)


def _heads(api: HfApi, repo: str) -> tuple[dict[str, str], dict[str, str]]:
    refs = api.list_repo_refs(repo)
    return {b.name: b.target_commit for b in refs.branches}, {t.name: t.target_commit for t in refs.tags}


def push(api: HfApi, spec: PublishSpec, staged: StagedOutput, token: str) -> PublishResult:
    """One staged output -> at most one commit and one tag on ``spec.repo``@``spec.revision``.

    Unchanged when the output's tag marks the branch head. Otherwise the commit adds every file
    and deletes the remote files that are no longer part of the output (but ``.gitattributes``),
    so the branch equals the output; ``parent_commit`` turns a push by someone else in between
    into a conflict instead of a silent overwrite. The tag is added if the repo lacks it.
    """
    from . import PublishResult

    repo, branch, tag, where = spec.repo, spec.revision, staged.tag, f"publish.{staged.output}"

    def result(status: Status, commit: str, deleted: tuple[str, ...], message: str) -> PublishResult:
        url = f"{api.endpoint.rstrip('/')}/{repo}/commit/{commit}"
        files, digest = staged.files, staged.digest
        return PublishResult(
            staged.output, repo, branch, commit, url, status, files, tag, digest, deleted, message
        )

    with _hub_errors(repo, token, where):
        try:
            heads, tags = _heads(api, repo)
        except hf.RepositoryNotFoundError:
            if not spec.create:
                message = f"{repo} does not exist on the Hub (or the token cannot see it)"
                hint = "create it first, or let lorarecipe create it (create: true)"
                raise _error(InputUnavailableError, message, hint, where) from None
            api.create_repo(repo, private=spec.private, exist_ok=True)
            heads, tags = _heads(api, repo)
        head = heads.get(branch)
        if head is not None and tags.get(tag) == head:
            return result("unchanged", head, (), f"already published at {head} (tag {tag})")
        if head is None:
            if not spec.create:
                raise _error(
                    InputUnavailableError, f"{repo} has no branch {branch!r}", "create it first", where
                )
            api.create_branch(repo, branch=branch, exist_ok=True)
            head = _heads(api, repo)[0][branch]
        ours = {f.path for f in staged.files}
        remote = api.list_repo_files(repo, revision=head)
        deleted = tuple(sorted(p for p in remote if p not in ours and p not in _KEPT_REMOTE))
        additions = [
            CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.source)) for f in staged.files
        ]
        for op, f in zip(additions, staged.files, strict=True):
            if op.upload_info.sha256.hex() != f.sha256:  # what the client sends is what was verified
                raise _error(IntegrityError, f"{f.source}: changed while publishing", "rebuild", where)
        summary, description = commit_message(spec, staged)
        info = api.create_commit(
            repo,
            [*additions, *(CommitOperationDelete(path_in_repo=p) for p in deleted)],
            commit_message=summary,
            commit_description=description,
            revision=branch,
            parent_commit=head,
        )
        commit = str(info.oid)
        if tag not in tags:
            api.create_tag(repo, tag=tag, revision=commit, tag_message=f"lorarecipe {staged.digest}")
    tagged = (
        f"tag {tag} stays at {tags[tag]}, the same files published before" if tag in tags else f"tagged {tag}"
    )
    if commit == head:  # the branch already held exactly these files: the client made no commit
        return result("unchanged", commit, (), f"already published at {commit}; {tagged}")
    return result("published", commit, deleted, f"published at {commit}; {tagged}")
