"""A small Hugging Face Hub-compatible HTTP server for tests.

`HubServer` listens on 127.0.0.1 (port chosen by the OS) so that the real `huggingface_hub` client
(written against version 2.4.0) can create repos, upload and download files with no network access.
Only model repos are served, any token (or none) is accepted, and repos are never private in effect.

Endpoints, as the client calls them:

    POST /api/repos/create                          create_repo (409 with {"error", "url"} if it exists)
    POST /api/validate-yaml                         README.md metadata check made before an upload
    GET  /api/models/{repo_id}                      model_info / repo_info / repo_exists (at main)
    GET  /api/models/{repo_id}/revision/{rev}       the same at a branch or commit sha (snapshot_download)
    GET  /api/models/{repo_id}/tree/{rev}[/{path}]  list_repo_tree / list_repo_files / snapshot_download
    GET  /api/models/{repo_id}/refs                 list_repo_refs
    GET  /api/models/{repo_id}/commits/{rev}        list_repo_commits
    POST /api/models/{repo_id}/branch/{branch}      create_branch (409 if it exists)
    POST /api/models/{repo_id}/preupload/{rev}      upload modes: always "regular", so no LFS nor Xet upload
    POST /api/models/{repo_id}/commit/{rev}         NDJSON commit: header, file (base64), deletedFile/Folder
    HEAD /{repo_id}/resolve/{rev}/{path}            file metadata: ETag, X-Repo-Commit, Content-Length
    GET  /{repo_id}/resolve/{rev}/{path}            file content

A revision is a branch name or a full commit sha. 404s carry the `X-Error-Code` header the client maps to
exceptions: `RepoNotFound` (RepositoryNotFoundError), `RevisionNotFound` (RevisionNotFoundError) and
`EntryNotFound` (EntryNotFoundError). With `fail_uploads = True`, commits answer HTTP 403 (no write
access), which the client does not retry.

Storage lives in `root_dir`: file contents under `blobs/`, named by their git blob sha1 (the ETag and `oid`
the Hub reports for non-LFS files), and repos, branches and commits in `state.json`, so a new server on
the same directory serves the same repos. A new repo has one empty "initial commit" on `main`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_BRANCH = "main"


class Commit(TypedDict):
    parent: str | None
    files: dict[str, str]  # path in repo -> blob oid
    title: str
    message: str
    date: str


class Repo(TypedDict):
    private: bool
    createdAt: str
    branches: dict[str, str]  # branch name -> commit oid
    commits: dict[str, Commit]  # commit oid -> commit


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class HubError(Exception):
    """An error answered as JSON `{"error": message}`, with the `X-Error-Code` the client maps to an exception."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}

    def reply(self) -> Reply:
        # HTTP header values must be latin-1: escape what is not ASCII (e.g. a non-ASCII file name).
        headers = {"X-Error-Message": str(self).encode("ascii", "backslashreplace").decode(), **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _json({"error": str(self)}, self.status, headers)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


def _now() -> str:
    """The current time in the format the client parses: 2024-01-31T12:00:00.000Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def git_blob_oid(content: bytes) -> str:
    """Git's object id of a file: what the Hub reports as ETag and `oid` of a regular (non-LFS) file."""
    return _sha1(b"blob %d\0" % len(content) + content)


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("1", "true")


class HubStore:
    """Repos, branches, commits and file contents, persisted under `root_dir`. Not thread-safe by itself."""

    def __init__(self, root_dir: Path) -> None:
        self.blob_dir = root_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._state_file = root_dir / "state.json"
        self.repos: dict[str, Repo] = json.loads(self._state_file.read_text()) if self._state_file.exists() else {}

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return self.repos[repo_id]

    def resolve(self, repo_id: str, revision: str) -> tuple[Repo, str]:
        """The repo, and the oid of the commit that a branch name or commit sha designates."""
        repo = self.repo(repo_id)
        if revision in repo["branches"]:
            return repo, repo["branches"][revision]
        if revision in repo["commits"]:
            return repo, revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def files(self, repo_id: str, revision: str) -> tuple[str, dict[str, str]]:
        """The commit oid of `revision` and the files (path -> blob oid) of that commit."""
        repo, oid = self.resolve(repo_id, revision)
        return oid, repo["commits"][oid]["files"]

    def create_repo(self, repo_id: str, private: bool) -> None:
        commit = Commit(parent=None, files={}, title="initial commit", message="", date=_now())
        oid = _sha1(json.dumps(commit, sort_keys=True).encode())
        self.repos[repo_id] = Repo(
            private=private, createdAt=commit["date"], branches={DEFAULT_BRANCH: oid}, commits={oid: commit}
        )
        self._save()

    def create_branch(self, repo_id: str, branch: str, oid: str) -> None:
        self.repo(repo_id)["branches"][branch] = oid
        self._save()

    def add_commit(self, repo_id: str, branch: str, files: dict[str, str], title: str, message: str) -> str:
        """Record a commit with these files on top of `branch`, move the branch to it, return its oid."""
        repo = self.repo(repo_id)
        commit = Commit(parent=repo["branches"][branch], files=files, title=title, message=message, date=_now())
        oid = _sha1(json.dumps(commit, sort_keys=True).encode())
        repo["commits"][oid] = commit
        repo["branches"][branch] = oid
        self._save()
        return oid

    def put_blob(self, content: bytes) -> str:
        oid = git_blob_oid(content)
        (self.blob_dir / oid).write_bytes(content)
        return oid

    def read_blob(self, oid: str) -> bytes:
        return (self.blob_dir / oid).read_bytes()

    def blob_size(self, oid: str) -> int:
        return (self.blob_dir / oid).stat().st_size

    def _save(self) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.repos, indent=1))
        tmp.replace(self._state_file)


