"""A Hugging Face Hub on loopback, serving dataset repositories from memory.

It answers the calls huggingface_hub makes to read a dataset at a revision (repository info, tree
listing, file download), with the Hub's error codes for missing and gated repositories and unknown
revisions, and records each request's path and Authorization header, so tests can check what the
trainer asked for and with which token. No test traffic leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    """A dataset repository: revision name → (commit, files)."""

    revisions: dict[str, tuple[str, dict[str, bytes]]]
    gated: bool = False


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    requests: list[Request] = field(default_factory=list)
    endpoint: str = ""

    def _revision(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        revisions = self.repos[repo].revisions
        if revision in revisions:
            return revisions[revision]
        return next((entry for entry in revisions.values() if entry[0] == revision), None)

    def answer(self, method: str, path: str, authorization: str | None) -> tuple[int, bytes, dict[str, str]]:
        self.requests.append(Request(method, path, authorization))
        route = re.fullmatch(
            r"/(?:api/)?datasets/([^/]+/[^/]+)/(revision|tree|resolve)/([^/]+)(?:/(.*))?", path
        )
        if route is None or route.group(1) not in self.repos:
            return 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}
        name, kind, revision, file = route.groups()
        if self.repos[name].gated and authorization is None:
            return 401, b'{"error": "Access to this dataset is restricted"}', {"X-Error-Code": "GatedRepo"}
        found = self._revision(name, revision)
        if found is None:
            return 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}
        commit, files = found
        if kind == "revision":
            siblings = [{"rfilename": path} for path in files]
            return 200, json.dumps({"id": name, "sha": commit, "siblings": siblings}).encode(), {}
        if kind == "tree":
            tree = [
                {"type": "file", "path": path, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
                for path, body in files.items()
            ]
            return 200, json.dumps(tree).encode(), {}
        if file not in files:
            return 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"}
        body = files[file]
        return 200, body, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path)
            status, body, headers = hub.answer(self.command, path, self.headers.get("authorization"))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json" if path.startswith("/api/") else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


@contextmanager
def serve(repos: dict[str, Repo]) -> Iterator[FakeHub]:
    """A running fake Hub; its `endpoint` is what HF_ENDPOINT should be set to."""
    hub = FakeHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.endpoint = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
