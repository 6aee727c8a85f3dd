"""llama.cpp as the generation peer, through llama-cpp-python's own API.

- `single_stream`: one prompt after another (what `llama-cli` does), with the high-level API.
- `parallel_slots`: what `llama-server --parallel N` does, on the low-level API: N sequences share
  one context, every decode step advances each busy slot by one token in one llama_decode call,
  and a finished slot takes the next prompt (continuous batching). Greedy, argmax over the logits.

Tokens are counted the same way on every side: generated tokens up to (not including) a stop
token, at most `budget` per prompt.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np


def single_stream(gguf: str, prompts: list[list[int]], budget: int, stops: set[int], threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(gguf, n_ctx=max(len(p) for p in prompts) + budget + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    start, tokens, first_token = time.perf_counter(), 0, []
    for prompt in prompts:
        count, began = 0, time.perf_counter()
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if count == 0:
                first_token.append(time.perf_counter() - began)
            if token in stops:
                break
            count += 1
            if count >= budget:  # accepted the last token: no decode for a token nobody reads
                break
        tokens += count
    seconds = time.perf_counter() - start
    del llm
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "ttft_s": first_token}


class _Batch:
    def __init__(self, capacity: int):
        import llama_cpp

        self.lib, self.capacity = llama_cpp, capacity
        self.batch = llama_cpp.llama_batch_init(capacity, 0, 1)

    def fill(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence id, want logits)."""
        batch = self.batch
        batch.n_tokens = len(items)
        for i, (token, position, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits

    def free(self) -> None:
        self.lib.llama_batch_free(self.batch)


def parallel_slots(gguf: str, prompts: list[list[int]], budget: int, stops: set[int], threads: int,
                   slots: int = 16) -> dict:
    import llama_cpp

    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(gguf.encode(), model_params)
    per_seq = max(len(p) for p in prompts) + budget + 8
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = per_seq * slots, 512, 512
    params.n_seq_max, params.n_threads, params.n_threads_batch = slots, threads, threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    memory = llama_cpp.llama_get_memory(ctx)
    vocab = llama_cpp.llama_n_vocab(llama_cpp.llama_model_get_vocab(model))
    batch = _Batch(max(512, slots))

    def logits_of(index: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(ctx, index)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(vocab,))

    def prefill(slot: int, prompt: list[int]) -> int:
        """Run a prompt into a slot's sequence (in chunks of the batch size); its first token."""
        llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)
        for begin in range(0, len(prompt), 512):
            chunk = prompt[begin : begin + 512]
            batch.fill([(t, begin + i, slot, begin + i == len(prompt) - 1) for i, t in enumerate(chunk)])
            if llama_cpp.llama_decode(ctx, batch.batch) != 0:
                raise RuntimeError("llama_decode failed during prefill")
        return int(logits_of(len(chunk) - 1).argmax())

    queue = list(range(len(prompts)))
    active: dict[int, dict] = {}  # slot -> {"position", "next" (accepted, not yet decoded), "count"}
    start, generated, first_token = time.perf_counter(), 0, []

    def accept(slot: int, token: int, state: dict) -> None:
        """Take a new token for a slot, or retire the slot (stop token, or its budget reached) and
        give it the next prompt."""
        nonlocal generated
        if token not in stops:
            state["count"] += 1
            state["next"] = token
        if token in stops or state["count"] >= budget:
            generated += state["count"]
            active.pop(slot, None)
            if queue:
                admit(slot)
        else:
            active[slot] = state

    def admit(slot: int) -> None:
        index = queue.pop(0)
        began = time.perf_counter()
        token = prefill(slot, prompts[index])
        first_token.append(time.perf_counter() - began)
        accept(slot, token, {"position": len(prompts[index]), "next": None, "count": 0})

    for slot in range(min(slots, len(queue))):
        admit(slot)
    while active:
        order = sorted(active)
        batch.fill([(active[s]["next"], active[s]["position"], s, True) for s in order])
        if llama_cpp.llama_decode(ctx, batch.batch) != 0:
            raise RuntimeError("llama_decode failed")
        chosen = [int(logits_of(i).argmax()) for i in range(len(order))]  # before any refill overwrites the logits
        for slot, token in zip(order, chosen):
            state = active[slot]
            state["position"] += 1
            accept(slot, token, state)
    seconds = time.perf_counter() - start
    batch.free()
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return {"tokens": generated, "seconds": seconds, "tok_s": generated / seconds, "slots": slots,
            "ttft_s": first_token}
