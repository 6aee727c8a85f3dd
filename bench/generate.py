"""Generation throughput.

1. gpt2-small config (random weights), batch 1, 256 new tokens: our KV-cache engine against a
   cacheless loop like the chapter's (target: >= 10x). The prompt is what the chapter feeds its
   `generate` in section 7.7: the first test entry in the Alpaca format (random weights never
   emit the end token, so both run the full 256 tokens).
2. Gemma 3 270M, the chapter's 110 test prompts (gemma prompt style), greedy: our batched
   KV-cache engine (aggregate tokens/s) against llama.cpp's single-stream generation of the
   same prompts on the same GGUF, with the same token budget per prompt.
"""

from __future__ import annotations

import time

import torch

from bench.common import DATA, print_table


def cache_vs_cacheless(quick: bool) -> dict:
    from instructkit.data.pipeline import prepare_data
    from instructkit.data.prompts import ALPACA
    from instructkit.generate import generate, generate_cacheless
    from instructkit.models.registry import load_model

    loaded = load_model("tiny-gpt2" if quick else "random:gpt2-small")
    tokenizer, model = loaded.tokenizer, loaded.model
    prompt = tokenizer.encode(ALPACA.prompt(prepare_data(DATA).splits.test[0]))
    new = 32 if quick else 256
    generate(model, tokenizer, [prompt], max_new_tokens=4)  # warm-up
    rows = {}
    for name, function in (("KV cache", lambda: generate(model, tokenizer, [prompt], max_new_tokens=new)[0]),
                           ("cacheless (chapter)", lambda: generate_cacheless(model, tokenizer, prompt, max_new_tokens=new))):
        start = time.perf_counter()
        result = function()
        seconds = time.perf_counter() - start
        rows[name] = {"tokens": len(result.token_ids), "seconds": seconds, "tok_s": len(result.token_ids) / seconds}
    rows["speedup"] = rows["KV cache"]["tok_s"] / rows["cacheless (chapter)"]["tok_s"]
    print_table(f"{'tiny-gpt2' if quick else 'gpt2-small'} generation, batch 1, {len(prompt)}-token prompt, {new} new tokens",
                ["engine", "tokens", "seconds", "tok/s"],
                [[k, v["tokens"], v["seconds"], v["tok_s"]] for k, v in rows.items() if k != "speedup"]
                + [["speedup", "", "", f"{rows['speedup']:.1f}x"]])
    return {**rows, "prompt_tokens": len(prompt)}


def test_set_generation(quick: bool) -> dict:
    from instructkit.data.pipeline import prepare_data
    from instructkit.data.prompts import GEMMA
    from instructkit.data.tokenize import end_token_id
    from instructkit.generate import generate
    from instructkit.models.registry import embedded_gguf_path, load_model

    loaded = load_model("gemma-3-270m")
    tokenizer, model = loaded.tokenizer, loaded.model
    entries = prepare_data(DATA).splits.test[: 12 if quick else 110]
    prompts = [tokenizer.encode(GEMMA.prompt(e)) for e in entries]
    budget = 16 if quick else 64  # the base model rarely stops: a fixed budget makes the work equal
    stops = [tokenizer.eos_id, end_token_id(GEMMA, tokenizer)]
    start = time.perf_counter()
    ours = generate(model, tokenizer, prompts, max_new_tokens=budget, stop_ids=stops)
    ours_seconds = time.perf_counter() - start
    ours_tokens = sum(len(r.token_ids) for r in ours)
    result = {"ours": {"tokens": ours_tokens, "seconds": ours_seconds, "tok_s": ours_tokens / ours_seconds}}
    try:
        import llama_cpp

        llm = llama_cpp.Llama(str(embedded_gguf_path()), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
        start, tokens = time.perf_counter(), 0
        for prompt in prompts:  # single stream: one prompt after another
            count = 0
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                if token in stops or count >= budget:
                    break
                count += 1
            tokens += count
        seconds = time.perf_counter() - start
        result["llama.cpp"] = {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}
    except ImportError:
        result["llama.cpp"] = {"error": "llama-cpp-python not installed"}
    rows = [[name, v.get("tokens", "-"), v.get("seconds", float("nan")), v.get("tok_s", float("nan"))] for name, v in result.items()]
    if "tok_s" in result.get("llama.cpp", {}):
        result["ratio"] = result["ours"]["tok_s"] / result["llama.cpp"]["tok_s"]
        rows.append(["ours / llama.cpp", "", "", f"{result['ratio']:.2f}x"])
    print_table(f"Gemma 3 270M, {len(prompts)} test prompts, greedy, up to {budget} new tokens each",
                ["engine", "tokens", "seconds", "aggregate tok/s"], rows)
    return result


def run(quick: bool = False) -> dict:
    return {"cache": cache_vs_cacheless(quick), "test_set": test_set_generation(quick)}
