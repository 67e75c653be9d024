"""A local stand-in for the Hugging Face Hub HTTP API, driven by the real `huggingface_hub` client in tests.

Model repos only, all state in memory. Every file is committed as a regular (non-LFS, non-Xet) blob: preupload
answers "regular" for every path and no response ever carries X-Xet-* headers, so the client never reaches the
Xet/LFS upload or download paths. Files a real Hub keeps in LFS still report their sha256 the way the Hub does
(`lfs` in tree/paths-info/siblings, X-Linked-Etag / X-Linked-Size on /resolve).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = frozenset(
    ".7z .arrow .bin .bz2 .ckpt .gguf .gz .h5 .jpeg .jpg .joblib .model .msgpack .npy .npz .onnx .ot .parquet "
    ".pb .pickle .pkl .png .pt .pth .safetensors .tar .tflite .tgz .wasm .xz .zip .zst".split()
)
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in sorted(LFS_SUFFIXES)
)
SHA_RE = re.compile(r"[0-9a-f]{40}")
RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
SAFE_SCAN = {"status": "safe", "avScan": {"virusFound": False}, "pickleImportScan": None}

Response = tuple[int, dict[str, str], bytes]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding `data`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, data: bytes) -> bool:
    """Whether the Hub's default .gitattributes (or its size limit) would put this file in LFS."""
    return PurePosixPath(path).suffix.lower() in LFS_SUFFIXES or len(data) > LFS_MIN_SIZE


def lfs_info(data: bytes) -> dict[str, Any]:
    """sha256, size and pointer-file size of an LFS file, as the Hub reports them."""
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
    return {"oid": sha256, "size": len(data), "pointerSize": len(pointer)}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true")


