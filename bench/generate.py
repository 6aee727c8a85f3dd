"""Generation throughput, like against like, every number the median (min-max) of interleaved rounds.

1. gpt2-small (random weights), batch 1, 256 new tokens after the chapter's 51-token prompt (the
   first test entry in the Alpaca format, what section 7.7 feeds its `generate`): our KV-cache
   engine against a cacheless loop like the chapter's.
2. Gemma 3 270M, batch 1: our engine against llama.cpp's single stream (`llama-cli`'s way), one
   prompt after another, on the same prompts.
3. Gemma 3 270M, many prompts at once: our batched engine against llama.cpp with parallel slots
   (`llama-server --parallel 16`'s way, on llama-cpp-python's low-level API).

4. Gemma 3 270M, batch 1, chat-sized (16-token prompts, 128 new tokens): our engine with each
   `--quantize` mode against llama.cpp on Q4_K_M (the embedded file) and Q8_0 (exported by us
   from the same weights), each engine in a process of its own: tokens/s, time to first token of a
   500-token prompt, weight bytes read per decoded token, peak RSS.

Same work on both sides: the same prompt token ids, greedy, and exactly `budget` new tokens per
prompt (stop tokens are not honoured, so a different stopping point cannot change the count).
llama.cpp runs the embedded Q4_K_M GGUF (4-bit weights, 8-bit activations), ours fp32 weights
dequantized from it: the same model and tokens, not the same arithmetic.
"""

from __future__ import annotations

import time

import torch

from bench.common import DATA, fmt_spread, print_table, spread


def _entries(count: int) -> list[dict]:
    from instructkit.data.pipeline import prepare_data

    return prepare_data(DATA).splits.test[:count]


def _prompts(quick: bool, count: int) -> list[list[int]]:
    from instructkit.data.prompts import GEMMA
    from instructkit.models.registry import load_model

    tokenizer = load_model("tiny-gemma3").tokenizer  # the embedded model's tokenizer, without its weights
    return [tokenizer.encode(GEMMA.prompt(e)) for e in _entries(count)]


def _ours(model, tokenizer, prompts: list[list[int]], budget: int, one_at_a_time: bool) -> dict:
    from instructkit.decode.generate import generate

    start = time.perf_counter()
    groups = [[p] for p in prompts] if one_at_a_time else [prompts]
    tokens = sum(len(r.token_ids) for group in groups for r in generate(model, tokenizer, group, max_new_tokens=budget))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def cache_vs_cacheless(quick: bool, repeats: int) -> dict:
    from instructkit.data.pipeline import prepare_data
    from instructkit.data.prompts import ALPACA
    from instructkit.decode.generate import generate, generate_cacheless
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


CHAT_QUESTIONS = ["Write a short poem about the sea.", "Explain what a noun is.", "Describe a sunny day in the city."]


def _q8_0_gguf(folder) -> str:
    """The default model's weights as a Q8_0 GGUF, written by our exporter (llama.cpp's own Q8_0 layout)."""
    from instructkit.data.prompts import GEMMA
    from instructkit.export.gguf import write_gguf
    from instructkit.models.registry import load_model

    path = folder / "gemma-3-270m-q8_0.gguf"
    if not path.exists():
        write_gguf(load_model("gemma-3-270m"), GEMMA, path, "q8_0")
    return str(path)


