"""Start `instructkit serve` as users do (a real uvicorn on 127.0.0.1, a free port) and read the
one line that says where it listens."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager


@contextmanager
def running_server(*args: str, env: dict | None = None, timeout: float = 180):
    process = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    output: list[str] = []
    url: list[str] = []
    ready = threading.Event()

    def read_stdout():
        for line in process.stdout:
            output.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found and not url:
                url.append(found.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.time() + timeout
    while not ready.wait(0.2):
        if time.time() > deadline or process.poll() is not None:
            break
    if not url:
        process.kill()
        raise RuntimeError(f"server did not start: {''.join(output)} {process.stderr.read()[-2000:]}")
    try:
        yield url[0], process, output
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def app_server(models, **options):
    """`create_app` on a real uvicorn in this process (127.0.0.1, a free port), for models that a
    test wraps to inject faults or to hold a step; yields the base URL. Stops the workers after."""
    import socket

    import uvicorn

    from instructkit.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(models, **options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        for served in models:
            served.worker.stop()


def wait_for(condition, what: str, timeout: float = 300):
    """Poll until `condition()` is truthy (a safety deadline only: no test asserts on time)."""
    deadline = time.time() + timeout
    while not (value := condition()):
        if time.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)
    return value


def hooked_model(loaded, name, hook, style, *, max_batch=8, max_cache_tokens=None):
    """A served copy of a loaded model whose forward pass first calls `hook(input_ids, positions)`:
    to inject a fault for one row, or to hold the decoder at a step."""
    import torch

    from instructkit.serve.app import ServedModel

    class Model(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def new_cache(self, *args, **kwargs):
            return self.inner.new_cache(*args, **kwargs)

        def head(self, hidden):
            return self.inner.head(hidden)

        def forward(self, input_ids, **kwargs):
            hook(input_ids, kwargs["positions"])
            return self.inner(input_ids, **kwargs)

    wrapped = type(loaded)(Model(loaded.model), loaded.tokenizer, name, loaded.tokenizer_ref)
    return ServedModel(name, wrapped, style, "model").start(max_batch, max_cache_tokens)
