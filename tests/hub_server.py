"""A local stand-in for the Hugging Face Hub, speaking the HTTP protocol huggingface_hub uses:
repo info, recursive tree listing, and file HEAD/GET (with ETag, X-Repo-Commit and Range resume).

Tests start it on 127.0.0.1 and point HF_ENDPOINT at it. It can gate a repo (401 + GatedRepo),
count requests, and cut a transfer after N bytes to test resumed downloads.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    gated_token: str | None = None  # when set, requests without this bearer token get 401

    @property
    def sha(self) -> str:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name])
        return h.hexdigest()


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (method, path, headers)
    cut_after: dict[str, int] = field(default_factory=dict)  # file path → bytes sent before dropping, once
    down_after_cut: set[str] = field(default_factory=set)  # files whose next request after a cut gets 503


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.close_connection = True

    def _json(self, obj, head: bool = False) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

    def _error(self, status: int, code: str, message: str, head: bool) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}, head)

    def _repo(self, repo_id: str, head: bool) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            self._error(401, "GatedRepo", "Access to model is restricted. You must be authenticated.", head)
            return None
        return repo

    def _route(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append((self.command, path, dict(self.headers)))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
            if repo := self._repo(m[1], head):
                self._json({"id": m[1], "modelId": m[1], "sha": repo.sha, "private": False,
                            "siblings": [{"rfilename": f} for f in sorted(repo.files)]}, head)
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            if repo := self._repo(m[1], head):
                self._json([{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                             **({"lfs": {"oid": _etag(d), "size": len(d), "pointerSize": 134}}
                                if f.endswith(".safetensors") else {})}
                            for f, d in sorted(repo.files.items())], head)
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            if repo := self._repo(m[1], head):
                self._file(repo, m[3], head)
        else:
            self._error(404, "EntryNotFound", f"no route for {path}", head)

    def _file(self, repo: Repo, name: str, head: bool) -> None:
        data = repo.files.get(name)
        if data is None:
            self._error(404, "EntryNotFound", f"{name} not found", head)
            return
        if not head and name in self.state.down_after_cut and name not in self.state.cut_after:
            self.state.down_after_cut.discard(name)  # the connection is gone for good: the pull fails
            self._error(503, "ServiceUnavailable", "Service Unavailable", head)
            return
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{_etag(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        if (rng := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
            start, status = int(m[1]), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        cut = self.state.cut_after.pop(name, None) if not head else None
        if cut is None:
            self._send(status, body, headers, head)
            return
        self.send_response(status)  # announce the whole body, send part of it, hang up
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True


class HubServer:
    def __init__(self) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], gated_token: str | None = None) -> None:
        self.state.repos[repo_id] = Repo(files, gated_token)

    def add_dir(self, repo_id: str, directory, extra: dict[str, bytes] | None = None, **kw) -> None:
        from pathlib import Path

        files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}
        self.add_repo(repo_id, files | (extra or {}), **kw)

    def interrupt(self, name: str, after: int) -> None:
        """The next download of `name` stops after `after` bytes, and the retry fails: a broken pull."""
        self.state.cut_after[name] = after
        self.state.down_after_cut.add(name)

    def file_gets(self, name: str) -> list[dict]:
        return [{k.lower(): v for k, v in h.items()} for m, p, h in self.state.requests
                if m == "GET" and p.endswith("/" + name)]