def quantized_decoding(quick: bool, repeats: int) -> dict:
    import tempfile
    from pathlib import Path

    from instructkit.data.prompts import GEMMA
    from instructkit.models.registry import embedded_gguf_path, load_model

    from bench.common import run_worker

    tokenizer = load_model("tiny-gemma3").tokenizer
    prompts = [tokenizer.encode(GEMMA.prompt({"instruction": q})) for q in CHAT_QUESTIONS[: 1 if quick else 3]]
    text = " ".join(GEMMA.prompt(e) for e in _entries(40))
    long_prompt = tokenizer.encode(text)[: 64 if quick else 500]
    budget = 8 if quick else 128
    common = {"prompts": prompts, "budget": budget, "long_prompt": long_prompt, "threads": torch.get_num_threads(),
              "model": "tiny-gemma3" if quick else "gemma-3-270m"}
    with tempfile.TemporaryDirectory() as folder:
        engines = {f"ours, --quantize {mode}": {"engine": "ours", "mode": mode} for mode in ("none", "fp16", "int8", "int4")}
        engines |= {f"ours, --quantize {mode} --compile": {"engine": "ours", "mode": mode, "compile": True}
                    for mode in (("int8",) if quick else ("none", "int8", "int4"))}  # quick: one compile checks the harness
        if not quick:
            engines["llama.cpp Q4_K_M"] = {"engine": "llama.cpp", "gguf": str(embedded_gguf_path())}
            engines["llama.cpp Q8_0"] = {"engine": "llama.cpp", "gguf": _q8_0_gguf(Path(folder))}
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for _ in range(repeats):
            for name, spec in engines.items():
                runs[name].append(run_worker("bench.decode_worker", {**common, **spec}, timeout=1800))

    def stat(name: str, key: str) -> dict:
        return spread([r.get(key, float("nan")) for r in runs[name]])

    rows, summary = [], {}
    for name in engines:
        summary[name] = {key: stat(name, key) for key in ("tok_s", "ttft_s", "bytes_per_token", "peak_rss_bytes", "compile_s")}
        errors = [r["error"] for r in runs[name] if "error" in r]
        compile_s = summary[name]["compile_s"]["median"]
        rows.append([name, fmt_spread(summary[name]["tok_s"], "{:.1f}"), fmt_spread(summary[name]["ttft_s"], "{:.2f}"),
                     f"{summary[name]['bytes_per_token']['median'] / 1e6:,.0f}",
                     f"{summary[name]['peak_rss_bytes']['median'] / 1e9:.2f}",
                     fmt_spread(summary[name]["compile_s"], "{:.1f}") if compile_s > 0 else "", errors[0] if errors else ""])
    ratios = {}
    if not quick:
        for ours, peer in (("ours, --quantize int4", "llama.cpp Q4_K_M"), ("ours, --quantize int8", "llama.cpp Q8_0"),
                           ("ours, --quantize int8", "llama.cpp Q4_K_M"), ("ours, --quantize fp16", "llama.cpp Q8_0"),
                           ("ours, --quantize int8 --compile", "llama.cpp Q8_0"),
                           ("ours, --quantize int4 --compile", "llama.cpp Q4_K_M"),
                           ("ours, --quantize int8 --compile", "llama.cpp Q4_K_M"),
                           ("ours, --quantize int8 --compile", "ours, --quantize int8")):
            ratios[f"{ours} / {peer}"] = spread([a.get("tok_s", float("nan")) / b.get("tok_s", float("nan"))
                                                 for a, b in zip(runs[ours], runs[peer])])
    print_table(f"Gemma 3 270M, batch 1: {len(prompts)} chat prompts x exactly {budget} new tokens; time to first "
                f"token of a {len(long_prompt)}-token prompt", ["engine", "tok/s", "TTFT s", "MB read/token", "peak RSS GB",
                                                  "compile s", ""],
                rows + [[k, fmt_spread(v, "{:.2f}", "x"), "", "", "", "", ""] for k, v in ratios.items()])
    return {"summary": summary, "ratios": ratios, "raw": runs, "budget": budget, "prompt_tokens": [len(p) for p in prompts],
            "long_prompt_tokens": len(long_prompt)}


def run(quick: bool = False, repeats: int | None = None) -> dict:
    repeats = repeats or (1 if quick else 3)
    return {"cache": cache_vs_cacheless(quick, repeats), "gemma": gemma_vs_llama_cpp(quick, repeats),
            "quantized": quantized_decoding(quick, repeats), "repeats": repeats}
