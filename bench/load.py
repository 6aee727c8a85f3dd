"""Load times of the default model: first load (assemble the GGUF, dequantize, convert, cache)
into an empty cache folder, then cached loads."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from bench.common import print_table

# Prints the load_model call's seconds, then the whole process's (imports of torch etc. included).
SNIPPET = ("import time; t0=time.perf_counter(); from instructkit.models.registry import load_model; "
           "t1=time.perf_counter(); load_model('gemma-3-270m'); t2=time.perf_counter(); print(t2-t1, t2-t0)")


def _timed_load(cache: str) -> tuple[float, float]:
    env = {**os.environ, "INSTRUCTKIT_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    load, total = out.stdout.strip().splitlines()[-1].split()
    return float(load), float(total)


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        first = _timed_load(cache)
        cached = [_timed_load(cache) for _ in range(2 if quick else 3)]
    print_table("Default model load, each in a fresh process (seconds)",
                ["load", "load_model()", "process incl. imports"],
                [["first (convert and cache)", *first]] + [[f"cached #{i + 1}", *t] for i, t in enumerate(cached)])
    return {"first_s": first, "cached_s": cached}
