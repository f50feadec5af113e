"""A loopback Hugging Face Hub for tests: the endpoints huggingface_hub 2.4.0 calls to publish.

``MockHub`` serves on 127.0.0.1 (a random port, stdlib ``http.server`` in a thread) exactly what the
real client requests for ``lorarecipe.publish`` (read from ``hf_api.py`` and ``_commit_api.py``):

====================================================  ==========================================
``POST /api/repos/create``                            ``create_repo`` (409 + url when it exists)
``GET  /api/models/{repo}/refs``                      ``list_repo_refs``
``POST /api/models/{repo}/branch/{branch}``           ``create_branch``
``GET  /api/models/{repo}/tree/{rev}[/{path}]``       ``list_repo_files`` / ``list_repo_tree``
``GET  /api/models/{repo}[/revision/{rev}]``          ``repo_info`` (``create_commit`` when nothing changed)
``POST /api/validate-yaml``                           ``create_commit`` when README.md is uploaded
``POST /api/models/{repo}/preupload/{rev}``           upload modes: always "regular", with the remote oid
``POST /api/models/{repo}/commit/{rev}``              NDJSON: header, base64 ``file``, ``deletedFile``
``POST /api/models/{repo}/tag/{rev}``                 ``create_tag`` (409 when the tag exists)
====================================================  ==========================================

Anything else answers 501 and is listed in ``unexpected``. It keeps real git-like state (commits
with full trees, branches, tags), records every request and commit, and can simulate a rejected
token (``reject_token``), a missing write permission (``forbid_create``), a parent-commit race
(``race_commit``) or any failing answer (``fail_with``).
Answering "regular" skips the LFS/xet paths on purpose: they need a storage backend.
"""

from __future__ import annotations

import _socket
import base64
import contextlib
import hashlib
import itertools
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["CommitRecord", "MockHub", "Request", "git_blob_oid", "loopback_allowed"]

GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_oid(data: bytes) -> str:
    """git's blob id (what the Hub calls a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: str | None


@dataclass
class CommitRecord:
    """One commit the server made: what it received and the tree it produced."""

    repo: str
    revision: str
    oid: str
    parent: str | None
    summary: str
    description: str
    added: dict[str, bytes]
    deleted: list[str]
    tree: dict[str, bytes]

    @property
    def message(self) -> str:
        """The full git message, as the Hub stores it: summary, blank line, description."""
        return f"{self.summary}\n\n{self.description}" if self.description else self.summary


@dataclass
class _Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tag_messages: dict[str, str] = field(default_factory=dict)
    trees: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> full tree


class _HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, extra: dict[str, Any] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class MockHub:
    """The Hub's state and request log; ``start()`` serves it, ``stop()`` shuts it down."""

    def __init__(self, token: str = "hf_mockWriteToken0123456789") -> None:
        self.token = token
        self.repos: dict[str, _Repo] = {}
        self.requests: list[Request] = []
        self.commits: list[CommitRecord] = []
        self.unexpected: list[str] = []
        self.reject_token = False  # every request: 401 "Invalid credentials in Authorization header"
        self.forbid_create = False  # POST /api/repos/create: 403
        self.race_commit = False  # next commit: 412, as if someone pushed since the client looked
        self.fail_with: tuple[int, str] | None = None  # every request: this status and error message
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "MockHub is not started"
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MockHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mock-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---- what tests look at -------------------------------------------------------------------
    def head(self, repo: str, branch: str = "main") -> str:
        return self.repos[repo].branches[branch]

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        """The full tree of ``repo`` at a branch, tag or commit."""
        state = self.repos[repo]
        return dict(state.trees[self._resolve(state, revision)])

    def tags(self, repo: str) -> dict[str, str]:
        return dict(self.repos[repo].tags)

    def commits_to(self, repo: str) -> list[CommitRecord]:
        return [c for c in self.commits if c.repo == repo]

    def add_repo(self, repo: str, files: dict[str, bytes] | None = None, private: bool = True) -> str:
        """A repo that already exists (initial commit + ``files``); returns the head commit."""
        with self._lock:
            state = self._create(repo, private)
            if files:
                self._commit(repo, state, "main", "seed", "", dict(files), [], None)
            return state.branches["main"]

    # ---- state changes (under the lock) -------------------------------------------------------
    def _new_oid(self) -> str:
        return hashlib.sha1(f"mock-commit-{next(self._ids)}".encode()).hexdigest()

    def _create(self, repo: str, private: bool) -> _Repo:
        state = _Repo(private=private)
        oid = self._new_oid()
        state.trees[oid] = {".gitattributes": GITATTRIBUTES}
        state.branches["main"] = oid
        self.repos[repo] = state
        return state

    def _resolve(self, state: _Repo, revision: str) -> str:
        for refs in (state.branches, state.tags):
            if revision in refs:
                return refs[revision]
        if revision in state.trees:
            return revision
        raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(
        self,
        repo: str,
        state: _Repo,
        branch: str,
        summary: str,
        description: str,
        added: dict[str, bytes],
        deleted: list[str],
        parent_wanted: str | None,
    ) -> CommitRecord:
        if branch not in state.branches:
            raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        parent = state.branches[branch]
        if parent_wanted is not None and parent_wanted != parent:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(state.trees[parent])
        for path in deleted:
            if path not in tree:
                raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del tree[path]
        tree.update(added)
        oid = self._new_oid()
        state.trees[oid] = tree
        state.branches[branch] = oid
        record = CommitRecord(repo, branch, oid, parent, summary, description, added, deleted, tree)
        self.commits.append(record)
        return record

    # ---- endpoints ----------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
        """(status, JSON document) for one request; raises _HubError for error answers."""
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body))
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body))
        parts = [unquote(p) for p in path.split("/")[1:]]
        if len(parts) < 4 or parts[:2] != ["api", "models"]:
            raise _HubError(501, f"mock hub: unexpected endpoint {method} {path}")
        repo, rest = f"{parts[2]}/{parts[3]}", parts[4:]
        state = self.repos.get(repo)
        if state is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        action = rest[0] if rest else ""
        if method == "GET" and action in ("", "revision"):
            return self._repo_info(repo, state, rest[1] if len(rest) > 1 else "main")
        if method == "GET" and action == "refs":
            return 200, self._refs(state)
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return 200, self._tree(state, rest[1], "/".join(rest[2:]), query)
        if method == "POST" and action == "branch" and len(rest) == 2:
            return self._create_branch(state, rest[1], json.loads(body or b"{}"))
        if method == "POST" and action == "preupload" and len(rest) == 2:
            return 200, self._preupload(state, rest[1], json.loads(body))
        if method == "POST" and action == "commit" and len(rest) == 2:
            return 200, self._commit_ndjson(repo, state, rest[1], body)
        if method == "POST" and action == "tag" and len(rest) == 2:
            return self._create_tag(state, rest[1], json.loads(body))
        raise _HubError(501, f"mock hub: unexpected endpoint {method} {path}")

    def _create_repo(self, doc: dict[str, Any]) -> tuple[int, Any]:
        if doc.get("type") not in (None, "model"):
            raise _HubError(400, "mock hub: only model repos")
        repo = f"{doc.get('organization')}/{doc['name']}"
        url = f"{self.endpoint}/{repo}"
        if repo in self.repos:
            raise _HubError(409, "You already created this model repo", extra={"url": url})
        if self.forbid_create:
            raise _HubError(403, "You don't have the rights to create a model under this namespace")
        self._create(repo, doc.get("visibility") == "private")
        return 200, {"url": url, "name": repo, "id": f"id-{repo}"}

    def _validate_yaml(self, doc: dict[str, Any]) -> tuple[int, Any]:
        content: str = doc.get("content", "")
        if content.startswith("---\n"):
            front = content[4:].split("\n---", 1)[0]
            try:
                meta = yaml.safe_load(front)
            except yaml.YAMLError as exc:
                raise _HubError(400, "Invalid YAML", extra={"errors": [{"message": str(exc)}]}) from None
            if meta is not None and not isinstance(meta, dict):
                raise _HubError(400, "Invalid metadata", extra={"errors": [{"message": "not a mapping"}]})
        return 200, {"errors": [], "warnings": []}

    def _repo_info(self, repo: str, state: _Repo, revision: str) -> tuple[int, Any]:
        oid = self._resolve(state, revision)
        siblings = [{"rfilename": p} for p in sorted(state.trees[oid])]
        return 200, {"id": repo, "sha": oid, "private": state.private, "siblings": siblings}

    @staticmethod
    def _refs(state: _Repo) -> dict[str, Any]:
        def ref(kind: str, name: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

        return {
            "branches": [ref("heads", n, o) for n, o in state.branches.items()],
            "converts": [],
            "tags": [ref("tags", n, o) for n, o in state.tags.items()],
            "pullRequests": [],
        }

    def _tree(self, state: _Repo, revision: str, under: str, query: dict[str, list[str]]) -> list[Any]:
        tree = state.trees[self._resolve(state, revision)]
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = f"{under}/" if under else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :].split("/")
            for depth in range(1, len(rel)):
                folder = prefix + "/".join(rel[:depth])
                entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
                if not recursive:
                    break
            if recursive or len(rel) == 1:
                entries[path] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
        return list(entries.values())

    def _create_branch(self, state: _Repo, branch: str, doc: dict[str, Any]) -> tuple[int, Any]:
        if branch in state.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        state.branches[branch] = self._resolve(state, doc.get("startingPoint") or "main")
        return 200, {}

    def _preupload(self, state: _Repo, revision: str, doc: dict[str, Any]) -> dict[str, Any]:
        tree = state.trees[self._resolve(state, revision)]
        files = []
        for entry in doc["files"]:
            remote = tree.get(entry["path"])
            files.append(
                {
                    "path": entry["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(remote) if remote is not None else None,
                }
            )
        return {"files": files, "commitOid": self._resolve(state, revision)}

    def _commit_ndjson(self, repo: str, state: _Repo, revision: str, body: bytes) -> dict[str, Any]:
        header: dict[str, Any] = {}
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, "mock hub: files must be base64")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise _HubError(400, f"mock hub: unsupported commit operation {key!r} (no LFS here)")
        if self.race_commit:
            self.race_commit = False
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        record = self._commit(
            repo,
            state,
            revision,
            header.get("summary", ""),
            header.get("description", ""),
            added,
            deleted,
            header.get("parentCommit"),
        )
        url = f"{self.endpoint}/{repo}/commit/{record.oid}"
        return {"success": True, "commitOid": record.oid, "commitUrl": url, "hookOutput": ""}

    def _create_tag(self, state: _Repo, revision: str, doc: dict[str, Any]) -> tuple[int, Any]:
        tag = doc["tag"]
        if tag in state.tags:
            raise _HubError(409, f"Tag {tag} already exists")
        state.tags[tag] = self._resolve(state, revision)
        state.tag_messages[tag] = doc.get("message", "")
        return 200, {}