class HubError(Exception):
    """An error answered the way the Hub answers it: status, X-Error-Message and optional X-Error-Code."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None, **body: Any
    ) -> None:
        super().__init__(f"{status} {code or ''} {message}".strip())
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


@dataclass
class Commit:
    sha: str
    parent: str | None
    tree: dict[str, bytes]
    title: str
    description: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    user: tuple[str, str] | None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from None


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, hands it to the HubServer, writes its answer (no body for HEAD)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        status, headers, payload = self.server.hub._dispatch(self.command, self.path, dict(self.headers), body)
        self.send_response(status)
        for name, value in {"Content-Length": str(len(payload)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"
SEG = r"[^/]+"


def _fine_grained_writes(role: str) -> list[str]:
    return [name for name in role.partition(":")[2].split(",") if name]


def _access_token_role(role: str) -> dict[str, Any]:
    """whoami-v2's description of a token's permissions."""
    if not role.startswith("fineGrained"):
        return {"role": role}
    scoped = [{"entity": {"type": "user", "name": name}, "permissions": ["repo.content.read", "repo.write"]}
              for name in _fine_grained_writes(role)]
    return {"role": "fineGrained", "fineGrained": {"canReadGatedRepos": False, "global": [], "scoped": scoped}}


class HubServer:
    """In-memory Hub: repos with commits, branches and tags, served over HTTP on 127.0.0.1 on a free port.

    tokens: token -> (user, "write" | "read" | "fineGrained:ns1,ns2"), the last a fine-grained token with
    repo.write on those namespaces only; orgs: user -> org namespaces the user belongs to.
    gitattributes: like the Hub, give every new repo an initial commit with a .gitattributes file.
    """

    def __init__(
        self,
        tokens: dict[str, tuple[str, str]] | None = None,
        orgs: dict[str, list[str]] | None = None,
        *,
        gitattributes: bool = True,
    ) -> None:
        self.tokens = dict(tokens or {})
        self.orgs = {user: list(names) for user, names in (orgs or {}).items()}
        self.gitattributes = gitattributes
        self.url = ""
        self.requests: list[tuple[str, str, int]] = []
        self.seen_headers: list[dict[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.server_errors: list[str] = []
        # Called as after_commit(repo_id, sha, title) once a client's commit landed (tests use it to
        # commit something in between, as a concurrent writer would).
        self.after_commit: Callable[[str, str, str], None] | None = None
        self._repos: dict[str, Repo] = {}
        self._failures: list[list[Any]] = []
        self._counter = itertools.count()
        self._lock = threading.RLock()
        self._httpd: _Server | None = None
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Response]]] = [
            (method, re.compile(pattern), handler)
            for method, pattern, handler in [
                ("GET", r"/api/whoami-v2", self._whoami),
                ("POST", r"/api/repos/create", self._create_repo),
                ("POST", r"/api/repos/delete", self._delete_repo),
                ("POST", r"/api/validate-yaml", lambda req: self._json({"errors": [], "warnings": []})),
                ("GET", REPO, self._model_info),
                ("GET", rf"{REPO}/revision/(?P<rev>{SEG})", self._model_info),
                ("GET", rf"{REPO}/refs", self._refs),
                ("GET", rf"{REPO}/commits/(?P<rev>{SEG})", self._commits),
                ("GET", rf"{REPO}/tree/(?P<rev>{SEG})(?:/(?P<path>.*))?", self._tree),
                ("POST", rf"{REPO}/paths-info/(?P<rev>{SEG})", self._paths_info),
                ("POST", rf"{REPO}/preupload/(?P<rev>{SEG})", self._preupload),
                ("POST", rf"{REPO}/commit/(?P<rev>{SEG})", self._commit),
                ("POST", rf"{REPO}/branch/(?P<branch>{SEG})", self._create_branch),
                ("DELETE", rf"{REPO}/branch/(?P<branch>{SEG})", self._delete_branch),
                ("POST", rf"{REPO}/tag/(?P<rev>{SEG})", self._create_tag),
                ("DELETE", rf"{REPO}/tag/(?P<tag>{SEG})", self._delete_tag),
                ("GET", rf"/(?P<repo>{SEG}/{SEG})/resolve/(?P<rev>{SEG})/(?P<path>.+)", self._resolve_file),
                ("HEAD", rf"/(?P<repo>{SEG}/{SEG})/resolve/(?P<rev>{SEG})/(?P<path>.+)", self._resolve_file),
            ]
        ]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        """Bind 127.0.0.1 on a free port and serve from a daemon thread."""
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ direct state setup

    def exists(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def create_repo(self, repo_id: str, private: bool = False) -> None:
        """Create an empty repo (main holds the initial .gitattributes commit, as on the Hub)."""
        with self._lock:
            if repo_id in self._repos:
                raise HubError(409, f"{repo_id} already exists")
            repo = self._repos[repo_id] = Repo(repo_id, private, _now())
            tree = {".gitattributes": GITATTRIBUTES} if self.gitattributes else {}
            repo.branches["main"] = self._new_commit(repo, None, tree, "initial commit", "", repo_id.split("/")[0])

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        branch: str = "main",
        message: str = "commit",
        delete: Iterable[str] = (),
    ) -> str:
        """Commit files (a directory Path adds its files under that key) and deletions to a branch; returns the sha."""
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            parent = repo.branches.get(branch, repo.branches["main"])
            tree = dict(repo.commits[parent].tree)
            for path in delete:
                tree.pop(path, None)
            for key, value in files.items():
                if isinstance(value, Path) and value.is_dir():
                    prefix = f"{key.strip('/')}/" if key.strip("/") else ""
                    for file in sorted(p for p in value.rglob("*") if p.is_file()):
                        tree[prefix + file.relative_to(value).as_posix()] = file.read_bytes()
                else:
                    tree[key] = value.read_bytes() if isinstance(value, Path) else bytes(value)
            sha = self._new_commit(repo, parent, tree, message, "", repo_id.split("/")[0])
            repo.branches[branch] = sha
            return sha

    def create_branch(self, repo_id: str, branch: str, revision: str = "main") -> str:
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            repo.branches[branch] = self._resolve(repo, revision)
            return repo.branches[branch]

    def create_tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            repo.tags[tag] = self._resolve(repo, revision)
            return repo.tags[tag]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            return dict(repo.commits[self._resolve(repo, revision)].tree)

    def head(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            return self._resolve(self._repo_or_raise(repo_id), revision)

    def history(self, repo_id: str, revision: str = "main") -> list[tuple[str, str]]:
        """(sha, title) of the commits on a branch, oldest first."""
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            sha, commits = self._resolve(repo, revision), []
            while sha is not None:
                commits.append((sha, repo.commits[sha].title))
                sha = repo.commits[sha].parent
            return commits[::-1]

    def titles(self, repo_id: str, revision: str = "main") -> list[str]:
        """The titles of the commits on a branch, oldest first."""
        return [title for _, title in self.history(repo_id, revision)]

    def fail_next(self, method: str, path_prefix: str, status: int, times: int = 1, landed: bool = False) -> None:
        """Answer the next `times` requests of `method` whose path starts with `path_prefix` with `status`;
        `landed`: carry the request out first (a commit made, whose answer a proxy lost)."""
        with self._lock:
            self._failures.append([method.upper(), path_prefix, status, times, landed])

    def clear_failures(self) -> None:
        """Forget the failures fail_next set up and no request used."""
        with self._lock:
            self._failures.clear()

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> Response:
        parts = urlsplit(raw_path)
        lowered = {name.lower(): value for name, value in headers.items()}
        with self._lock:
            try:
                response = self._route(method, parts.path, parse_qs(parts.query), lowered, body)
            except HubError as error:
                response = self._error(error)
            except Exception as error:  # a bug in this fixture: surface it to the client and to the test
                self.server_errors.append(f"{method} {parts.path}: {error!r}")
                response = self._error(HubError(500, f"HubServer internal error: {error!r}"))
            self.requests.append((method, parts.path, response[0]))
            self.seen_headers.append(lowered)
        return response

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> Response:
        landed = None
        for failure in self._failures:
            if failure[0] == method and path.startswith(failure[1]) and failure[3] > 0:
                failure[3] -= 1
                if not failure[4]:
                    raise HubError(failure[2], "Injected failure (HubServer.fail_next)")
                landed = failure[2]
                break
        request = Request(method, path, query, headers, body, self._authenticate(headers))
        for route_method, pattern, handler in self._routes:
            if route_method == method and (match := pattern.fullmatch(path)):
                groups = {name: unquote(value) for name, value in match.groupdict().items() if value is not None}
                response = handler(request, **groups)
                if landed is not None:
                    raise HubError(landed, "Injected failure after the request was carried out (HubServer.fail_next)")
                return response
        self.unhandled.append((method, path))
        raise HubError(404, f"HubServer has no route for {method} {path}")

    def _authenticate(self, headers: dict[str, str]) -> tuple[str, str] | None:
        auth = headers.get("authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()

    def _error(self, error: HubError) -> Response:
        headers = {"X-Error-Message": error.message.encode("ascii", "backslashreplace").decode(), **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        return self._json({"error": error.message, **error.body}, error.status, headers)

    def _new_commit(
        self, repo: Repo, parent: str | None, tree: dict[str, bytes], title: str, description: str, author: str
    ) -> str:
        digest = hashlib.sha1(f"{parent}\n{title}\n{next(self._counter)}\n".encode())
        for path in sorted(tree):
            digest.update(f"{path}\0{git_blob_sha1(tree[path])}\n".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = Commit(sha, parent, tree, title, description, author, _now())
        return sha

    def _repo_or_raise(self, repo_id: str) -> Repo:
        if repo_id not in self._repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self._repos[repo_id]

    def _member(self, user: str, namespace: str) -> bool:
        return user == namespace or namespace in self.orgs.get(user, [])

    def _require_write(self, req: Request, namespace: str) -> None:
        if req.user is None:
            raise HubError(401, "You must be authenticated to access this resource (no token sent)")
        user, role = req.user
        if role.startswith("fineGrained"):
            if namespace not in _fine_grained_writes(role):
                raise HubError(403, f"This fine-grained token has no repo.write permission on '{namespace}'")
        elif role != "write":
            raise HubError(403, f"This operation needs a write token; the token of '{user}' is read-only")
        if not self._member(user, namespace):
            raise HubError(403, f"You don't have the rights to write to namespace '{namespace}'")

    def _repo(self, req: Request, repo_id: str, write: bool = False) -> Repo:
        """The repo if the caller may see it (401/404 RepoNotFound otherwise), checking write rights when asked."""
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not (req.user and self._member(req.user[0], repo_id.split("/")[0]))):
            raise HubError(401 if req.user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            self._require_write(req, repo_id.split("/")[0])
        return repo

    def _resolve(self, repo: Repo, revision: str) -> str:
        """Commit sha of a branch, tag, refs/heads|tags/ name or full commit sha (404 RevisionNotFound else)."""
        name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        if name in repo.branches:
            return repo.branches[name]
        if name in repo.tags:
            return repo.tags[name]
        if SHA_RE.fullmatch(revision) and revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _last_commit(self, repo: Repo, sha: str, path: str) -> Commit:
        """The newest commit, from `sha` back, that changed anything at or under `path`."""

        def subtree(commit: Commit) -> dict[str, bytes]:
            return {p: d for p, d in commit.tree.items() if not path or p == path or p.startswith(path + "/")}

        commit = repo.commits[sha]
        while commit.parent and subtree(repo.commits[commit.parent]) == subtree(commit):
            commit = repo.commits[commit.parent]
        return commit

    def _entry(self, repo: Repo, sha: str, path: str, expand: bool) -> dict[str, Any]:
        """A tree / paths-info entry for a file or a directory of the commit `sha`."""
        tree = repo.commits[sha].tree
        if path in tree:
            data = tree[path]
            entry: dict[str, Any] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if is_lfs(path, data):
                entry["lfs"] = lfs_info(data)
        else:
            listing = "".join(f"{p}\0{git_blob_sha1(d)}\n" for p, d in sorted(tree.items()) if p.startswith(path + "/"))
            entry = {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            last = self._last_commit(repo, sha, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
            if entry["type"] == "file":
                entry["securityFileStatus"] = SAFE_SCAN
        return entry

    @staticmethod
    def _directories(tree: Iterable[str]) -> set[str]:
        return {str(parent) for path in tree for parent in PurePosixPath(path).parents if str(parent) != "."}

    # ------------------------------------------------------------------ routes

    def _whoami(self, req: Request) -> Response:
        if req.user is None:
            raise HubError(401, "Invalid username or password.")
        user, role = req.user
        return self._json({
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user, "fullname": user.title(),
            "email": f"{user}@example.com", "emailVerified": True, "isPro": False, "canPay": False,
            "orgs": [
                {"type": "org", "name": org, "fullname": org.title(), "roleInOrg": "write"}
                for org in self.orgs.get(user, [])
            ],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": f"{user}-{role}", "createdAt": _now(), **_access_token_role(role)},
            },
        })  # fmt: skip

    def _create_repo(self, req: Request) -> Response:
        payload = req.json()
        if payload.get("type", "model") != "model":
            raise HubError(400, "HubServer only hosts model repos")
        if req.user is None:
            raise HubError(401, "You must be authenticated to create a repo (no token sent)")
        namespace = payload.get("organization") or req.user[0]
        repo_id = f"{namespace}/{payload['name']}"
        self._require_write(req, namespace)
        url = f"{self.url}/{repo_id}"
        if repo_id in self._repos:
            raise HubError(409, "You already created this model repo", url=url)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.create_repo(repo_id, private=private)
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, req: Request) -> Response:
        payload = req.json()
        namespace = payload.get("organization") or (req.user[0] if req.user else "")
        repo_id = f"{namespace}/{payload['name']}"
        self._repo(req, repo_id, write=True)
        del self._repos[repo_id]
        return self._json({})

    def _model_info(self, req: Request, repo: str, rev: str = "main") -> Response:
        model = self._repo(req, repo)
        sha = self._resolve(model, rev)
        commit = model.commits[sha]
        blobs = _truthy(req.query.get("blobs"))
        siblings = []
        for path, data in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(data), blobId=git_blob_sha1(data))
                if is_lfs(path, data):
                    info = lfs_info(data)
                    sibling["lfs"] = {"size": info["size"], "sha256": info["oid"], "pointerSize": info["pointerSize"]}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
            "author": repo.split("/")[0],
            "sha": sha, "lastModified": commit.date, "createdAt": model.created, "private": model.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "spaces": [], "usedStorage": sum(len(data) for data in commit.tree.values()),
        }  # fmt: skip
        expand = req.query.get("expand", []) + req.query.get("expand[]", [])
        if expand:
            info = {key: value for key, value in info.items() if key in ("_id", "id", *expand)}
        return self._json(info)

    def _refs(self, req: Request, repo: str) -> Response:
        model = self._repo(req, repo)

        def refs(table: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(table.items())]

        branches, tags = refs(model.branches, "heads"), refs(model.tags, "tags")
        return self._json({"branches": branches, "tags": tags, "converts": [], "pullRequests": []})

    def _commits(self, req: Request, repo: str, rev: str) -> Response:
        model = self._repo(req, repo)
        history, sha = [], self._resolve(model, rev)
        while sha is not None:
            commit = model.commits[sha]
            message = f"{commit.title}\n\n{commit.description}".strip()
            history.append({"id": sha, "title": commit.title, "message": message, "date": commit.date})
            history[-1]["authors"] = [{"user": commit.author}]
            sha = commit.parent
        return self._json(history)

    def _tree(self, req: Request, repo: str, rev: str, path: str = "") -> Response:
        model = self._repo(req, repo)
        sha = self._resolve(model, rev)
        tree, path = model.commits[sha].tree, path.strip("/")
        directories = self._directories(tree)
        if path and path not in directories:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": sha})
        prefix, recursive = f"{path}/" if path else "", _truthy(req.query.get("recursive"))
        expand = _truthy(req.query.get("expand"))
        paths = sorted(
            p for p in [*directories, *tree] if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])
        )
        return self._json([self._entry(model, sha, p, expand) for p in paths])

    def _paths_info(self, req: Request, repo: str, rev: str) -> Response:
        model = self._repo(req, repo)
        sha = self._resolve(model, rev)
        form = parse_qs(req.body.decode())
        known = {*model.commits[sha].tree, *self._directories(model.commits[sha].tree)}
        paths = [p.strip("/") for p in form.get("paths", [])]
        return self._json([self._entry(model, sha, p, _truthy(form.get("expand"))) for p in paths if p in known])

    def _preupload(self, req: Request, repo: str, rev: str) -> Response:
        model = self._repo(req, repo, write=True)
        sha = self._resolve(model, rev)
        tree = model.commits[sha].tree
        files = []
        for file in req.json().get("files", []):
            answer: dict[str, Any] = {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False}
            if file["path"] in tree:
                answer["oid"] = git_blob_sha1(tree[file["path"]])
            files.append(answer)
        return self._json({"files": files, "commitOid": sha})

    def _commit(self, req: Request, repo: str, rev: str) -> Response:
        model = self._repo(req, repo, write=True)
        if _truthy(req.query.get("create_pr")):
            raise HubError(400, "HubServer does not support pull requests (create_pr)")
        if rev not in model.branches:
            self._resolve(model, rev)
            raise HubError(400, f"Can only commit to a branch, not to {rev}")
        head = model.branches[rev]
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and not head.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(model.commits[head].tree)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                content = value["content"]
                base64_encoded = value.get("encoding") == "base64"
                tree[value["path"]] = base64.b64decode(content) if base64_encoded else content.encode()
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].strip("/") + "/"
                doomed = [p for p in tree if p.startswith(folder)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {value['path']}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            elif key == "lfsFile":
                path = value.get("path")
                raise HubError(400, f"lfsFile {path!r} is not supported: HubServer's preupload only answers 'regular'")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        author = req.user[0] if req.user else "anonymous"
        sha = self._new_commit(model, head, tree, header.get("summary", ""), header.get("description", ""), author)
        model.branches[rev] = sha
        if self.after_commit is not None:
            self.after_commit(repo, sha, header.get("summary", ""))
        url = f"{self.url}/{repo}/commit/{sha}"
        return self._json({"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _create_branch(self, req: Request, repo: str, branch: str) -> Response:
        model = self._repo(req, repo, write=True)
        start = self._resolve(model, req.json().get("startingPoint") or "main")
        if branch in model.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        model.branches[branch] = start
        return self._json({})

    def _delete_branch(self, req: Request, repo: str, branch: str) -> Response:
        model = self._repo(req, repo, write=True)
        if branch not in model.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        del model.branches[branch]
        return self._json({})

    def _create_tag(self, req: Request, repo: str, rev: str) -> Response:
        model = self._repo(req, repo, write=True)
        sha, tag = self._resolve(model, rev), req.json().get("tag", "")
        if tag in model.tags:
            raise HubError(409, f"Reference refs/tags/{tag} already exists")
        model.tags[tag] = sha
        return self._json({})

    def _delete_tag(self, req: Request, repo: str, tag: str) -> Response:
        model = self._repo(req, repo, write=True)
        if model.tags.pop(tag, None) is None:
            raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        return self._json({})

    def _resolve_file(self, req: Request, repo: str, rev: str, path: str) -> Response:
        model = self._repo(req, repo)
        sha = self._resolve(model, rev)
        data = model.commits[sha].tree.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if is_lfs(path, data):
            sha256 = lfs_info(data)["oid"]
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
        match = RANGE_RE.fullmatch(req.headers.get("range", "").replace(" ", ""))
        if req.method == "GET" and match and any(match.groups()):
            first, last = match.groups()
            start = int(first) if first else max(len(data) - int(last), 0)
            end = min(int(last), len(data) - 1) if first and last else len(data) - 1
            if start >= len(data) or start > end:
                unsatisfiable = {"Content-Range": f"bytes */{len(data)}"}
                raise HubError(416, "Requested range not satisfiable", headers=unsatisfiable)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, headers, data[start : end + 1]
        return 200, headers, data
