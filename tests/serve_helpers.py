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
