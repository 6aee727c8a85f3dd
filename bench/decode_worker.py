"""One engine's batch-1 decoding in a process of its own (so its peak RSS is its own).

Spec (JSON, argv[1]): {"engine": "ours", "mode": "none|fp16|int8|int4", "compile": bool} or
{"engine": "llama.cpp", "gguf": PATH}, plus "prompts" (token id lists), "budget" (new tokens per
prompt, exactly: stop tokens are not honoured) and "long_prompt" (ids for the time to first token).
Prints one JSON line: tokens/s over all prompts, time to first token of the long prompt, bytes of
weights read per decoded token, peak RSS. Loading is not timed; compiling the decode step
(`--compile`) is timed on its own.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from bench.common import peak_rss_bytes


def _weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer's stored form (the tied head in
    full, through whatever stands in for it), norms, one embedding row. Shortlist rescoring reads
    32 rows more: noise next to the rest, counted all the same."""
    from instructkit.decode.quantize import (SHORTLIST, Fp16Linear, Int4GroupLinear, Int4Linear, Int8GroupLinear,
                                             Int8RowLinear, ShortlistHead)

    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, Fp16Linear):
            total += module.weight16.numel() * 2
        elif isinstance(module, Int8GroupLinear):
            total += module.q.numel() + module.scale.numel() * 4
        elif isinstance(module, Int4GroupLinear):
            total += module.packed.numel() + (module.scale.numel() + module.low.numel()) * 2
        elif isinstance(module, Int8RowLinear):
            total += module.out_features * (module.in_features + 4)
        elif isinstance(module, Int4Linear):
            total += module.packed.numel() * module.packed.element_size() + module.scales_and_zeros.numel() * 4
        elif isinstance(module, ShortlistHead):
            total += SHORTLIST * module.exact_weight.shape[1] * 4
        elif "norm" in type(module).__name__.lower():
            total += sum(p.numel() * 4 for p in module.parameters(recurse=False))
    return total + model.config.emb_dim * 4


def ours(spec: dict) -> dict:
    from instructkit.decode.generate import generate
    from instructkit.decode.load import prepare_for_decoding
    from instructkit.models.registry import load_model

    # The loader every command uses, in two calls so that the compile is timed on its own.
    loaded = prepare_for_decoding(load_model(spec["model"]), quantize=spec["mode"])
    began = time.perf_counter()
    prepare_for_decoding(loaded, compile=bool(spec.get("compile")))
    compile_s = time.perf_counter() - began if spec.get("compile") else 0.0
    model, tokenizer = loaded.model, loaded.tokenizer
    generate(model, tokenizer, [spec["prompts"][0]], max_new_tokens=4)  # warm-up (allocator, packing)
    start, tokens = time.perf_counter(), 0
    for prompt in spec["prompts"]:
        tokens += len(generate(model, tokenizer, [prompt], max_new_tokens=spec["budget"])[0].token_ids)
    seconds = time.perf_counter() - start
    began = time.perf_counter()
    generate(model, tokenizer, [spec["long_prompt"]], max_new_tokens=1)
    ttft = time.perf_counter() - began
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "ttft_s": ttft,
            "bytes_per_token": _weight_bytes_per_token(model), "compile_s": compile_s}


def llama_cpp(spec: dict) -> dict:
    import gguf

    from bench import llamacpp

    threads = torch.get_num_threads()
    result = llamacpp.single_stream(spec["gguf"], spec["prompts"], spec["budget"], set(), threads)
    long = llamacpp.single_stream(spec["gguf"], [spec["long_prompt"]], 1, set(), threads)
    reader = gguf.GGUFReader(spec["gguf"])
    weights = sum(int(tensor.n_bytes) for tensor in reader.tensors)  # the tied output reads token_embd whole
    return {"tokens": result["tokens"], "seconds": result["seconds"], "tok_s": result["tok_s"],
            "ttft_s": long["ttft_s"][0], "bytes_per_token": weights}


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    result = ours(spec) if spec["engine"] == "ours" else llama_cpp(spec)
    print(json.dumps({**result, "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    main()
