"""Text generation, apart from the models: a pure `sample_next_token` and a KV-cache engine.

`generate` runs a batch of prompts of different lengths together. Prompts are prefilled in
groups of similar length (left-padded, so little padding), and the groups' caches are merged
for decoding; each row has its own positions (starting at 0 on its first real token) and
padding is masked, so a row's tokens do not depend on what else is in the batch. Finished rows
leave the batch, so the cost of each step follows the rows still generating.
`generate_cacheless` is the chapter's loop (re-run the whole context each step, cut to the
context length); it is kept as a reference and a benchmark baseline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from instructkit.models.attention import KVCache
from instructkit.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


def sample_next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy when temperature is 0."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)


@dataclass
class Generated:
    token_ids: list[int]  # generated tokens, without the prompt and without the stop token
    text: str
    finish_reason: str  # "stop_token", "stop_string", "length"


def _generator(sampling: Sampling) -> torch.Generator | None:
    """A generator of its own for sampling: seeded when asked, else from the OS's entropy. Never
    the global one (torch.seed() would reseed it, changing every later draw of the program)."""
    if sampling.temperature <= 0:
        return None
    seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(seed)


def _cut_at_stop_string(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(stop) for stop in stop_strings if stop and stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _fit_prompt(prompt: list[int], max_new_tokens: int, context_length: int) -> list[int]:
    """Keep the end of a prompt so that prompt + new tokens fit the context (the chapter's cut)."""
    room = max(1, context_length - max_new_tokens)
    return prompt[-room:]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 256,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    sampling: Sampling = Sampling(),
    on_token: Callable[[int, int], None] | None = None,
    prefill_batch: int = 16,
) -> list[Generated]:
    """Generate for every prompt (lists of token ids) in one batch with a KV cache."""
    if not prompts:
        return []
    context = model.config.context_length
    max_new_tokens = min(max_new_tokens, context - 1)
    prompts = [_fit_prompt(list(p), max_new_tokens, context) for p in prompts]
    batch, width = len(prompts), max(len(p) for p in prompts)
    device = model.lm_head.weight.device
    # Prefill in groups of similar length (little padding), then decode all rows together from
    # one merged cache. Rows are processed in length order; results go back in input order.
    order = sorted(range(batch), key=lambda row: len(prompts[row]))
    caches, last_logits, next_position = [], [], []
    for start in range(0, batch, prefill_batch):
        group = [prompts[row] for row in order[start : start + prefill_batch]]
        # A lone group keeps its own cache, so it needs room for the new tokens.
        room = max_new_tokens if batch <= prefill_batch else 0
        cache, logits, positions = _prefill(model, group, tokenizer.pad_id, room, device)
        caches.append(cache)
        last_logits.append(logits)
        next_position.append(positions)
    cache = caches[0] if len(caches) == 1 else KVCache.merge(caches, width + max_new_tokens)
    logits = torch.cat(last_logits)
    next_position = torch.cat(next_position)

    stop_set = set(stop_ids)
    generator = _generator(sampling)
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * batch
    texts = [""] * batch
    active = list(order)  # original row of each batch row
    for step in range(max_new_tokens):
        tokens = sample_next_token(logits, sampling, generator).tolist()
        keep = []
        for slot, (row, token) in enumerate(zip(active, tokens)):
            if token in stop_set:
                reasons[row] = "stop_token"
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if stop_strings:
                texts[row], hit = _cut_at_stop_string(tokenizer.decode(outputs[row]), stop_strings)
                if hit:
                    reasons[row] = "stop_string"
                    continue
            keep.append(slot)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep)
            cache.keep_rows(rows.to(device))
            next_position = next_position[rows]
            active = [active[slot] for slot in keep]
            tokens = [tokens[slot] for slot in keep]
        step_input = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        step_positions = next_position[:, None].to(device)
        hidden = model(step_input, positions=step_positions, cache=cache, return_hidden=True)
        logits = model.head(hidden[:, -1])
        next_position = next_position + 1

    results = []
    for row in range(batch):
        text = texts[row] if reasons[row] == "stop_string" else tokenizer.decode(outputs[row])
        results.append(Generated(outputs[row], text, reasons[row]))
    return results


def _prefill(model, prompts: list[list[int]], pad_id: int, extra: int, device):
    """Left-pad one group, run it through the model into a fresh cache with `extra` free slots.
    Returns the cache, the last position's logits (B, V) and each row's next position (B,)."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    valid = torch.zeros((batch, width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        valid[row, width - len(prompt):] = True
    # Each row counts positions from its first real token; padding sits at position 0 (masked).
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    cache = model.new_cache(batch, width + extra, device=device)
    hidden = model(input_ids.to(device), positions=positions.to(device), valid=valid.to(device),
                   cache=cache, return_hidden=True)
    return cache, model.head(hidden[:, -1]), positions[:, -1] + 1


@torch.no_grad()
def generate_cacheless(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: list[int],
    *,
    max_new_tokens: int = 256,
    stop_ids: Sequence[int] = (),
    sampling: Sampling = Sampling(),
) -> Generated:
    """The chapter's `generate`: each step re-runs the last `context_length` tokens."""
    context = model.config.context_length
    device = model.lm_head.weight.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = _generator(sampling)
    new: list[int] = []
    reason = "length"
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])[:, -1]
        token = int(sample_next_token(logits, sampling, generator)[0])
        if token in stop_ids:
            reason = "stop_token"
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return Generated(new, tokenizer.decode(new), reason)


def stream_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: list[int],
    **kwargs,
) -> Iterator[str]:
    """Yield text pieces as tokens arrive (for chat). Holds back incomplete UTF-8 characters."""
    import queue
    import threading

    pieces: queue.Queue = queue.Queue()
    generated: list[int] = []
    emitted = [0]

    def on_token(_row: int, token: int) -> None:
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd") and len(text) > emitted[0]:
            pieces.put(text[emitted[0]:])
            emitted[0] = len(text)

    def run() -> None:
        try:
            final = generate(model, tokenizer, [prompt], on_token=on_token, **kwargs)[0]
            if len(final.text) > emitted[0] and final.finish_reason != "stop_string":
                pieces.put(final.text[emitted[0]:])
        finally:
            pieces.put(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while (piece := pieces.get()) is not None:
        yield piece
    worker.join()
