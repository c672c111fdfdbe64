"""A tiny in-process model hub for tests: the endpoints huggingface_hub 2.4 calls to create a repo, commit files
(preupload + NDJSON commit), read repo info, list files and download them (snapshot_download).

Listens on 127.0.0.1 only, on a free port, and shuts itself down after ``lifetime`` seconds if the test forgets.
Faults are injected per endpoint: ``hub.faults["commit"] = [500]`` answers the next commit with a 500;
``"corrupt"`` stores one file altered; ``"timeout"`` applies the commit, then holds the response for ``hub.stall`` seconds so the client times out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


def git_oid(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class FakeHub:
    def __init__(self, lifetime: float = 120.0, stall: float = 2.0):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private", "branches": {name: sha}, "commits": {sha: files}}
        self.faults: dict[str, list] = {}
        self.calls: list[tuple[str, str]] = []  # (method, path)
        self.auth: set[str] = set()  # Authorization headers seen
        self.commits = 0
        self.stall = stall
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, code, obj=None, headers=None, body=None):
                data = body if body is not None else (json.dumps(obj).encode() if obj is not None else b"")
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _dispatch(self):
                try:
                    hub.handle(self)
                except Exception as e:  # a bug in the fake must show up in the test, as a 599
                    self._send(599, {"error": repr(e)})

            do_GET = do_POST = do_HEAD = _dispatch

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime, self.stop)
        self.timer.daemon = True

    # ---------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> FakeHub:
        self.thread.start()
        self.timer.start()
        return self

    def stop(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------------------------------------- state
    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        sha = repo["branches"].get(rev, rev)
        return repo["commits"].get(sha, {})

    def _fault(self, name: str):
        with self.lock:
            q = self.faults.get(name)
            return q.pop(0) if q else None

    def _resolve(self, h, repo_id: str, rev: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            h._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None, None
        sha = repo["branches"].get(rev, rev if rev in repo["commits"] else None)
        if sha is None:
            h._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return None, None
        return sha, repo["commits"][sha]

    # ---------------------------------------------------------------------------------------------- routes
    def handle(self, h) -> None:
        url = urlparse(h.path)
        parts = [unquote(p) for p in url.path.split("/") if p != ""]
        query = parse_qs(url.query)
        self.calls.append((h.command, url.path))
        if h.headers.get("Authorization"):
            self.auth.add(h.headers["Authorization"])
        body = h._body() if h.command == "POST" else b""

        if parts[:3] == ["api", "repos", "create"]:
            p = json.loads(body)
            rid = f"{p['organization']}/{p['name']}"
            if rid in self.repos:
                return h._send(409, {"error": "You already created this model repo", "url": f"{self.url}/{rid}"})
            sha = hashlib.sha1(f"init {rid}".encode()).hexdigest()
            self.repos[rid] = {
                "private": p.get("visibility") == "private",
                "branches": {"main": sha},
                "commits": {sha: {".gitattributes": b"*.safetensors filter=lfs\n"}},
            }
            return h._send(200, {"url": f"{self.url}/{rid}", "name": rid})
        if parts[:2] == ["api", "validate-yaml"]:
            return h._send(200, {"errors": [], "warnings": []})
        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models":
            rid, verb, rest = f"{parts[2]}/{parts[3]}", parts[4], parts[5:]
            rev = rest[0] if rest else "main"
            if verb == "preupload":
                if (f := self._fault("preupload")) is not None:
                    return h._send(f, {"error": "injected"})
                sha, files = self._resolve(h, rid, rev)
                if sha is None:
                    return None
                out = [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_oid(files[f["path"]]) if f["path"] in files else None,
                    }
                    for f in json.loads(body)["files"]
                ]
                return h._send(200, {"files": out, "commitOid": sha})
            if verb == "commit":
                return self._commit(h, rid, rev, body)
            if verb == "branch":
                repo = self.repos[rid]
                if rev in repo["branches"]:
                    return h._send(409, {"error": "Reference already exists"})
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo["branches"][rev] = repo["branches"].get(start, start)
                return h._send(200, {})
            if verb == "revision":
                sha, files = self._resolve(h, rid, rev)
                if sha is None:
                    return None
                return h._send(
                    200,
                    {
                        "id": rid,
                        "modelId": rid,
                        "sha": sha,
                        "private": self.repos[rid]["private"],
                        "siblings": [{"rfilename": p} for p in sorted(files)],
                    },
                )
            if verb == "tree":
                sha, files = self._resolve(h, rid, rev)
                if sha is None:
                    return None
                prefix = "/".join(rest[1:])
                rows = [
                    {"type": "file", "oid": git_oid(d), "size": len(d), "path": p}
                    for p, d in sorted(files.items())
                    if p.startswith(prefix)
                ]
                if query.get("recursive", ["False"])[0].lower() != "true":
                    rows = [r for r in rows if "/" not in r["path"][len(prefix) :].lstrip("/")]
                return h._send(200, rows)
        if len(parts) >= 5 and parts[2] == "resolve":  # /{org}/{name}/resolve/{rev}/{path}
            rid, rev, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            sha, files = self._resolve(h, rid, rev)
            if sha is None:
                return None
            if path not in files:
                return h._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            data = files[path]
            return h._send(200, headers={"X-Repo-Commit": sha, "ETag": f'"{git_oid(data)}"'}, body=data)
        return h._send(404, {"error": f"fake hub: no route {h.command} {url.path}"})

    def _commit(self, h, rid: str, rev: str, body: bytes) -> None:
        fault = self._fault("commit")
        if isinstance(fault, int):
            return h._send(fault, {"error": "injected server error"})
        sha, files = self._resolve(h, rid, rev)
        if sha is None:
            return None
        new = dict(files)
        header = None
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                new[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                new.pop(item["value"]["path"], None)
            else:
                return h._send(400, {"error": f"fake hub does not support {item['key']}"})
        assert header and header["summary"], "commit without a summary"
        if fault == "corrupt":  # the hub stores something else than what was sent
            first = sorted(p for p in new if p != ".gitattributes")[0]
            new[first] = new[first] + b"\n"
        digest = hashlib.sha1(sha.encode())
        for p in sorted(new):
            digest.update(p.encode() + b"\0" + new[p])
        new_sha = digest.hexdigest()
        with self.lock:
            repo = self.repos[rid]
            repo["commits"][new_sha] = new
            repo["branches"][rev] = new_sha
            self.commits += 1
        if fault == "timeout":  # applied, but the answer comes too late: the client must retry
            time.sleep(self.stall)
        return h._send(200, {"commitUrl": f"{self.url}/{rid}/commit/{new_sha}", "commitOid": new_sha, "success": True})
