"""A local stand-in for the Hugging Face Hub, speaking the HTTP protocol huggingface_hub 2.x uses.

Two listeners on 127.0.0.1: the Hub itself (point HF_ENDPOINT at `url`) and a "CDN" on another port,
as on the real Hub, where `/resolve/` of an LFS file answers 302 to a storage host with the file's
sha256 and size in X-Linked-Etag / X-Linked-Size, and huggingface_hub fetches the bytes there without
the Authorization header. Routes:

- GET /api/models/{repo}[/revision/{rev}][?blobs=True] repo info: sha, gated, siblings (+ sizes, lfs)
- GET /api/models/{repo}/tree/{rev}[?recursive=True]   tree listing (files with oid/size/lfs, folders)
- HEAD|GET /{repo}/resolve/{rev}/{file}                 X-Repo-Commit, ETag; LFS files redirect to the CDN
- GET {cdn}/blobs/{sha256}/{file}                       the bytes, with Range (206) for resumed downloads

No Xet headers are sent, so huggingface_hub uses plain HTTP even with hf_xet installed. Errors carry
the X-Error-Code header that huggingface_hub turns into typed exceptions (GatedRepo, RepoNotFound...).
Test hooks: gate a repo, log every request, cut a transfer after N bytes, fail the retry after a cut.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.model")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    gated_token: str | None = None  # a gated repo: only this bearer token has accepted the licence

    def __post_init__(self) -> None:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name])
        self.sha = h.hexdigest()

    @staticmethod
    def is_lfs(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)

    def lfs(self, name: str) -> dict | None:
        data = self.files[name]
        if not self.is_lfs(name):
            return None
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    host: str  # "hub" or "cdn"

    @property
    def file(self) -> str | None:
        """The repo file a /resolve/ or CDN request is about."""
        m = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", self.path) or re.fullmatch(r"/blobs/[0-9a-f]+/(.+)", self.path)
        return m[1] if m else None


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)  # file → bytes sent before hanging up (once)
    fail_after_cut: set[str] = field(default_factory=set)  # files whose next GET after a cut gets 503
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState
    host: str
    cdn_url: str

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # -- responses

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self.wfile.flush()
        self.close_connection = True

    def _json(self, obj, head: bool) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

    def _error(self, status: int, code: str, message: str, head: bool, headers: dict | None = None) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json",
                    **(headers or {})}, head)

    # -- routing

    def _route(self, head: bool) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        request = Request(self.command, path, parse_qs(url.query), {k.lower(): v for k, v in self.headers.items()},
                          self.host)
        with self.state.lock:
            self.state.requests.append(request)
        if self.host == "cdn":
            if m := re.fullmatch(r"/blobs/([0-9a-f]{64})/(.+)", path):
                self._cdn(m[1], m[2], head)
            else:
                self._send(404, b"not found", head=head)
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            if (repo := self._repo(m[1], head)) and self._revision(repo, m[2] or "main", head):
                self._json(self._info(m[1], repo, blobs="blobs" in request.query), head)
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            if (repo := self._repo(m[1], head)) and self._revision(repo, m[2], head):
                recursive = request.query.get("recursive", ["False"])[0].lower() == "true"
                self._json(self._tree(repo, m[3] or "", recursive), head)
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            if (repo := self._repo(m[1], head)) and self._revision(repo, m[2], head):
                self._resolve(repo, m[3], head)
        else:
            self._error(404, "EntryNotFound", f"no route for {path}", head)

    def _repo(self, repo_id: str, head: bool) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:  # the real Hub answers 401 for unknown (or private) repos to anonymous users
            self._error(401, "RepoNotFound", "Repository not found", head)
        return repo

    def _revision(self, repo: Repo, revision: str, head: bool) -> bool:
        if revision in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return False

    def _info(self, repo_id: str, repo: Repo, blobs: bool) -> dict:
        siblings = []
        for name in sorted(repo.files):
            sibling = {"rfilename": name}
            if blobs:
                sibling |= {"size": len(repo.files[name]), "blobId": git_blob_sha1(repo.files[name])}
                if lfs := repo.lfs(name):
                    sibling["lfs"] = lfs
            siblings.append(sibling)
        return {"_id": repo.sha[:24], "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                "gated": "manual" if repo.gated_token else False, "disabled": False, "siblings": siblings}

    def _tree(self, repo: Repo, under: str, recursive: bool) -> list[dict]:
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        entries, folders = [], set()
        for name in sorted(repo.files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                folders.add(prefix + "/".join(parts[:i]))
            if len(parts) > 1 and not recursive:
                continue
            data = repo.files[name]
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
            if lfs := repo.lfs(name):
                entry["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            entries.append(entry)
        if not recursive:
            folders = {f for f in folders if "/" not in f[len(prefix):]}
        return [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                for f in sorted(folders)] + entries

    def _resolve(self, repo: Repo, name: str, head: bool) -> None:
        data = repo.files.get(name)
        if data is None:
            self._error(404, "EntryNotFound", f"{name} does not exist", head, {"X-Repo-Commit": repo.sha})
            return
        if repo.gated_token:  # metadata is public on the Hub; file contents need an accepted licence
            auth = self.headers.get("Authorization")
            if auth is None:
                self._error(401, "GatedRepo", "Access to this model is restricted. You must be authenticated.", head)
                return
            if auth != f"Bearer {repo.gated_token}":
                self._error(403, "GatedRepo", "Access to this model is restricted and you are not in the authorized list.",
                            head)
                return
        if lfs := repo.lfs(name):
            location = f"{self.cdn_url}/blobs/{lfs['sha256']}/{quote(name)}"
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{lfs['sha256']}\nsize {len(data)}\n"
            self._send(302, b"", {"Location": location, "X-Repo-Commit": repo.sha,
                                  "ETag": f'"{git_blob_sha1(pointer.encode())}"',
                                  "X-Linked-Etag": f'"{lfs["sha256"]}"', "X-Linked-Size": str(len(data))}, head)
            return
        self._body(name, data, {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_sha1(data)}"'}, head)

    def _cdn(self, sha256: str, name: str, head: bool) -> None:
        for repo in self.state.repos.values():
            data = repo.files.get(name)
            if data is not None and hashlib.sha256(data).hexdigest() == sha256:
                self._body(name, data, {"ETag": f'"{sha256}"'}, head)
                return
        self._send(404, b"no such blob", head=head)

    def _body(self, name: str, data: bytes, headers: dict, head: bool) -> None:
        """The file's bytes, honouring Range, or a transfer cut short when a test asked for one."""
        with self.state.lock:
            cut = None if head else self.state.cut_after.pop(name, None)
            fail = not head and cut is None and name in self.state.fail_after_cut
            if fail:
                self.state.fail_after_cut.discard(name)
        if fail:
            self._error(503, "ServiceUnavailable", "Service Unavailable", head)
            return
        headers = headers | {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        if (rng := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
            start = int(m[1])
            end = min(int(m[2]), len(data) - 1) if m[2] else len(data) - 1
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[: end + 1]
        body = data[start:]
        if cut is None:
            self._send(status, body, headers, head)
        else:  # announce the whole body, send part of it, hang up
            self._send(status, body[:cut], headers, head, length=len(body))


class HubServer:
    """`with HubServer() as hub:` serves `hub.add_repo(...)` repos at `hub.url` until the block ends."""

    def __init__(self) -> None:
        self.state = HubState()
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), type("CdnHandler", (_Handler,), {"state": self.state,
                                                                                           "host": "cdn"}))
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), type("HubHandler", (_Handler,), {
            "state": self.state, "host": "hub", "cdn_url": self.cdn_url}))
        self.url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in (self._hub, self._cdn)]

    def __enter__(self) -> "HubServer":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for s in (self._hub, self._cdn):
            s.shutdown()
            s.server_close()

    # -- content

    def add_repo(self, repo_id: str, files: dict[str, bytes], gated_token: str | None = None) -> Repo:
        self.state.repos[repo_id] = repo = Repo(dict(files), gated_token)
        return repo

    def add_dir(self, repo_id: str, directory: str | Path, extra: dict[str, bytes] | None = None, **kw) -> Repo:
        directory = Path(directory)
        files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
        return self.add_repo(repo_id, files | (extra or {}), **kw)

    # -- faults

    def cut(self, name: str, after: int) -> None:
        """The next GET of `name` sends `after` bytes and hangs up (a dropped connection)."""
        self.state.cut_after[name] = after

    def interrupt(self, name: str, after: int) -> None:
        """The next GET of `name` stops after `after` bytes and the retry gets 503: a pull that fails midway."""
        self.cut(name, after)
        self.state.fail_after_cut.add(name)

    # -- what was asked

    @property
    def requests(self) -> list[Request]:
        with self.state.lock:
            return list(self.state.requests)

    def clear(self) -> None:
        with self.state.lock:
            self.state.requests.clear()

    def file_gets(self, name: str | None = None) -> list[Request]:
        """GETs that transfer file contents (from the Hub or the CDN), of `name` or of any file."""
        return [r for r in self.requests if r.method == "GET" and r.file is not None
                and (name is None or r.file == name)
                and not (r.host == "hub" and Repo.is_lfs(r.file))]  # an LFS /resolve/ GET is only a redirect

    def files_requested(self) -> list[Request]:
        """Every request about a file's contents or metadata (HEAD and GET, Hub and CDN)."""
        return [r for r in self.requests if r.file is not None]