class _Handler(BaseHTTPRequestHandler):
    hub: MockHub
    protocol_version = "HTTP/1.0"  # one request per connection: no stale pooled sockets between tests

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        body = self._body()
        auth = self.headers.get("Authorization")
        status: int
        doc: Any
        headers: dict[str, str] = {}
        with hub._lock:
            hub.requests.append(Request(self.command, url.path, auth))
            try:
                if hub.fail_with is not None:
                    raise _HubError(*hub.fail_with)
                if hub.reject_token or auth != f"Bearer {hub.token}":
                    raise _HubError(401, "Invalid credentials in Authorization header")
                status, doc = hub.handle(self.command, url.path, parse_qs(url.query), body)
            except _HubError as exc:
                if exc.status == 501:
                    hub.unexpected.append(f"{self.command} {url.path}")
                status, doc = exc.status, {"error": exc.message, **exc.extra}
                headers["X-Error-Message"] = exc.message
                if exc.code:
                    headers["X-Error-Code"] = exc.code
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = _serve
    do_POST = _serve


@contextlib.contextmanager
def loopback_allowed(port: int) -> Iterator[None]:
    """Let sockets reach 127.0.0.1:``port`` while tests/conftest.py blocks every other connection."""
    blocked = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_INET and tuple(address)[:2] == ("127.0.0.1", port):
            return _socket.socket.connect(self, address)
        return blocked(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        socket.socket.connect = blocked  # type: ignore[method-assign]


def _serve_until_interrupted() -> None:
    """``python -m tests.helpers.hub_server``: serve the mock Hub until Ctrl-C (or SIGTERM), printing
    the two environment variables huggingface_hub's client reads (for a publish transcript by hand)."""
    import signal
    import sys

    hub = MockHub().start()
    print(f"HF_ENDPOINT={hub.endpoint}\nHF_TOKEN={hub.token}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        hub.stop()


if __name__ == "__main__":
    _serve_until_interrupted()
