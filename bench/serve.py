"""Serving Gemma 3 270M with `instructkit serve` (a real uvicorn on 127.0.0.1, streaming clients
with httpx): aggregate tokens/s of 8 concurrent clients against one client alone (target >= 3x),
time to first token p50 / p95, and one client against llama.cpp's single stream on the same
prompts and token counts. Median (min-max) over rounds. Then a soak (serve_soak.py): 16 clients, a
poison request and a dropped client every 10 s, peak RSS."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from bench import serve_soak
from bench.common import fmt_spread, print_table, spread

QUESTIONS = ["Name a fruit.", "What is 2 + 2?", "Say hello in French.", "Give a color.", "Name a planet.",
             "What is the capital of Spain?", "Count to three.", "Name an animal that barks."]
TARGET = 3.0


def _start(model: str):
    process = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", "--model", model, "--prompt-style", "gemma",
                                "--port", "0", "--max-batch", "8"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, cwd=Path(__file__).resolve().parents[1], env={**os.environ})
    for line in process.stdout:
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, found.group(1)
    raise RuntimeError("the server did not start")


def _stream(url: str, model: str, question: str, tokens: int) -> dict:
    """One streamed chat completion: tokens generated, seconds, time to first token."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True},
            "stop": []}
    started, first, generated = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - started
    return {"tokens": generated, "seconds": time.perf_counter() - started, "ttft": first}


def run(quick: bool = False, repeats: int | None = None) -> dict:
    import torch

    from bench import llamacpp
    from instructkit.data.prompts import GEMMA
    from instructkit.models.registry import embedded_gguf_path, load_model

    repeats = repeats or (1 if quick else 3)
    model = "tiny-gemma3" if quick else "gemma-3-270m"
    tokens = 8 if quick else 64
    process, url = _start(model)
    rounds = []
    try:
        _stream(url, model, "Warm up.", 4)
        for _ in range(repeats):
            alone = [_stream(url, model, q, tokens) for q in QUESTIONS[:2]]
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                together = list(pool.map(lambda q: _stream(url, model, q, tokens), QUESTIONS))
            wall = time.perf_counter() - started
            rounds.append({"one_tok_s": sum(r["tokens"] for r in alone) / sum(r["seconds"] for r in alone),
                           "eight_tok_s": sum(r["tokens"] for r in together) / wall,
                           "ttft": [r["ttft"] for r in together if r["ttft"] is not None]})
        soaked = serve_soak.soak(url, process.pid, model, seconds=20 if quick else 60, every=5 if quick else 10,
                                 tokens=tokens)
    finally:
        process.terminate()
        process.wait(timeout=30)
    # One client against llama.cpp's single stream on the same prompts, token counts and threads.
    tokenizer = load_model("tiny-gemma3").tokenizer
    prompts = [tokenizer.encode(GEMMA.conversation([{"role": "user", "content": q}])) for q in QUESTIONS[:2]]
    llama = [llamacpp.single_stream(str(embedded_gguf_path()), prompts, tokens, set(), torch.get_num_threads())
             for _ in range(repeats)]
    one, eight = spread([r["one_tok_s"] for r in rounds]), spread([r["eight_tok_s"] for r in rounds])
    ratio = spread([r["eight_tok_s"] / r["one_tok_s"] for r in rounds])
    ttft = sorted(t for r in rounds for t in r["ttft"])
    p50, p95 = statistics.median(ttft), ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))]
    versus = spread([r["one_tok_s"] / l["tok_s"] for r, l in zip(rounds, llama)])
    print_table(f"Serving {model}: greedy chat completions, {tokens} new tokens each (median, min-max of {repeats})",
                ["measurement", "value"], [
                    ["1 client, tokens/s", fmt_spread(one, "{:.1f}")],
                    ["8 concurrent clients, aggregate tokens/s", fmt_spread(eight, "{:.1f}")],
                    [f"8 clients / 1 client (target >= {TARGET:g}x)", fmt_spread(ratio, "{:.2f}", "x")],
                    ["time to first token with 8 clients, p50 / p95 s", f"{p50:.2f} / {p95:.2f}"],
                    ["llama.cpp single stream (Q4_K_M), tokens/s", fmt_spread(spread([l['tok_s'] for l in llama]), "{:.1f}")],
                    ["1 client / llama.cpp single stream", fmt_spread(versus, "{:.2f}", "x")]])
    print_table(f"Soak: {soaked['clients']} streaming clients for {soaked['seconds']:g} s, a poison request and a dropped "
                "client every interval (target: every healthy request completes, RSS flat after warm-up)",
                ["measurement", "value"], serve_soak.table(soaked))
    return {"soak": soaked, "model": model, "tokens": tokens, "one_client": one, "eight_clients": eight, "ratio": ratio,
            "met": ratio["median"] >= TARGET, "ttft_p50": p50, "ttft_p95": p95, "llama_cpp": llama,
            "one_vs_llama_cpp": versus, "rounds": rounds}
