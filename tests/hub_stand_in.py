"""A loopback stand-in for the Hugging Face Hub, enough for huggingface_hub's download path.

Endpoints (what ``HfApi.model_info`` and ``hf_hub_download`` call):
``GET /api/models/{repo}[/revision/{rev}]`` (id, sha, siblings with sizes),
``HEAD|GET /{repo}/resolve/{rev}/{file}`` (``X-Repo-Commit``, ``ETag``, ``Content-Length``;
``Range: bytes=N-`` answered with 206). Errors carry the hub's ``X-Error-Code``
(RepoNotFound, RevisionNotFound, EntryNotFound). 127.0.0.1 only; every request is logged;
``faults`` breaks one file's downloads; the server stops itself after ``lifetime`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit


class StandInHub:
    """Serves repositories given as {file name: bytes}.

    ``faults[file]``: ``"drop_once"`` sends half of the next full GET and closes the
    connection; ``"error"`` answers every GET with 500 (HEAD still works).
    """

    def __init__(self, lifetime: float = 600.0) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> sha -> files
        self.refs: dict[str, dict[str, str]] = {}  # repo -> branch -> sha
        self.requests: list[tuple[str, str, Optional[str]]] = []  # method, path, Range
        self.authorization: list[Optional[str]] = []  # the Authorization header of each
        self.faults: dict[str, str] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "StandInHub":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Publishes ``files`` as a new commit of ``repo`` on ``branch``; returns the sha."""
        h = hashlib.sha1(repo.encode())
        for name in sorted(files):
            h.update(name.encode() + hashlib.sha256(files[name]).digest())
        sha = h.hexdigest()
        self.repos.setdefault(repo, {})[sha] = dict(files)
        self.refs.setdefault(repo, {})[branch] = sha
        return sha

    def add_folder(self, repo: str, folder: Path) -> str:
        return self.add_repo(repo, {p.relative_to(folder).as_posix(): p.read_bytes()
                                    for p in sorted(folder.rglob("*")) if p.is_file()})

    def gets(self, path_suffix: str = "") -> list[tuple[str, Optional[str]]]:
        """(path, Range) of every GET of a file whose path ends with ``path_suffix``."""
        return [(p, r) for m, p, r in self.requests
                if m == "GET" and "/resolve/" in p and p.endswith(path_suffix)]

    def resolve(self, repo: str, rev: str) -> Optional[str]:
        shas = self.repos.get(repo, {})
        return rev if rev in shas else self.refs.get(repo, {}).get(rev)


def _handler(hub: StandInHub) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30  # a stuck client cannot hold a thread for ever

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, head: bool, extra: Optional[dict] = None) -> None:
            body = json.dumps({"error": code}).encode()
            self._send(status, body, {"X-Error-Code": code, "X-Error-Message": code,
                                      "Content-Type": "application/json", **(extra or {})}, head)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            hub.authorization.append(self.headers.get("Authorization"))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo = "/".join(parts[2:4])
                rev = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
                return self._info(repo, rev, head)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
            self._error(404, "NotFound", head)

        def _info(self, repo: str, rev: str, head: bool) -> None:
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", head)
            sha = hub.resolve(repo, rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", head)
            files = hub.repos[repo][sha]
            siblings = [{"rfilename": n, "size": len(b), "blobId": hashlib.sha1(b).hexdigest()}
                        for n, b in sorted(files.items())]
            body = json.dumps({"id": repo, "sha": sha, "private": False, "siblings": siblings})
            self._send(200, body.encode(), {"Content-Type": "application/json"}, head)

        def _file(self, repo: str, rev: str, name: str, head: bool) -> None:
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", head)
            sha = hub.resolve(repo, rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", head)
            data = hub.repos[repo][sha].get(name)
            if data is None:
                return self._error(404, "EntryNotFound", head, {"X-Repo-Commit": sha})
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if head:
                return self._send(200, data, headers, head=True)
            fault = hub.faults.get(name)
            if fault == "error":
                return self._error(500, "InternalError", head)
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[len("bytes="):-1])
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(206, data[start:], headers)
            if fault == "drop_once":
                del hub.faults[name]
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self._send(200, data, headers)

    return Handler
