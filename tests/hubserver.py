"""A stand-in for the Hugging Face Hub on 127.0.0.1: the parts of its HTTP API that huggingface_hub calls.

Two servers share one state: the Hub itself (model info, tree listing, ``resolve``) and a "CDN" on
another port, where ``resolve`` redirects LFS files as the real Hub redirects to its CDN. Being
another origin, the CDN receives no Authorization header (huggingface_hub and httpx drop it), and
tests can check that.

Served, as huggingface_hub 2.x reads them:
- ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=True`` adds sizes, blob ids and LFS sha256s)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag``; for LFS files a 302 to the
  CDN with ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; errors with ``X-Error-Code``
  (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as the Hub sends them
- ``HEAD|GET /lfs/{sha256}`` on the CDN, with ``Range``

For tests: bytes sent per file, a log of requests, a connection dropped after N bytes, a corrupted
body, gated repos that want one of ``tokens``.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 64 << 10
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Entry:
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def blob_id(self) -> str:
        """The git object id: of the LFS pointer for LFS files, of the content otherwise."""
        body = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, Entry]
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # the URL path
    file: str | None  # "org/repo/path" of the file served, if any
    range: str | None
    auth: bool
    status: int = 0


class FakeHub:
    """Start with ``with FakeHub() as hub:`` (or start()/close()); add repos with ``add_repo``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.tokens: set[str] = {"hf_granted"}  # tokens with access to gated repos
        self.sent: Counter[str] = Counter()  # "org/repo/path" -> body bytes sent
        self.requests: list[Request] = []
        self._drops: dict[str, list[int]] = {}
        self._corrupt: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # ---- setup ----------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: Mapping[str, bytes | Path], *, gated: bool = False,
                 branches: tuple[str, ...] = ("main",)) -> str:
        """Publish a repo; ``.gguf`` files go to LFS, others to git. Returns its commit sha."""
        entries = {}
        for path, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else bytes(content)
            entries[path] = Entry(path, data, lfs=path.endswith(".gguf"))
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(entries):
            digest.update(path.encode() + entries[path].sha256.encode())
        commit = digest.hexdigest()
        self.repos[repo_id] = Repo(repo_id, commit, entries, gated, dict.fromkeys(branches, commit))
        return commit

    def drop_after(self, file: str, nbytes: int, times: int = 1) -> None:
        """The next ``times`` GETs of ``file`` ("org/repo/path") stop after ``nbytes`` of body and hang up."""
        self._drops.setdefault(file, []).extend([nbytes] * times)

    def corrupt(self, file: str, times: int = 1) -> None:
        """The next ``times`` GETs of ``file`` send its bytes with one of them changed."""
        self._corrupt[file] += times

    def reset_counts(self) -> None:
        with self._lock:
            self.sent.clear()
            self.requests.clear()

    def file_requests(self, file: str, method: str = "GET", server: str = "cdn") -> list[Request]:
        return [r for r in self.requests if r.file == file and r.method == method and r.server == server]

    # ---- serving --------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        for kind in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, kind))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
            self._servers.append(server)
        return self

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def _lfs_entry(self, sha256: str) -> tuple[Repo, Entry] | None:
        for repo in self.repos.values():
            for entry in repo.files.values():
                if entry.lfs and entry.sha256 == sha256:
                    return repo, entry
        return None


