"""A stand-in for the Hugging Face Hub on 127.0.0.1, for push tests (the real Hub is unreachable here).

It answers the endpoints huggingface_hub's create_repo, create_branch and upload_folder call (checked against
huggingface_hub 2.4.0, without hf_xet: set HF_HUB_DISABLE_XET=1), and records what arrives:

    POST /api/repos/create                               create_repo
    POST /api/models/<repo>/branch/<branch>              create_branch
    POST /api/validate-yaml                              create_commit checks README.md metadata first
    POST /api/models/<repo>/preupload/<revision>         upload modes: *.safetensors go through LFS, the rest inline
    POST /<repo>.git/info/lfs/objects/batch              LFS batch: where to PUT each large file
    PUT  /lfs/<oid>                                      an LFS object (its sha256 is checked)
    POST /api/models/<repo>/commit/<revision>            the commit (NDJSON: header, file, lfsFile lines)

`FakeHub(fail={"/api/repos/create": 401})` answers that status on paths starting with the key instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_MAX_CHUNKS = 100_000  # bound on the chunks of one chunked request body
HUB_SECRET = "hf_fake_hub_token_never_written_0123456789"


def hub_env(endpoint: str, home, token: str | None = HUB_SECRET) -> dict:
    """The environment of a CLI that talks to a fake Hub: its endpoint, a token (or none: HF_TOKEN empty and an
    empty HF_HOME, so no login cache either), no Xet transfers (the fake Hub speaks the LFS protocol)."""
    return {"HF_ENDPOINT": endpoint, "HF_TOKEN": token or "", "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0"}


class FakeHub:
    def __init__(self, fail: dict[str, int] | None = None):
        self.fail = fail or {}
        self.requests: list[dict] = []  # method, path, headers of every request
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits: list[dict] = []  # repo, branch, summary, files
        self.lfs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

            def do_PUT(self):
                hub._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo]["branches"][branch]

    # --- request handling ---------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(h.path).path
        body = _read_body(h)
        with self._lock:
            self.requests.append({"method": method, "path": path, "headers": dict(h.headers)})
            for prefix, status in self.fail.items():
                if path.startswith(prefix):
                    return _send(h, status, {"error": f"fake hub: {status} on {prefix}"})
            try:
                status, answer = self._route(method, path, body)
            except Exception as e:  # a malformed request: tell the client, keep serving
                status, answer = 400, {"error": f"fake hub: {type(e).__name__}: {e}"}
        _send(h, status, answer)

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            self.repos[repo] = {"private": payload.get("visibility") == "private", "branches": {"main": {}}}
            return 200, {"url": f"{self.url}/{repo}", "name": repo}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and path.startswith("/api/models/"):
            parts = path.split("/")  # "", api, models, <namespace>, <name>, <action>, <revision>
            return self._repo_action(parts[5], "/".join(parts[3:5]), unquote("/".join(parts[6:])), body)
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            return 200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 "actions": {"upload": {"href": f"{self.url}/lfs/{o['oid']}"}}} for o in objects]}
        if method == "PUT" and path.startswith("/lfs/"):
            oid = path.removeprefix("/lfs/")
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "sha256 mismatch"}
            self.lfs[oid] = body
            return 200, {}
        return 404, {"error": f"fake hub: no route for {method} {path}"}

    def _repo_action(self, action: str, repo: str, revision: str, body: bytes) -> tuple[int, dict]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        branches = self.repos[repo]["branches"]
        if action == "branch":
            if revision in branches:
                return 409, {"error": "Reference already exists"}
            branches[revision] = dict(branches["main"])
            return 200, {}
        if revision not in branches:
            return 404, {"error": f"Invalid rev id: {revision}"}
        if action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors")
                                    else "regular", "shouldIgnore": False} for f in files]}
        if action == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {}
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in self.lfs:
                        return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                    files[value["path"]] = self.lfs[value["oid"]]
            branches[revision].update(files)
            oid = hashlib.sha1(f"{repo}{revision}{len(self.commits)}".encode()).hexdigest()
            self.commits.append({"repo": repo, "branch": revision, "summary": header["summary"], "files": files,
                                 "oid": oid})
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}
        return 404, {"error": f"fake hub: unknown action {action}"}


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":  # file uploads may be sent chunked
        parts = []
        for _ in range(_MAX_CHUNKS):
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                h.rfile.readline()
                break
            parts.append(h.rfile.read(size))
            h.rfile.readline()
        return b"".join(parts)
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))


def _send(h: BaseHTTPRequestHandler, status: int, answer: dict) -> None:
    data = json.dumps(answer).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
