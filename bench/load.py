"""Load times of the default model: first load (assemble the GGUF, dequantize, convert, cache)
into an empty cache folder, then cached loads. Then the memory of loading a Hugging Face folder
of a 1.5B-parameter shape (Qwen2.5-1.5B's config, bf16 weights in two shards as on the Hub; the
values are zeros: memory and time do not depend on them): peak RSS against the model's fp32 size
(the loader streams tensors in one at a time, so it should stay near 1x, never 1.5x)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from bench.common import print_table, write_hf_folder

# Prints the load_model call's seconds, then the whole process's (imports of torch etc. included).
SNIPPET = ("import time; t0=time.perf_counter(); from instructkit.models.registry import load_model; "
           "t1=time.perf_counter(); load_model('gemma-3-270m'); t2=time.perf_counter(); print(t2-t1, t2-t0)")


def _timed_load(cache: str) -> tuple[float, float]:
    env = {**os.environ, "INSTRUCTKIT_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    load, total = out.stdout.strip().splitlines()[-1].split()
    return float(load), float(total)


LOAD_FOLDER = ("import resource, sys, time; t = time.perf_counter(); from instructkit.models.registry import load_model; "
               "m = load_model(sys.argv[1]); n = sum(p.numel() for p in m.model.parameters()); "
               "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t)")


def folder_memory(repeats: int) -> dict:
    """Peak RSS / fp32 size and seconds of loading the 1.5B-shape bf16 folder, each in a fresh process."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_hf_folder(folder, "qwen2.5-1.5b", values="zeros")
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", LOAD_FOLDER, folder], capture_output=True, text=True, check=True)
            params, peak, seconds = out.stdout.strip().splitlines()[-1].split()
            rows.append({"params": int(params), "peak_rss_gb": int(peak) / 1e9, "ratio": int(peak) / (4 * int(params)),
                         "seconds": float(seconds)})
    print_table("Loading a 1.5B-parameter HF folder (Qwen2.5-1.5B shape, bf16, 2 shards; weights all zero)",
                ["repeat", "parameters", "peak RSS GB", "peak RSS / fp32 size", "seconds"],
                [[i + 1, f"{r['params'] / 1e9:.3f}B", f"{r['peak_rss_gb']:.2f}", f"{r['ratio']:.3f}", f"{r['seconds']:.1f}"]
                 for i, r in enumerate(rows)])
    return {"folder_1_5b": rows}


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        first = _timed_load(cache)
        cached = [_timed_load(cache) for _ in range(2 if quick else 3)]
    print_table("Default model load, each in a fresh process (seconds)",
                ["load", "load_model()", "process incl. imports"],
                [["first (convert and cache)", *first]] + [[f"cached #{i + 1}", *t] for i, t in enumerate(cached)])
    return {"first_s": first, "cached_s": cached, **({} if quick else folder_memory(3))}
