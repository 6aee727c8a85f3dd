"""Generation throughput, like against like, every number the median (min-max) of interleaved rounds.

1. gpt2-small (random weights), batch 1, 256 new tokens after the chapter's 51-token prompt (the
   first test entry in the Alpaca format, what section 7.7 feeds its `generate`): our KV-cache
   engine against a cacheless loop like the chapter's.
2. Gemma 3 270M, batch 1: our engine against llama.cpp's single stream (`llama-cli`'s way), one
   prompt after another, on the same prompts.
3. Gemma 3 270M, many prompts at once: our batched engine against llama.cpp with parallel slots
   (`llama-server --parallel 16`'s way, on llama-cpp-python's low-level API).

Same work on both sides: the same prompt token ids, greedy, and exactly `budget` new tokens per
prompt (stop tokens are not honoured, so a different stopping point cannot change the count).
llama.cpp runs the embedded Q4_K_M GGUF (4-bit weights, 8-bit activations), ours fp32 weights
dequantized from it: the same model and tokens, not the same arithmetic.
"""

from __future__ import annotations

import time

import torch

from bench.common import DATA, fmt_spread, print_table, spread


def _prompts(quick: bool, count: int) -> list[list[int]]:
    from instructkit.data.pipeline import prepare_data
    from instructkit.data.prompts import GEMMA
    from instructkit.models.registry import load_model

    tokenizer = load_model("tiny-gemma3").tokenizer  # the embedded model's tokenizer, without its weights
    return [tokenizer.encode(GEMMA.prompt(e)) for e in prepare_data(DATA).splits.test[:count]]


def _ours(model, tokenizer, prompts: list[list[int]], budget: int, one_at_a_time: bool) -> dict:
    from instructkit.generate import generate

    start = time.perf_counter()
    groups = [[p] for p in prompts] if one_at_a_time else [prompts]
    tokens = sum(len(r.token_ids) for group in groups for r in generate(model, tokenizer, group, max_new_tokens=budget))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def cache_vs_cacheless(quick: bool, repeats: int) -> dict:
    from instructkit.data.pipeline import prepare_data
    from instructkit.data.prompts import ALPACA
    from instructkit.generate import generate, generate_cacheless
    from instructkit.models.registry import load_model

    loaded = load_model("tiny-gpt2" if quick else "random:gpt2-small")
    tokenizer, model = loaded.tokenizer, loaded.model
    prompt = tokenizer.encode(ALPACA.prompt(prepare_data(DATA).splits.test[0]))
    new = 32 if quick else 256
    generate(model, tokenizer, [prompt], max_new_tokens=4)  # warm-up
    runs = {"KV cache": [], "cacheless (chapter)": []}
    for _ in range(repeats):
        for name, function in (("KV cache", lambda: generate(model, tokenizer, [prompt], max_new_tokens=new)[0]),
                               ("cacheless (chapter)", lambda: generate_cacheless(model, tokenizer, prompt, max_new_tokens=new))):
            start = time.perf_counter()
            result = function()
            runs[name].append(len(result.token_ids) / (time.perf_counter() - start))
    speedup = spread([a / b for a, b in zip(runs["KV cache"], runs["cacheless (chapter)"])])
    print_table(f"{'tiny-gpt2' if quick else 'gpt2-small'} generation, batch 1, {len(prompt)}-token prompt, {new} new tokens",
                ["engine", "tok/s"], [[k, fmt_spread(spread(v), "{:.1f}")] for k, v in runs.items()]
                + [["speedup", fmt_spread(speedup, "{:.1f}", "x")]])
    return {"tok_s": {k: spread(v) for k, v in runs.items()}, "speedup": speedup, "prompt_tokens": len(prompt),
            "new_tokens": new, "raw": runs}


def gemma_vs_llama_cpp(quick: bool, repeats: int) -> dict:
    from instructkit.models.registry import embedded_gguf_path, load_model

    from bench import llamacpp

    threads = torch.get_num_threads()
    loaded = load_model("tiny-gemma3" if quick else "gemma-3-270m")
    single_prompts, batch_prompts = _prompts(quick, 2 if quick else 8), _prompts(quick, 12 if quick else 110)
    single_budget, batch_budget = (8, 8) if quick else (64, 64)
    gguf = str(embedded_gguf_path())
    runs: dict[str, list[dict]] = {}
    plan = [
        ("batch 1: ours", lambda: _ours(loaded.model, loaded.tokenizer, single_prompts, single_budget, True)),
        ("batch 1: llama.cpp single stream", lambda: llamacpp.single_stream(gguf, single_prompts, single_budget, set(), threads)),
        ("batched: ours", lambda: _ours(loaded.model, loaded.tokenizer, batch_prompts, batch_budget, False)),
        ("batched: llama.cpp, 16 parallel slots",
         lambda: llamacpp.parallel_slots(gguf, batch_prompts, batch_budget, set(), threads, slots=16)),
    ]
    for _ in range(repeats):
        for name, function in plan:
            try:
                runs.setdefault(name, []).append(function())
            except ImportError:
                runs.setdefault(name, []).append({"error": "llama-cpp-python not installed"})
    tok_s = {name: spread([r.get("tok_s", float("nan")) for r in results]) for name, results in runs.items()}
    ratios = {}
    for ours, peer in (("batch 1: ours", "batch 1: llama.cpp single stream"),
                       ("batched: ours", "batched: llama.cpp, 16 parallel slots")):
        ratios[f"{ours} / {peer.split(': ', 1)[1]}"] = spread(
            [a.get("tok_s", float("nan")) / b.get("tok_s", float("nan")) for a, b in zip(runs[ours], runs[peer])])
    print_table(f"Gemma 3 270M, greedy, exactly {single_budget} new tokens per prompt: "
                f"{len(single_prompts)} prompts one at a time, {len(batch_prompts)} together",
                ["engine", "tok/s"], [[k, fmt_spread(v, "{:.1f}")] for k, v in tok_s.items()]
                + [[k, fmt_spread(v, "{:.2f}", "x")] for k, v in ratios.items()])
    return {"tok_s": tok_s, "ratios": ratios, "raw": runs, "budget": single_budget,
            "prompts": {"single": len(single_prompts), "batched": len(batch_prompts)}}


def run(quick: bool = False, repeats: int | None = None) -> dict:
    repeats = repeats or (1 if quick else 3)
    return {"cache": cache_vs_cacheless(quick, repeats), "gemma": gemma_vs_llama_cpp(quick, repeats), "repeats": repeats}
