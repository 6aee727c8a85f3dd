"""Load times of the default model: first load (assemble the GGUF, dequantize, convert, cache)
into an empty cache folder, then cached loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from bench.common import print_table

SNIPPET = "import time; t=time.perf_counter(); from instructkit.models.registry import load_model; load_model('gemma-3-270m'); print(time.perf_counter()-t)"


def _timed_load(cache: str) -> float:
    env = {**os.environ, "INSTRUCTKIT_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        first = _timed_load(cache)
        cached = [_timed_load(cache) for _ in range(2 if quick else 3)]
    print_table("Default model load (seconds, in a fresh process, imports included)",
                ["load", "seconds"], [["first (convert and cache)", first]] + [[f"cached #{i + 1}", t] for i, t in enumerate(cached)])
    return {"first_s": first, "cached_s": cached}
