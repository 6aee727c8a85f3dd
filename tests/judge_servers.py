"""HTTP servers for the judge tests: a real llama.cpp server, a counting proxy in front of it,
and stand-ins for what a real server cannot be made to do here (see each docstring)."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def llama_cpp_server(gguf_path):
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) on 127.0.0.1."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1",
         "--port", str(port), "--chat_format", "gemma", "--n_ctx", "2048", "--n_threads", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            raise RuntimeError("llama.cpp server did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


class _Server:
    def __init__(self, handler_class):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self.server.requests = []
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @property
    def requests(self) -> list:
        return self.server.requests


def counting_proxy(target: str) -> _Server:
    """Forwards every request to `target` (the real llama.cpp server) and records the bodies."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _forward(self, method: str):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            if method == "POST":
                self.server.requests.append(json.loads(body))
            response = httpx.request(method, target + self.path, content=body or None,
                                     headers={"Content-Type": "application/json"}, timeout=120)
            self.send_response(response.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(response.content)))
            self.end_headers()
            self.wfile.write(response.content)

        def do_GET(self):
            self._forward("GET")

        def do_POST(self):
            self._forward("POST")

    return _Server(Handler)


def scripted_openai_server(script) -> _Server:
    """A stand-in, because llama.cpp cannot be made to fail on demand: `script(n, body)` returns
    ("reply", text) | ("status", code) | ("hang", seconds) | ("drop", None) for the n-th request."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.server.requests.append(body)
            action, value = script(len(self.server.requests), body)
            if action == "drop":
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if action == "hang":
                time.sleep(value)
                return
            if action == "status":  # value: a code, or (code, JSON body)
                code, payload = value if isinstance(value, tuple) else (value, None)
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": value}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return _Server(Handler)


def ollama_stand_in(reply_for) -> _Server:
    """A stand-in for Ollama (which cannot be installed here): it replays the NDJSON stream that
    Ollama's /api/chat documents, one JSON object per line, the last with "done": true.
    `reply_for(body)` gives the content pieces, or a dict {"pieces": [...], "end": "done" | "error"
    | "cut", "status": code} to end the stream with an error chunk, cut it off before done, or
    answer an HTTP error with Ollama's {"error": ...} body."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # /api/tags
            data = json.dumps({"models": [{"name": "llama3"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.server.requests.append({"path": self.path, **body})
            plan = reply_for(body)
            plan = plan if isinstance(plan, dict) else {"pieces": plan}
            text, end, status = plan.get("pieces", []), plan.get("end", "done"), plan.get("status", 200)
            lines = [{"model": body["model"], "created_at": "2024-07-01T00:00:00Z",
                      "message": {"role": "assistant", "content": piece}, "done": False} for piece in text]
            if status != 200:
                lines = [{"error": f"model '{body['model']}' not found"}]
            elif end == "error":
                lines.append({"error": "an error was encountered while running the model"})
            elif end == "done":
                lines.append({"model": body["model"], "created_at": "2024-07-01T00:00:01Z",
                              "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
                              "total_duration": 1, "eval_count": len(text)})
            data = "".join(json.dumps(line) + "\n" for line in lines).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return _Server(Handler)