def _handler(hub: FakeHub, kind: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub

        def log_message(self, *args: object) -> None:
            pass

        # ---- helpers ------------------------------------------------------------------------
        def _record(self, file: str | None = None) -> Request:
            auth = self.headers.get("Authorization")
            req = Request(kind, self.command, urlsplit(self.path).path, file, self.headers.get("Range"), bool(auth))
            with hub._lock:
                hub.requests.append(req)
            return req

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth[7:] if auth.lower().startswith("bearer ") else None

        def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
                  req: Request | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if req is not None:
                req.status = status
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def _json(self, data: object, req: Request) -> None:
            self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, req)

        def _error(self, status: int, code: str, message: str, req: Request, extra: Mapping[str, str] = ()) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json",
                       **dict(extra)}
            self._send(status, json.dumps({"error": message}).encode(), headers, req)

        def _repo(self, repo_id: str, req: Request) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found", req)
            return repo

        def _commit(self, repo: Repo, rev: str, req: Request) -> str | None:
            commit = repo.refs.get(rev) or (rev if rev == repo.commit else None)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", req)
            return commit

        def _body(self, entry: Entry, file: str, req: Request, extra: Mapping[str, str]) -> None:
            """Serve ``entry`` with Range, counting bytes and applying the faults asked for."""
            size = len(entry.data)
            start, end, status = 0, size - 1, 200
            rng = self.headers.get("Range")
            if rng:
                m = _RANGE_RE.match(rng.strip())
                if m and (m.group(1) or m.group(2)):
                    if m.group(1):
                        start = int(m.group(1))
                        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                    else:
                        start = max(0, size - int(m.group(2)))
                    if start >= size or start > end:
                        self._send(416, b"", {"Content-Range": f"bytes */{size}"}, req)
                        return
                    status = 206
            body = entry.data[start : end + 1]
            headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **dict(extra)}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            if self.command == "HEAD":
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                req.status = status
                return
            limit = None
            with hub._lock:
                if hub._corrupt[file] > 0 and body:
                    hub._corrupt[file] -= 1
                    mid = len(body) // 2
                    body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1 :]
                if hub._drops.get(file):
                    limit = hub._drops[file].pop(0)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            req.status = status
            pos = 0
            try:
                while pos < len(body):
                    n = min(CHUNK, len(body) - pos) if limit is None else min(CHUNK, len(body) - pos, limit - pos)
                    if n <= 0:  # the fault: hang up mid-body
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    self.wfile.write(body[pos : pos + n])
                    pos += n
                    with hub._lock:
                        hub.sent[file] += n
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client stopped reading (a range read that had enough)

        # ---- routes -------------------------------------------------------------------------
        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            if kind == "cdn":
                self._cdn(parts)
            elif parts == ["api", "agent-harnesses"]:  # huggingface_hub's user-agent detection, once a day
                self._json({"standardEnvVars": [], "harnesses": {}}, self._record())
            elif parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api(parts[2:], parse_qs(url.query))
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(parts)
            else:
                self._send(404, b"not found", req=self._record())

        def _api(self, parts: list[str], query: dict[str, list[str]]) -> None:
            req = self._record()
            repo = self._repo(f"{parts[0]}/{parts[1]}", req)
            if repo is None:
                return
            rest = parts[2:]
            if rest and rest[0] == "tree":
                commit = self._commit(repo, rest[1] if len(rest) > 1 else "main", req)
                if commit is not None:
                    prefix = "/".join(rest[2:])
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    self._json(self._tree(repo, prefix, recursive), req)
                return
            rev = rest[1] if len(rest) >= 2 and rest[0] == "revision" else "main"
            commit = self._commit(repo, rev, req)
            if commit is None:
                return
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for e in repo.files.values():
                s: dict[str, object] = {"rfilename": e.path}
                if blobs:
                    s.update(size=len(e.data), blobId=e.blob_id)
                    if e.lfs:
                        s["lfs"] = {"size": len(e.data), "sha256": e.sha256, "pointerSize": len(e.pointer)}
                siblings.append(s)
            self._json({
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": ["gguf"],
                "library_name": "gguf",
                "siblings": siblings,
                "lastModified": "2025-01-01T00:00:00.000Z",
                "createdAt": "2025-01-01T00:00:00.000Z",
            }, req)

        def _tree(self, repo: Repo, prefix: str, recursive: bool) -> list[dict[str, object]]:
            out: list[dict[str, object]] = []
            dirs = set()
            for e in sorted(repo.files.values(), key=lambda e: e.path):
                if prefix and not e.path.startswith(prefix + "/"):
                    continue
                rel = e.path[len(prefix) + 1 :] if prefix else e.path
                if "/" in rel and not recursive:
                    dirs.add((prefix + "/" if prefix else "") + rel.split("/")[0])
                    continue
                item: dict[str, object] = {"type": "file", "oid": e.blob_id, "size": len(e.data), "path": e.path}
                if e.lfs:
                    item["lfs"] = {"oid": e.sha256, "size": len(e.data), "pointerSize": len(e.pointer)}
                out.append(item)
            out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    for d in sorted(dirs)]
            return out

        def _resolve(self, parts: list[str]) -> None:
            repo_id, rev, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            req = self._record(f"{repo_id}/{path}")
            repo = self._repo(repo_id, req)
            if repo is None:
                return
            commit = self._commit(repo, rev, req)
            if commit is None:
                return
            if repo.gated and self._token() not in hub.tokens:
                status = 403 if self._token() else 401
                self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                            "to it and be authenticated to access it. Please log in.", req)
                return
            entry = repo.files.get(path)
            if entry is None:
                self._error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"", req,
                            {"X-Repo-Commit": commit})
                return
            headers = {"X-Repo-Commit": commit, "ETag": f'"{entry.blob_id}"'}
            if entry.lfs:
                headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(len(entry.data)),
                                "Location": f"{hub.cdn}/lfs/{entry.sha256}"})
                self._send(302, b"", headers, req)
            else:
                self._body(entry, f"{repo_id}/{path}", req, headers)

        def _cdn(self, parts: list[str]) -> None:
            if len(parts) != 2 or parts[0] != "lfs":
                self._send(404, b"not found", req=self._record())
                return
            found = hub._lfs_entry(parts[1])
            if found is None:
                self._send(404, b"not found", req=self._record())
                return
            repo, entry = found
            file = f"{repo.repo_id}/{entry.path}"
            self._body(entry, file, self._record(file), {"ETag": f'"{entry.sha256}"'})

    return Handler
