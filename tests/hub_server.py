"""A strict, in-process stand-in for the Hugging Face Hub, for tests.

`FakeHub` keeps git-like state (commits with full snapshots, branches, tags, private flags, users
and tokens) and answers the HTTP API that the real `huggingface_hub` client uses: create/delete
repo, settings, repo info, preupload, NDJSON commits, tree, paths-info, refs, commits, branches,
tags, whoami and the `resolve` download endpoint (HEAD, GET and byte ranges).  It answers errors
the way the Hub does (status, `X-Error-Code`, `X-Error-Message`), so the client raises the same
exception classes: `RepositoryNotFoundError`, `RevisionNotFoundError`, `RemoteEntryNotFoundError`,
`HfHubHTTPError` 401/403/409/412, `BadRequestError`.

Deliberate simplifications, all on the safe side for tests:

* `preupload` answers ``"regular"`` for every file, so contents travel base64-encoded inside the
  commit itself and the client never talks to an LFS or Xet storage service.
* Any request the server does not implement is answered 404 and recorded in `FakeHub.unhandled`;
  the `hub_server` fixture fails the test at teardown if that list is not empty.

Use the `hub_server` fixture (import it into a test module or `conftest.py`), or `run_hub_server()`
together with `point_hf_client_at()` outside pytest.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import itertools
import json
import re
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

TESTER = "tester"
INTRUDER = "intruder"

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_NAME = re.compile(r"^(?![-.])(?!.*--)(?!.*\.\.)[A-Za-z0-9._-]{1,96}(?<![-.])$")
_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")

# What the Hub commits as "initial commit" in every new repository.
_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz"
    " *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar"
    " *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
)
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _LFS_PATTERNS.split(" ")
).encode()


def git_blob_oid(data: bytes) -> str:
    """The git blob id of `data` (what `git hash-object` prints, and what the Hub calls `oid`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _tree_oid(files: Mapping[str, bytes], prefix: str = "") -> str:
    listing = "".join(
        f"{path}\0{git_blob_oid(data)}\n" for path, data in sorted(files.items()) if path.startswith(prefix)
    )
    return hashlib.sha1(b"tree " + listing.encode()).hexdigest()


def valid_ref_name(name: str) -> bool:
    """Git's `check-ref-format` rules for a short branch/tag name, plus the Hub's own restrictions."""
    if not name or name in {"@", "HEAD"} or name.startswith(("/", "-", "refs/")) or name.endswith(("/", ".")):
        return False
    if any(bad in name for bad in ("..", "//", "@{")) or _FULL_SHA.match(name):
        return False
    if any(ch in " ~^:?*[\\" or ord(ch) < 0x21 or ord(ch) > 0x7E for ch in name):
        return False
    return not any(part.startswith(".") or part.endswith(".lock") for part in name.split("/"))


def _valid_path(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and "\\" not in path and all(part not in {"", ".", "..", ".git"} for part in parts)


# ---------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Commit:
    """One commit: a full snapshot of the repository's files plus its metadata."""

    oid: str
    parent: str | None
    files: Mapping[str, bytes]
    title: str
    message: str  # the commit description (the Hub's "summary" is the title)
    author: str
    date: str


@dataclass
class Repo:
    """A repository with its whole history; branches and tags map names to commit ids."""

    repo_id: str
    repo_type: str
    owner: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    ambiguous: list[str] = field(default_factory=list)

    def resolve(self, revision: str) -> str | None:
        """Commit id for a branch, tag, `refs/heads/x`, `refs/tags/x`, full sha or unique sha prefix (>= 7).

        A name that is both a branch and a tag resolves like `git rev-parse` (the tag wins) and is
        recorded in `ambiguous`: the real Hub does not document which one it picks.
        """
        if revision.startswith("refs/heads/"):
            return self.branches.get(revision[len("refs/heads/") :])
        if revision.startswith("refs/tags/"):
            return self.tags.get(revision[len("refs/tags/") :])
        if revision in self.tags:
            if revision in self.branches:
                self.ambiguous.append(revision)
            return self.tags[revision]
        if revision in self.branches:
            return self.branches[revision]
        if _SHORT_SHA.match(revision):
            matches = [oid for oid in self.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """The snapshot of files at `revision`; KeyError if the revision does not exist."""
        oid = self.resolve(revision)
        if oid is None:
            raise KeyError(revision)
        return dict(self.commits[oid].files)

    def history(self, revision: str = "main") -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        oid, out = self.resolve(revision), []
        while oid is not None:
            out.append(self.commits[oid])
            oid = self.commits[oid].parent
        return out

    @property
    def url_path(self) -> str:
        return _URL_PREFIX[self.repo_type] + self.repo_id


@dataclass(frozen=True)
class CommitRecord:
    """An accepted commit, as received: what was added (path -> bytes) and deleted, and the body size."""

    repo_id: str
    repo_type: str
    revision: str
    oid: str
    parent: str | None
    message: str
    description: str
    files: Mapping[str, bytes]
    deleted: tuple[str, ...]
    bytes: int
    user: str


@dataclass(frozen=True)
class RequestRecord:
    """One HTTP request seen by the server."""

    method: str
    path: str
    status: int
    body_bytes: int
    user: str | None


@dataclass
class _Fault:
    remaining: int
    path_contains: str | None
    method: str | None
    status: int
    disconnect: bool
    apply_first: bool

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.path_contains is None or self.path_contains in path)
        )


@dataclass(frozen=True)
class _Identity:
    user: str
    role: str  # "read" or "write"


@dataclass
class Request:
    """A parsed HTTP request."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes


@dataclass
class Response:
    """An HTTP response to send."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, **headers: str) -> Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})


class HubError(Exception):
    """An error answer, in the Hub's format (JSON body, `X-Error-Code` and `X-Error-Message` headers)."""

    def __init__(self, status: int, message: str, code: str | None = None, **headers: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers

    def response(self) -> Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return Response.json({"error": self.message}, self.status, **headers)


def _repo_not_found(identity: _Identity | None) -> HubError:
    # Anonymous callers get a 401 and others a 404, and neither can tell private from missing.
    return HubError(401 if identity is None else 404, "Repository not found", "RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


# ---------------------------------------------------------------------------------------------- the hub


class FakeHub:
    """State and request handling of the fake Hub (independent of the HTTP transport)."""

    def __init__(self, endpoint: str = "http://127.0.0.1") -> None:
        self.endpoint = endpoint
        self.repos: dict[tuple[str, str], Repo] = {}
        self.commits: list[CommitRecord] = []
        self.requests: list[RequestRecord] = []
        self.unhandled: list[str] = []
        self.server_errors: list[str] = []
        self.bytes_received = 0
        self._tokens: dict[str, _Identity] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self.token = self.add_token(TESTER)
        self.other_token = self.add_token(INTRUDER)
        self.read_token = self.add_token(TESTER, role="read")

    # -- public helpers for tests

    def add_token(self, user: str, role: str = "write") -> str:
        """Create a new valid token for `user` with role "read" or "write"."""
        token = f"hf_{user}_{role}_{secrets.token_hex(8)}"
        self._tokens[token] = _Identity(user, role)
        return token

    def fail_next(
        self,
        n: int = 1,
        path_contains: str | None = None,
        status: int = 500,
        *,
        method: str | None = None,
        disconnect: bool = False,
        apply_first: bool = False,
    ) -> None:
        """Make the next `n` matching requests fail.

        Matching is on the raw request path (with query) containing `path_contains`, e.g. "/commit/",
        "/tag/", "/branch/", "/preupload/", "/resolve/", and on `method` if given.  The request fails
        with `status` (JSON error body), or with the connection closed and no answer at all if
        `disconnect`.  With `apply_first` the request is carried out before the failure is returned
        (a commit that lands but whose answer is lost).  Note that the client retries 408/429/5xx and
        network errors (up to 5 times, with backoff that the `hub_server` fixture makes instant) for
        `preupload`, tree listing, downloads and `upload_folder`'s commits when `hf_xet` is installed,
        but not for `create_commit`, `create_branch` or `create_tag`.
        """
        with self._lock:
            self._faults.append(_Fault(n, path_contains, method, status, disconnect, apply_first))

    def clear_faults(self) -> None:
        """Forget every injected fault not used yet (the network is back), however many the client used."""
        with self._lock:
            self._faults.clear()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repository (KeyError if missing); use it to inspect files, branches, tags, private."""
        return self.repos[(repo_type, repo_id)]

    def create_repo(
        self, repo_id: str, *, owner: str | None = None, private: bool = False, repo_type: str = "model"
    ) -> Repo:
        """Create a repository directly (with its initial `.gitattributes` commit), bypassing HTTP."""
        with self._lock:
            repo = Repo(repo_id, repo_type, owner or repo_id.split("/")[0], private, _now())
            self._commit(
                repo, None, {".gitattributes": DEFAULT_GITATTRIBUTES}, "initial commit", "", repo.owner
            )
            repo.branches["main"] = next(iter(repo.commits))
            self.repos[(repo_type, repo_id)] = repo
            return repo

    # -- transport entry point

    def take_fault(self, method: str, path: str) -> _Fault | None:
        """Pop one unit of the first registered fault matching this request, if any."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
        return None

    def handle(self, request: Request) -> Response:
        """Answer one request (never raises)."""
        identity: _Identity | None = None
        try:
            identity = self._authenticate(request.headers.get("Authorization"))
            with self._lock:
                return self._route(request, identity)
        except HubError as error:
            return error.response()
        except Exception:  # a bug in this server: answer 500 and make the fixture fail the test
            self.server_errors.append(f"{request.method} {request.path}\n{traceback.format_exc()}")
            return HubError(500, "Internal error in the fake Hub").response()

    def record(self, request: Request, status: int) -> None:
        """Log a request with the status returned (0: connection dropped); count commit upload bytes."""
        token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
        identity = self._tokens.get(token)
        with self._lock:
            if request.method == "POST" and "/commit/" in request.path:
                self.bytes_received += len(request.body)
            self.requests.append(
                RequestRecord(
                    request.method, request.path, status, len(request.body), identity and identity.user
                )
            )

    # -- internals: auth, lookup

    def _authenticate(self, header: str | None) -> _Identity | None:
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        identity = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if identity is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return identity

    def _get_repo(
        self, repo_type: str, repo_id: str, identity: _Identity | None, *, write: bool = False
    ) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        visible = repo is not None and (
            not repo.private or (identity is not None and identity.user == repo.owner)
        )
        if repo is None or not visible:
            raise _repo_not_found(identity)
        if write:
            if identity is None:
                raise _repo_not_found(identity)
            if identity.user != repo.owner or identity.role != "write":
                raise HubError(403, f"You don't have the rights to write to {repo_type} {repo_id}")
        return repo

    def _resolve_or_404(self, repo: Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise _revision_not_found(revision)
        return oid

    def _commit(
        self, repo: Repo, parent: str | None, files: dict[str, bytes], title: str, message: str, author: str
    ) -> Commit:
        date = _now()
        seed = f"{_tree_oid(files)}\n{parent}\n{author}\n{date}\n{title}\n{message}\n{next(self._counter)}"
        commit = Commit(
            hashlib.sha1(seed.encode()).hexdigest(), parent, dict(files), title, message, author, date
        )
        repo.commits[commit.oid] = commit
        return commit

    def _url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{repo.url_path}"

    # -- routing

    def _route(self, request: Request, identity: _Identity | None) -> Response:
        method, path = request.method, request.path
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami(identity)
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(request, identity)
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo(request, identity)
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(request)
        if match := _API_REPO.match(path):
            kind, namespace, name, rest = match.groups()
            repo_type, repo_id = _REPO_TYPES[kind], f"{unquote(namespace)}/{unquote(name)}"
            parts = [unquote(part) for part in (rest or "").split("/")] if rest else []
            if response := self._route_repo_api(request, identity, repo_type, repo_id, parts):
                return response
        elif (match := _RESOLVE.match(path)) and method in {"GET", "HEAD"}:
            kind, namespace, name, revision, filename = match.groups()
            repo_type = _REPO_TYPES[kind] if kind else "model"
            repo = self._get_repo(repo_type, f"{unquote(namespace)}/{unquote(name)}", identity)
            return self._resolve_file(request, repo, unquote(revision), unquote(filename))
        self.unhandled.append(f"{method} {path}")
        return Response.json({"error": "Sorry, we can't find the page you are looking for."}, 404)

    def _route_repo_api(
        self, request: Request, identity: _Identity | None, repo_type: str, repo_id: str, parts: list[str]
    ) -> Response | None:
        method, head, args = request.method, (parts[0] if parts else ""), parts[1:]
        write = method in {"POST", "PUT", "DELETE"} and head not in {"paths-info"}
        if (method, head) not in _REPO_ROUTES or (head and not args and head not in {"refs", "settings"}):
            return None
        repo = self._get_repo(repo_type, repo_id, identity, write=write)
        rev = args[0] if args else "main"
        match (method, head):
            case ("GET", ""):
                return self._repo_info(request, repo, None)
            case ("GET", "revision"):
                return self._repo_info(request, repo, rev)
            case ("PUT", "settings"):
                return self._settings(request, repo)
            case ("POST", "preupload"):
                return self._preupload(request, repo, rev)
            case ("POST", "commit"):
                return self._create_commit(request, repo, rev, identity)
            case ("GET", "tree"):
                return self._tree(request, repo, rev, "/".join(args[1:]))
            case ("POST", "paths-info"):
                return self._paths_info(request, repo, rev)
            case ("GET", "refs"):
                return self._refs(request, repo)
            case ("GET", "commits"):
                return self._list_commits(repo, rev)
            case ("POST", "branch"):
                return self._create_branch(request, repo, "/".join(args))
            case ("DELETE", "branch"):
                return self._delete_branch(repo, "/".join(args))
            case ("POST", "tag"):
                return self._create_tag(request, repo, rev)
            case ("DELETE", "tag"):
                return self._delete_tag(repo, "/".join(args))
        return None

    # -- endpoints

    def _whoami(self, identity: _Identity | None) -> Response:
        if identity is None:
            raise HubError(401, "Invalid username or password.")
        token = {"displayName": f"{identity.user}-{identity.role}", "role": identity.role}
        payload = {
            "type": "user",
            "id": identity.user,
            "name": identity.user,
            "fullname": identity.user,
            "orgs": [],
        }
        return Response.json({**payload, "auth": {"type": "access_token", "accessToken": token}})

    def _create_repo(self, request: Request, identity: _Identity | None) -> Response:
        if identity is None:
            raise HubError(401, "You must be authenticated to create a repository")
        payload = _json_body(request)
        name, namespace = payload.get("name"), payload.get("organization") or identity.user
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX or not isinstance(name, str) or not _REPO_NAME.match(name):
            raise HubError(400, f"Invalid repo name or type: {name!r} ({repo_type})")
        if namespace != identity.user or identity.role != "write":
            raise HubError(
                403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"'
            )
        repo_id = f"{namespace}/{name}"
        private = payload.get("visibility", "public") == "private" or payload.get("private") is True
        existing = self.repos.get((repo_type, repo_id))
        if existing is not None:
            url = self._url(existing)
            return Response.json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        repo = self.create_repo(repo_id, owner=identity.user, private=private, repo_type=repo_type)
        return Response.json({"url": self._url(repo), "name": repo_id, "id": secrets.token_hex(12)})

    def _validate_yaml(self, request: Request) -> Response:
        content = _json_body(request).get("content")
        if not isinstance(content, str):
            raise HubError(400, "Missing content")
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            return Response.json({"errors": [{"message": "Unterminated YAML metadata block"}]}, 400)
        return Response.json({"errors": [], "warnings": []})

    def _delete_repo(self, request: Request, identity: _Identity | None) -> Response:
        payload = _json_body(request)
        namespace = payload.get("organization") or (identity.user if identity else "")
        repo_type, repo_id = payload.get("type") or "model", f"{namespace}/{payload.get('name')}"
        self._get_repo(repo_type, repo_id, identity, write=True)
        del self.repos[(repo_type, repo_id)]
        return Response.json({})

    def _settings(self, request: Request, repo: Repo) -> Response:
        payload = _json_body(request)
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        elif "private" in payload:
            repo.private = bool(payload["private"])
        return Response.json({})

    def _repo_info(self, request: Request, repo: Repo, revision: str | None) -> Response:
        oid = self._resolve_or_404(repo, revision or "main")
        commit = repo.commits[oid]
        blobs = request.query.get("blobs", ["false"])[0].lower() in {"1", "true"}
        siblings = [
            {"rfilename": path, **({"size": len(data), "blobId": git_blob_oid(data)} if blobs else {})}
            for path, data in sorted(commit.files.items())
        ]
        payload = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.owner,
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(data) for data in commit.files.values()),
        }
        if repo.repo_type == "model":
            payload["modelId"] = repo.repo_id
        return Response.json(payload)

    def _preupload(self, request: Request, repo: Repo, revision: str) -> Response:
        files = self._files_at(repo, revision)
        entries = _json_body(request).get("files")
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
            raise HubError(400, "Invalid preupload payload")
        answer = []
        for entry in entries:
            existing = files.get(entry["path"])
            oid = {"oid": git_blob_oid(existing)} if existing is not None else {}
            answer.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, **oid})
        return Response.json({"files": answer, "commitOid": self._resolve_or_404(repo, revision)})

    def _create_commit(
        self, request: Request, repo: Repo, revision: str, identity: _Identity | None
    ) -> Response:
        assert identity is not None  # _get_repo(write=True) guarantees it
        if request.query.get("create_pr"):
            self.unhandled.append(f"POST {request.path} (create_pr is not supported)")
            raise HubError(501, "create_pr is not supported by the test server")
        branch = revision.removeprefix("refs/heads/")
        if branch not in repo.branches:
            if repo.resolve(revision) is None:
                raise _revision_not_found(revision)
            raise HubError(400, f"Cannot commit to '{revision}': not a branch")
        header, operations = _parse_ndjson(request.body)
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "Commit summary is required")
        head = repo.branches[branch]
        parent = header.get("parentCommit")
        if parent is not None and not (
            isinstance(parent, str) and len(parent) >= 5 and head.startswith(parent)
        ):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for key, value in operations:
            path = value.get("path") if isinstance(value, dict) else None
            if not isinstance(path, str) or not _valid_path(
                path.rstrip("/") if key == "deletedFolder" else path
            ):
                raise HubError(400, f"Invalid path in commit: {path!r}")
            if key == "file":
                added[path] = files[path] = _decode_content(value)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
                deleted.append(path)
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
                deleted.extend(doomed)
            else:  # "lfsFile": never requested by our preupload answers
                self.unhandled.append(f"commit operation {key!r} for {path}")
                raise HubError(
                    422, f"Unsupported commit operation {key!r} (the test server only accepts inline files)"
                )
        description = header.get("description") or ""
        commit = self._commit(repo, head, files, summary, description, identity.user)
        repo.branches[branch] = commit.oid
        self.commits.append(
            CommitRecord(
                repo_id=repo.repo_id,
                repo_type=repo.repo_type,
                revision=branch,
                oid=commit.oid,
                parent=head,
                message=summary,
                description=description,
                files=added,
                deleted=tuple(deleted),
                bytes=len(request.body),
                user=identity.user,
            )
        )
        url = f"{self._url(repo)}/commit/{commit.oid}"
        return Response.json({"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": ""})

    def _files_at(self, repo: Repo, revision: str) -> dict[str, bytes]:
        return dict(repo.commits[self._resolve_or_404(repo, revision)].files)

    def _entries(self, repo: Repo, oid: str, paths: list[str], *, expand: bool) -> list[dict[str, Any]]:
        files = repo.commits[oid].files
        out = []
        for path in paths:
            if path in files:
                data = files[path]
                entry: dict[str, Any] = {
                    "type": "file",
                    "oid": git_blob_oid(data),
                    "size": len(data),
                    "path": path,
                }
            else:
                entry = {"type": "directory", "oid": _tree_oid(files, path + "/"), "size": 0, "path": path}
            if expand:
                entry["lastCommit"] = self._last_commit(repo, oid, path)
            out.append(entry)
        return out

    def _last_commit(self, repo: Repo, oid: str, path: str) -> dict[str, str]:
        def view(commit: Commit) -> dict[str, bytes]:
            return {p: d for p, d in commit.files.items() if p == path or p.startswith(path + "/")}

        history = repo.history(oid)
        last = history[0]
        for older in history[1:]:
            if view(older) != view(last):
                break
            last = older
        return {"id": last.oid, "title": last.title, "date": last.date}

    def _tree(self, request: Request, repo: Repo, revision: str, path: str) -> Response:
        oid = self._resolve_or_404(repo, revision)
        files = repo.commits[oid].files
        recursive = request.query.get("recursive", ["false"])[0].lower() in {"1", "true"}
        expand = request.query.get("expand", ["false"])[0].lower() in {"1", "true"}
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        below = [p for p in files if p.startswith(prefix)]
        if prefix and not below:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", **{"X-Repo-Commit": oid})
        names: set[str] = set()
        for p in below:
            parts = p[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            names.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
        return Response.json(self._entries(repo, oid, sorted(names), expand=expand))

    def _paths_info(self, request: Request, repo: Repo, revision: str) -> Response:
        oid = self._resolve_or_404(repo, revision)
        form = parse_qs(request.body.decode())
        files = repo.commits[oid].files
        wanted = [p.strip("/") for p in form.get("paths", [])]
        exists = [p for p in wanted if p in files or any(f.startswith(p + "/") for f in files)]
        expand = form.get("expand", ["false"])[0].lower() in {"1", "true"}
        return Response.json(self._entries(repo, oid, exists, expand=expand))

    def _refs(self, request: Request, repo: Repo) -> Response:
        def refs(kind: str, mapping: dict[str, str]) -> list[dict[str, str]]:
            return [
                {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": o} for n, o in sorted(mapping.items())
            ]

        payload: dict[str, Any] = {
            "branches": refs("heads", repo.branches),
            "converts": [],
            "tags": refs("tags", repo.tags),
        }
        if request.query.get("include_prs"):
            payload["pullRequests"] = []
        return Response.json(payload)

    def _list_commits(self, repo: Repo, revision: str) -> Response:
        self._resolve_or_404(repo, revision)
        return Response.json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": f"{c.title}\n\n{c.message}" if c.message else c.title,
                    "authors": [{"user": c.author}],
                    "date": c.date,
                }
                for c in repo.history(revision)
            ]
        )

    def _create_branch(self, request: Request, repo: Repo, branch: str) -> Response:
        if not valid_ref_name(branch):
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = _json_body(request).get("startingPoint") or "main"
        repo.branches[branch] = self._resolve_or_404(repo, start)
        return Response.json(
            {"name": branch, "ref": f"refs/heads/{branch}", "targetCommit": repo.branches[branch]}
        )

    def _delete_branch(self, repo: Repo, branch: str) -> Response:
        if branch == "main":
            raise HubError(403, "Cannot delete refs/heads/main")
        if branch not in repo.branches:
            raise _revision_not_found(branch)
        del repo.branches[branch]
        return Response.json({})

    def _create_tag(self, request: Request, repo: Repo, revision: str) -> Response:
        oid = self._resolve_or_404(repo, revision)
        tag = _json_body(request).get("tag")
        if not isinstance(tag, str) or not valid_ref_name(tag):
            raise HubError(400, f"Invalid reference for a tag: {tag}")
        if tag in repo.tags:
            raise HubError(409, f"Reference refs/tags/{tag} already exists")
        repo.tags[tag] = oid
        return Response.json({"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": oid})

    def _delete_tag(self, repo: Repo, tag: str) -> Response:
        if tag not in repo.tags:
            raise _revision_not_found(tag)
        del repo.tags[tag]
        return Response.json({})

    def _resolve_file(self, request: Request, repo: Repo, revision: str, filename: str) -> Response:
        oid = self._resolve_or_404(repo, revision)
        data = repo.commits[oid].files.get(filename)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": oid})
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{git_blob_oid(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status, body = 200, data
        if (ranges := request.headers.get("Range")) and request.method == "GET":
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", ranges)
            start = int(match.group(1)) if match and match.group(1) else None
            end = int(match.group(2)) if match and match.group(2) else len(data) - 1
            if start is None and match and match.group(2):
                start, end = max(len(data) - int(match.group(2)), 0), len(data) - 1
            if start is None or start >= len(data) or end < start:
                raise HubError(416, "Range Not Satisfiable", **{"Content-Range": f"bytes */{len(data)}"})
            end = min(end, len(data) - 1)
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return Response(status, body, headers)


_REPO_ROUTES = {
    ("GET", ""),
    ("GET", "revision"),
    ("PUT", "settings"),
    ("POST", "preupload"),
    ("POST", "commit"),
    ("GET", "tree"),
    ("POST", "paths-info"),
    ("GET", "refs"),
    ("GET", "commits"),
    ("POST", "branch"),
    ("DELETE", "branch"),
    ("POST", "tag"),
    ("DELETE", "tag"),
}


def _json_body(request: Request) -> dict[str, Any]:
    if not request.body:
        return {}
    try:
        payload = json.loads(request.body)
    except ValueError as error:
        raise HubError(400, f"Invalid JSON body: {error}") from error
    if not isinstance(payload, dict):
        raise HubError(400, "Invalid JSON body: expected an object")
    return payload


def _parse_ndjson(body: bytes) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    try:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    except ValueError as error:
        raise HubError(400, f"Invalid NDJSON commit payload: {error}") from error
    if not lines or not isinstance(lines[0], dict) or lines[0].get("key") != "header":
        raise HubError(400, "Invalid commit payload: the first line must be the header")
    if not all(isinstance(line, dict) and isinstance(line.get("key"), str) for line in lines):
        raise HubError(400, "Invalid commit payload: every line must have a key")
    return lines[0].get("value") or {}, [(line["key"], line.get("value")) for line in lines[1:]]


def _decode_content(value: dict[str, Any]) -> bytes:
    content, encoding = value.get("content"), value.get("encoding", "utf-8")
    if not isinstance(content, str):
        raise HubError(400, "Invalid file operation: missing content")
    if encoding != "base64":
        return content.encode()
    try:
        return base64.b64decode(content, validate=True)
    except binascii.Error as error:
        raise HubError(400, f"Invalid base64 content: {error}") from error


# ---------------------------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive) front end: parses the request, applies faults, delegates to `FakeHub`."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls
    server: _HubHTTPServer

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        request = Request(self.command, split.path, parse_qs(split.query), self.headers, self._read_body())
        fault = hub.take_fault(request.method, self.path)
        if fault is not None and fault.apply_first:
            hub.handle(request)
        response = hub.handle(request) if fault is None else None
        if fault is not None:
            if fault.disconnect:
                hub.record(request, 0)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            response = HubError(fault.status, f"Injected failure ({fault.status})").response()
        assert response is not None
        hub.record(request, response.status)
        self._send(response)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value.encode("latin-1", "replace").decode("latin-1"))
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


@contextlib.contextmanager
def run_hub_server(host: str = "127.0.0.1", port: int = 0) -> Iterator[FakeHub]:
    """Serve a fresh `FakeHub` on `host:port` (0: a free port) in a background thread."""
    server = _HubHTTPServer((host, port), _Handler)
    server.hub = FakeHub(f"http://{host}:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
    thread.start()
    try:
        yield server.hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _InstantTime:
    """Stands in for the `time` module inside the client: `sleep` returns at once, the rest is `time`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        """Skip the client's retry backoff."""


@contextlib.contextmanager
def point_hf_client_at(
    endpoint: str, home: Path, *, disable_xet: bool = False, instant_retries: bool = False
) -> Iterator[None]:
    """Point `huggingface_hub` (and through it peft and transformers) at `endpoint`, with a private HF_HOME.

    `huggingface_hub` copies `HF_ENDPOINT`, `HF_HOME` & co into module constants at import, builds
    `HUGGINGFACE_CO_URL_TEMPLATE` (used by `hf_hub_url`, hence every download) from the endpoint
    then, and its module-level functions (`create_repo`, `file_exists`, ... used by peft) are bound
    to an `HfApi()` made at import: all of those are patched here, and restored on exit.  With
    `instant_retries` the client still retries 408/429/5xx and network errors as usual, but without
    sleeping between attempts (1 s, 2 s, 4 s, ... otherwise).
    """
    import huggingface_hub
    from huggingface_hub import constants, file_download
    from huggingface_hub.utils import _http

    home = Path(home)
    hub_cache = home / "hub"
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    if disable_xet:
        values["HF_HUB_DISABLE_XET"] = True
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in values.items():
            if hasattr(constants, name):  # a constant this huggingface_hub lacks is one it never reads
                mp.setattr(constants, name, value)
        mp.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
        if instant_retries:
            mp.setattr(_http, "time", _InstantTime())
            mp.setattr(file_download, "time", _InstantTime())
        for name in (
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_OIDC_RESOURCE",
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
        ):
            mp.delenv(name, raising=False)
        for name in ("HUGGINGFACE_CO_STAGING", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        _http.close_session()  # no pooled connection to any previous server
        huggingface_hub.HfFileSystem.clear_instance_cache()
        try:
            yield
        finally:
            _http.close_session()
            huggingface_hub.HfFileSystem.clear_instance_cache()


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[FakeHub]:
    """A fresh fake Hub on a free port, with the HF client (and its cache) pointed at it for the test.

    Yields the `FakeHub`: `.endpoint`, `.token` (write, user "tester"), `.read_token` (read-only,
    "tester"), `.other_token` (write, user "intruder"), `.bytes_received`, `.commits`, `.requests`,
    `.fail_next(...)`, `.repo(repo_id)` and `.repos`.  The client's retry backoff does not sleep.
    Fails at teardown if the client called an endpoint the server does not implement, or if the
    server itself crashed on a request.
    """
    with (
        run_hub_server() as hub,
        point_hf_client_at(hub.endpoint, tmp_path / "hf_home", instant_retries=True),
    ):
        yield hub
    assert not hub.unhandled, f"requests the fake Hub does not implement: {hub.unhandled}"
    assert not hub.server_errors, "the fake Hub crashed:\n" + "\n".join(hub.server_errors)
