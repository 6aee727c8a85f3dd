"""Chat's default start, timed (`python -m bench quantized`): the decode step compiled in the
background while answers stream eagerly (decode/background.py), from an empty compile cache (a
machine's first start) and from the cache that start filled (every later one, decode/compile_cache.py).

Each start is a process of its own (bench/startup_worker.py) with the compile cache in a folder of
its round: cold, then warm from it. Per start: load seconds, time to the first token (eager, the
compile running), seconds until the compiled step takes over, eager tokens/s alone and while
compiling, compiled tokens/s (batch 1, greedy, exactly `budget` new tokens per prompt), whether
the compiled step's tokens equal the eager ones, and the compile cache's hits and misses. Every
number is the median (min-max) over the rounds.
"""

from __future__ import annotations

import os
import tempfile

import torch

from bench.common import fmt_spread, print_table, run_worker, spread

MODELS = ("gemma-3-270m", "smollm2-135m-instruct")  # the default model; a llama-family one
QUESTIONS = ["Write a short poem about the sea.", "Explain what a noun is.", "Describe a sunny day in the city."]
KEYS = ("load_s", "ttft_s", "compile_s", "eager_tok_s", "tok_s_while_compiling", "compiled_tok_s", "peak_rss_bytes")


def _prompts(model: str, count: int) -> list[list[int]]:
    """The questions in the model's own chat format, as chat sends them."""
    from instructkit.models.registry import load_model
    from instructkit.serve.conversation import encode_conversation
    from instructkit.data.prompts import resolve_prompt_style

    loaded = load_model(model)
    style = resolve_prompt_style(loaded.default_prompt_style, loaded)
    return [encode_conversation(style, [{"role": "user", "content": q}], loaded.tokenizer) for q in QUESTIONS[:count]]


def run(quick: bool = False, repeats: int | None = None, threads: int | None = None) -> dict:
    """`threads`: torch threads in each start (default: this process's); on a machine shared with
    other work, 1 keeps a step from waiting on a second thread that is not running."""
    repeats, threads = repeats or (1 if quick else 3), threads or torch.get_num_threads()
    models = ("tiny-gemma3",) if quick else MODELS
    budget = 8 if quick else 48
    runs: dict[str, list[dict]] = {}
    load_before = os.getloadavg()  # this machine is shared: how busy it was, beside the numbers
    with tempfile.TemporaryDirectory() as folder:
        specs = {}
        for model in models:
            try:
                specs[model] = {"model": model, "mode": "auto", "prompts": _prompts(model, 1 if quick else 3),
                                "budget": budget, "threads": threads}
            except Exception as error:  # a preset this checkout does not have yet
                runs[f"{model}: cold"] = runs[f"{model}: warm"] = [{"error": f"{type(error).__name__}: {error}"}]
        for round_ in range(repeats):
            for model, spec in specs.items():
                cache = os.path.join(folder, f"{model}-{round_}")
                for start in ("cold", "warm"):  # warm: a second start on the cache the cold one filled
                    runs.setdefault(f"{model}: {start}", []).append(
                        run_worker("bench.startup_worker", {**spec, "cache": cache}, timeout=3600))
    summary, rows = {}, []
    for name, results in runs.items():
        summary[name] = {key: spread([r.get(key, float("nan")) for r in results]) for key in KEYS}
        summary[name]["speedup"] = spread([r.get("compiled_tok_s", float("nan")) / r.get("eager_tok_s", float("nan"))
                                           for r in results])
        summary[name]["same_tokens"] = all(r.get("same_tokens") and r.get("same_tokens_while_compiling") for r in results)
        summary[name]["cache"] = [r.get("cache") for r in results]
        errors = [r["error"] for r in results if "error" in r]
        s = summary[name]
        rows.append([name, fmt_spread(s["load_s"], "{:.1f}"), fmt_spread(s["ttft_s"], "{:.2f}"),
                     fmt_spread(s["compile_s"], "{:.1f}"), fmt_spread(s["eager_tok_s"], "{:.1f}"),
                     fmt_spread(s["tok_s_while_compiling"], "{:.1f}"), fmt_spread(s["compiled_tok_s"], "{:.1f}"),
                     fmt_spread(s["speedup"], "{:.2f}", "x"), f"{s['peak_rss_bytes']['median'] / 1e9:.2f}",
                     "yes" if s["same_tokens"] else "NO",
                     errors[0][:80] if errors else ""])
    print_table(f"Chat's default start (--compile background, --quantize auto), batch 1: {budget} new tokens a prompt; "
                "cold = empty compile cache, warm = the cache the cold start filled",
                ["start", "load s", "TTFT s", "compile s", "eager tok/s", "tok/s compiling", "compiled tok/s",
                 "compiled/eager", "peak RSS GB", "same tokens", ""], rows)
    return {"summary": summary, "raw": runs, "budget": budget, "repeats": repeats, "threads": threads,
            "load_average": {"before": load_before, "after": os.getloadavg()}}
