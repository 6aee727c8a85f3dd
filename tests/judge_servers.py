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


STREAM_LIMIT = 20.0  # seconds a never-ending stream runs before the stand-in gives up on its own


def _stream_until_hang_up(handler, piece: bytes, every: float = 0.05) -> None:
    """Send `piece` every `every` seconds until the client hangs up (its request number is recorded
    in server.hung_up) or STREAM_LIMIT passes: a client without an overall deadline only gets out
    at that limit. server.stream_ended is set either way, for a test to wait on."""
    number, started = len(handler.server.requests), time.monotonic()
    try:
        while time.monotonic() - started < STREAM_LIMIT:
            handler.wfile.write(piece)
            time.sleep(every)
    except (BrokenPipeError, ConnectionResetError):
        handler.server.hung_up.append(number)
    finally:
        handler.server.stream_ended.set()


class _Server:
    def __init__(self, handler_class):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self.server.requests = []
        self.server.times = []  # time.monotonic() of each POST, for Retry-After
        self.server.hung_up = []  # the request numbers whose client hung up mid-stream
        self.server.stream_ended = threading.Event()
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

    @property
    def times(self) -> list:
        return self.server.times

    @property
    def hung_up(self) -> list:
        return self.server.hung_up

    def wait_for_stream_end(self) -> bool:
        return self.server.stream_ended.wait(STREAM_LIMIT + 10)


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
    ("reply", content) | ("status", code) | ("hang", seconds) | ("drop", None) | ("trickle", None)
    for the n-th request. The content may be any JSON value (a server that sends a number or a
    list); a status may be (code, JSON body) or (code, JSON body, headers) (e.g. Retry-After);
    "trickle" answers 200 and then one space every 50 ms, forever (valid JSON never ends)."""

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
            self.server.times.append(time.monotonic())
            self.server.requests.append(body)
            action, value = script(len(self.server.requests), body)
            if action == "drop":
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if action == "hang":
                time.sleep(value)
                return
            if action == "trickle":  # no Content-Length: the body ends when the connection does
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                _stream_until_hang_up(self, b" ")
                return
            if action == "status":  # value: a code, or (code, JSON body[, headers])
                value = value if isinstance(value, tuple) else (value,)
                code, payload, headers = value[0], value[1] if len(value) > 1 else None, value[2] if len(value) > 2 else {}
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(code)
                for name, header in headers.items():
                    self.send_header(name, header)
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
    | "cut" | "forever", "status": code} to end the stream with an error chunk, cut it off before
    done, never end it (a chunk with empty content every 50 ms), or answer an HTTP error with
    Ollama's {"error": ...} body. A piece may be any JSON value (a server sending a number)."""

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
            elif end == "forever":
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                self.wfile.write("".join(json.dumps(line) + "\n" for line in lines).encode())
                empty = {"model": body["model"], "message": {"role": "assistant", "content": ""}, "done": False}
                _stream_until_hang_up(self, (json.dumps(empty) + "\n").encode())
                return
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
