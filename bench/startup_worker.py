"""One start of chat's default decoding in a process of its own: load, answer eagerly while the
decode step compiles in the background (decode/background.py), then answer through it.

Spec (JSON, argv[1]): "model", "mode" (--quantize), "prompts" (token id lists), "budget" (new
tokens per prompt, exactly: stop tokens are not honoured), "threads", "cache" (the compile-cache
folder: empty for a cold start, the one a cold start filled for a warm one). Prints one JSON line:
load seconds; time to first token of the first answer (eager, the compile running); seconds from
the compile's start to the switch; eager tokens/s alone, eager tokens/s while compiling, compiled
tokens/s; whether the compiled step's greedy tokens equal the eager ones; compile-cache hits and
misses (a warm start has hits only).
"""

from __future__ import annotations

import json
import os
import sys
import time


def _answers(model, tokenizer, prompts, budget, until=None) -> tuple[list[list[int]], int, float, float | None]:
    """Greedy answers, one prompt at a time; stops early (between tokens) once `until()` is true.
    Returns (answers, tokens, seconds, first token's seconds)."""
    from instructkit.decode.generate import stream_tokens

    answers, tokens, first, started = [], 0, None, time.perf_counter()
    for prompt in prompts:
        answer = []
        for token in stream_tokens(model, tokenizer, prompt, max_new_tokens=budget, stop_ids=()):
            if until is not None and until():
                break
            answer.append(token)
            first = first if first is not None else time.perf_counter() - started
        answers.append(answer)
        tokens += len(answer)
        if until is not None and until():
            break
    return answers, tokens, time.perf_counter() - started, first


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = spec["cache"]  # before instructkit reads it (compile_cache.py)
    import torch

    from instructkit.decode.background import compile_in_background
    from instructkit.decode.compile_cache import cache_counts
    from instructkit.decode.load import prepare_for_decoding
    from instructkit.models.registry import load_model

    from bench.common import peak_rss_bytes

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    began = time.perf_counter()
    loaded = prepare_for_decoding(load_model(spec["model"]), quantize=spec["mode"])
    load_s = time.perf_counter() - began
    model, tokenizer, prompts, budget = loaded.model, loaded.tokenizer, spec["prompts"], spec["budget"]
    # The start a user sees: the compile begins and the first answer streams at once, eagerly.
    handle = compile_in_background(model, quiet=True)
    during, during_tokens, during_s, ttft = _answers(model, tokenizer, prompts * 100, budget, until=handle.done.is_set)
    handle.wait()
    if handle.state != "compiled":
        print(json.dumps({"error": handle.error, "load_s": load_s}))
        return
    static_step = model.static_step
    del model.static_step  # eager alone, for the reference speed and tokens
    _answers(model, tokenizer, prompts[:1], 4)  # warm-up
    eager, eager_tokens, eager_s, _ = _answers(model, tokenizer, prompts, budget)
    model.static_step = static_step
    _answers(model, tokenizer, prompts[:1], 4)
    compiled, compiled_tokens, compiled_s, _ = _answers(model, tokenizer, prompts, budget)
    print(json.dumps({
        "load_s": load_s, "ttft_s": ttft, "compile_s": handle.seconds,
        "tok_s_while_compiling": during_tokens / during_s if during_tokens else float("nan"),
        "tokens_while_compiling": during_tokens,
        "eager_tok_s": eager_tokens / eager_s, "compiled_tok_s": compiled_tokens / compiled_s,
        "same_tokens": compiled == eager,
        "same_tokens_while_compiling": all(d == eager[i % len(eager)][: len(d)] for i, d in enumerate(during)),
        "graph_breaks": static_step.graph_breaks,
        "cache": cache_counts(), "peak_rss_bytes": peak_rss_bytes(),
    }))


if __name__ == "__main__":
    main()
