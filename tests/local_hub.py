"""A local stand-in for the Hugging Face Hub's HTTP API (the hub is unreachable from tests).

It answers the calls ``HfApi.create_repo`` and ``HfApi.upload_folder`` make (create the repository,
validate the card's YAML, pre-upload every file as a regular one, commit) and keeps what was
committed, so a test can compare it with the files on disk. Point huggingface_hub at it with
``HF_ENDPOINT=hub.url`` (and any ``HF_TOKEN``, ``HF_HUB_OFFLINE=0``).
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHub:
    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> path -> committed bytes
        self.validated: list[dict] = []  # the bodies of /api/validate-yaml
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str, body: bytes) -> tuple[int, dict]:
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            self.files.setdefault(repo, {})
            return 200, {"url": f"{self.url}/{repo}"}
        if path == "/api/validate-yaml":
            self.validated.append(json.loads(body))
            return 200, {"errors": [], "warnings": []}
        if path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            return 200, {
                "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            }
        if path.startswith("/api/models/") and "/commit/" in path:
            repo = path.removeprefix("/api/models/").split("/commit/")[0]
            for line in body.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    self.files.setdefault(repo, {})[op["value"]["path"]] = base64.b64decode(
                        op["value"]["content"]
                    )
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40}
        return 404, {"error": f"not served: {path}"}


def _handler(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Content-Length"):
                return self.rfile.read(int(self.headers["Content-Length"]))
            out = b""
            while self.headers.get("Transfer-Encoding") == "chunked":
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
            return out

        def _reply(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            hub.requests.append(("GET", self.path))
            self._reply(404, {"error": "not served"})

        def do_POST(self) -> None:
            body = self._body()
            path = self.path.split("?")[0]
            hub.requests.append(("POST", path))
            self._reply(*hub.answer(path, body))

    return Handler