class _HTTPServer(ThreadingHTTPServer):
    def __init__(self, hub: HubServer) -> None:
        super().__init__(("127.0.0.1", hub.port), _Handler)
        self.hub = hub


class _Handler(BaseHTTPRequestHandler):
    """HTTP plumbing only: each request is answered by `HubServer.handle`."""

    server: _HTTPServer

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        reply = self.server.hub.handle(self.command, self.path, body)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the requests are in `HubServer.requests`."""


class HubServer:
    """A Hub-compatible server on 127.0.0.1, for the real `huggingface_hub` client.

    Use as `with HubServer(root_dir) as server: HfApi(endpoint=server.url)`, or call `start()` / `stop()`.
    Set `fail_uploads = True` to make every commit answer HTTP 403. `requests` lists "METHOD /path" of the
    requests received, in order.
    """

    def __init__(self, root_dir: str | Path, fail_uploads: bool = False, port: int = 0) -> None:
        self.store = HubStore(Path(root_dir))
        self.port = port  # 0: the OS picks one
        self.fail_uploads = fail_uploads
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The endpoint to give the client, e.g. "http://127.0.0.1:54321"."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        if self._httpd is None:
            self._httpd = _HTTPServer(self)
            # A short poll interval keeps stop() fast: shutdown() waits for the serving loop to poll.
            serve = self._httpd.serve_forever
            self._thread = threading.Thread(target=serve, kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None and self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def handle(self, method: str, raw_path: str, body: bytes) -> Reply:
        """Answer one request; requests are handled one at a time."""
        url = urlsplit(raw_path)
        # Split before unquoting: a revision or tree path comes quoted whole, "/" included (as %2F).
        segments = [unquote(segment) for segment in url.path.split("/")[1:]]
        query = {name: values[-1] for name, values in parse_qs(url.query).items()}
        with self._lock:
            self.requests.append(f"{method} {raw_path}")
            try:
                return self._route(method, segments, query, body)
            except HubError as error:
                return error.reply()
            except Exception as error:  # a bug here, or a request this server does not understand
                traceback.print_exc()
                return HubError(500, f"Test Hub server error: {error!r}").reply()

    def _route(self, method: str, segments: list[str], query: dict[str, str], body: bytes) -> Reply:
        match method, segments:
            case "POST", ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            case "POST", ["api", "validate-yaml"]:
                return _json({"errors": [], "warnings": []})
            case "GET", ["api", "models", owner, name]:
                return self._repo_info(f"{owner}/{name}", DEFAULT_BRANCH, _flag(query, "blobs"))
            case "GET", ["api", "models", owner, name, "revision", revision]:
                return self._repo_info(f"{owner}/{name}", revision, _flag(query, "blobs"))
            case "GET", ["api", "models", owner, name, "tree", revision, *folder]:
                return self._tree(f"{owner}/{name}", revision, "/".join(folder), _flag(query, "recursive"))
            case "GET", ["api", "models", owner, name, "refs"]:
                return self._refs(f"{owner}/{name}")
            case "GET", ["api", "models", owner, name, "commits", revision]:
                return self._commits(f"{owner}/{name}", revision)
            case "POST", ["api", "models", owner, name, "branch", branch]:
                return self._create_branch(f"{owner}/{name}", branch, json.loads(body or b"{}"))
            case "POST", ["api", "models", owner, name, "preupload", revision]:
                return self._preupload(f"{owner}/{name}", revision, json.loads(body))
            case "POST", ["api", "models", owner, name, "commit", revision]:
                return self._commit(f"{owner}/{name}", revision, body, query)
            case "GET" | "HEAD", [owner, name, "resolve", revision, *path] if path:
                return self._resolve(f"{owner}/{name}", revision, "/".join(path))
        raise HubError(404, f"Not implemented by the test Hub server: {method} /{'/'.join(segments)}")

    def _create_repo(self, payload: dict[str, Any]) -> Reply:
        if payload.get("type", "model") != "model":
            raise HubError(400, "The test Hub server only serves model repos")
        if not payload.get("organization"):
            raise HubError(400, "The test Hub server needs repo ids of the form 'namespace/name'")
        repo_id = f"{payload['organization']}/{payload['name']}"
        repo_url = f"{self.url}/{repo_id}"
        if repo_id in self.store.repos:
            return _json({"error": "You already created this model repo", "url": repo_url}, 409)
        self.store.create_repo(repo_id, private=payload.get("visibility") == "private")
        return _json({"url": repo_url, "name": repo_id, "id": repo_id})

    def _repo_info(self, repo_id: str, revision: str, with_blobs: bool) -> Reply:
        repo, oid = self.store.resolve(repo_id, revision)
        commit = repo["commits"][oid]
        siblings = [
            {"rfilename": path, **({"size": self.store.blob_size(blob), "blobId": blob} if with_blobs else {})}
            for path, blob in sorted(commit["files"].items())
        ]
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": oid,
            "lastModified": commit["date"],
            "createdAt": repo["createdAt"],
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        return _json(info)

    def _tree(self, repo_id: str, revision: str, folder: str, recursive: bool) -> Reply:
        """Files and folders under `folder`: its direct children, or all its descendants if `recursive`."""
        _, files = self.store.files(repo_id, revision)
        prefix = f"{folder}/" if folder else ""
        below = sorted(path for path in files if path.startswith(prefix))
        if folder and not below:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path in below:
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                subfolder = prefix + "/".join(parts[:depth])
                tree_oid = _sha1(json.dumps({p: files[p] for p in below if p.startswith(subfolder + "/")}).encode())
                entries.setdefault(subfolder, {"type": "directory", "oid": tree_oid, "size": 0, "path": subfolder})
            if recursive or len(parts) == 1:
                blob = files[path]
                entries[path] = {"type": "file", "oid": blob, "size": self.store.blob_size(blob), "path": path}
        return _json(list(entries.values()))

    def _refs(self, repo_id: str) -> Reply:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in self.store.repo(repo_id)["branches"].items()
        ]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, repo_id: str, revision: str) -> Reply:
        """The commits reachable from `revision`, newest first."""
        repo, oid = self.store.resolve(repo_id, revision)
        history: list[dict[str, Any]] = []
        commit_oid: str | None = oid
        while commit_oid is not None:
            commit = repo["commits"][commit_oid]
            history.append(
                {
                    "id": commit_oid,
                    "title": commit["title"],
                    "message": commit["message"],
                    "authors": [],
                    "date": commit["date"],
                }
            )
            commit_oid = commit["parent"]
        return _json(history)

    def _create_branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> Reply:
        repo, oid = self.store.resolve(repo_id, payload.get("startingPoint", DEFAULT_BRANCH))
        if branch in repo["branches"]:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        self.store.create_branch(repo_id, branch, oid)
        return _json({})

    def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> Reply:
        """Every file is to be sent inline ("regular"); the current `oid` lets the client skip unchanged files."""
        _, files = self.store.files(repo_id, revision)
        modes = [
            {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(file["path"])}
            for file in payload["files"]
        ]
        return _json({"files": modes})

    def _commit(self, repo_id: str, branch: str, body: bytes, query: dict[str, str]) -> Reply:
        if self.fail_uploads:
            raise HubError(403, "You don't have the rights to write to this repo (HubServer.fail_uploads is set)")
        if _flag(query, "create_pr"):
            raise HubError(400, "The test Hub server does not support pull requests")
        repo, head = self.store.resolve(repo_id, branch)
        if branch not in repo["branches"]:
            raise HubError(400, f"Commits can only be pushed to a branch, not to {branch}")
        header, *operations = [json.loads(line) for line in body.splitlines() if line.strip()]
        if header["key"] != "header":
            raise HubError(400, "The first line of a commit must be its header")
        parent = header["value"].get("parentCommit")
        if parent is not None and not head.startswith(parent.lower()):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = _apply_operations(self.store, dict(repo["commits"][head]["files"]), operations)
        title, message = header["value"]["summary"], header["value"].get("description", "")
        oid = self.store.add_commit(repo_id, branch, files, title, message)
        return _json({"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"})

    def _resolve(self, repo_id: str, revision: str, path: str) -> Reply:
        oid, files = self.store.files(repo_id, revision)
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
        blob = files[path]
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{blob}"', "X-Repo-Commit": oid}
        return Reply(200, self.store.read_blob(blob), headers)


def _apply_operations(store: HubStore, files: dict[str, str], operations: list[dict[str, Any]]) -> dict[str, str]:
    """Apply the commit lines after the header to `files` (path -> blob oid) and return them."""
    for operation in operations:
        key, path = operation["key"], operation["value"]["path"]
        if key == "file":
            files[path] = store.put_blob(base64.b64decode(operation["value"]["content"]))
        elif key == "deletedFile":
            if path not in files:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del files[path]
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            files = {name: blob for name, blob in files.items() if not name.startswith(prefix)}
        else:
            raise HubError(400, f"Unsupported commit operation {key!r}: only regular files are accepted")
    return files
