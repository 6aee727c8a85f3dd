"""Text generation, apart from the models: the front ends of the engine in decoder.py.

`generate` (a whole test split at once), `stream_tokens` (a chat, one token at a time, as a plain
generator) and `stream_text` read `Decoder` directly; the server's continuous batching does too
(serve/worker.py). `TextStream` turns a growing list of token ids into text pieces the way chat
and serving need: only the new suffix of the decoded text, never half a UTF-8 character, never
the start of a stop string that is later cut.

`generate_cacheless` is the chapter's loop (re-run the whole context each step, cut to the
context length); it is kept as a reference and a benchmark baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

# The engine's names, re-exported: callers import them from here.
from instructkit.decode.decoder import (  # noqa: F401
    GREEDY_BELOW,
    Decoder,
    Request,
    Sampling,
    _fit_prompt,
    _generator,
    prefill,
    repeats_itself,
    sample_next_token,
)
from instructkit.models.tokenizer import Tokenizer


class TextStream:
    """Text pieces from a growing list of token ids: each call decodes the whole list and returns
    only the new suffix, holding back a trailing incomplete UTF-8 character (decoded as U+FFFD)
    and any trailing text that could still become a stop string. A stop string ends the text
    before it; `stopped` says so."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ""  # what has been given out
        self.stopped = False

    def _safe_end(self, full: str) -> int:
        end = len(full)
        while end and full[end - 1] == "\ufffd":
            end -= 1
        for stop in self.stop_strings:  # the longest tail that is the start of a stop string
            for size in range(min(len(stop) - 1, end), 0, -1):
                if full[end - size : end] == stop[:size]:
                    end -= size
                    break
        return max(end, len(self.text))

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        cuts = [full.find(stop, max(0, len(self.text) - len(stop))) for stop in self.stop_strings]
        cuts = [cut for cut in cuts if cut >= 0]
        if cuts:
            self.stopped = True
            return self._give(full[: min(cuts)])
        return self._give(full[: self._safe_end(full)])

    def finish(self) -> str:
        """The held-back rest once no more tokens come (a partial stop string is just text then)."""
        if self.stopped:
            return ""
        return self._give(self.tokenizer.decode(self.ids))

    def _give(self, text: str) -> str:
        piece = text[len(self.text):] if len(text) > len(self.text) else ""
        self.text = text if len(text) > len(self.text) else self.text
        return piece


@dataclass
class Generated:
    token_ids: list[int]  # generated tokens, without the prompt and without the stop token
    text: str
    finish_reason: str  # "stop_token", "stop_string", "length", "repeat"


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
    repeat_stop: int = 0,
    max_batch: int | None = None,
    on_finished: Callable[[int, Generated], None] | None = None,
) -> list[Generated]:
    """Generate for every prompt (lists of token ids) with a KV cache. With a seed, row i samples
    from seed + i, so its tokens do not depend on the other rows. `repeat_stop`: see Request.

    `max_batch`: at most that many rows decode at once, the next prompts joining as rows finish
    (continuous batching: one long answer no longer keeps a batch of finished rows waiting);
    None: every prompt at once. `on_finished(row, result)` is called as each row ends, so a caller
    can keep finished rows before the others end."""
    if not prompts:
        return []
    requests = [Request(list(p), max_new_tokens, frozenset(stop_ids),
                        Sampling(sampling.temperature, sampling.top_k, sampling.top_p,
                                 None if sampling.seed is None else sampling.seed + row), repeat_stop=repeat_stop)
                for row, p in enumerate(prompts)]
    row_of = {request: row for row, request in enumerate(requests)}
    streams = [TextStream(tokenizer, stop_strings) for _ in requests]
    results: list[Generated | None] = [None] * len(requests)
    decoder = Decoder(model, tokenizer.pad_id, prefill_batch=prefill_batch)
    limit = max_batch or len(requests)
    waiting, live = list(requests), set()

    def admit() -> None:
        # Join in groups (a join prefills and copies the running cache into a merged one): when a
        # quarter of the batch is free (or what is left to join), or the batch has emptied.
        free = limit - len(decoder)
        if waiting and (free >= min(prefill_batch, len(waiting), max(1, limit // 4)) or not len(decoder)):
            joining, waiting[:free] = waiting[:free], []
            live.update(joining)
            decoder.join(joining)

    def collect() -> None:
        for request in [r for r in live if r.finished]:
            live.discard(request)
            row, stream = row_of[request], streams[row_of[request]]
            reason = "stop_string" if stream.stopped else request.finish_reason
            text = stream.text if stream.stopped else tokenizer.decode(request.tokens)
            results[row] = Generated(request.tokens, text, reason)
            if on_finished is not None and request.error is None:
                on_finished(row, results[row])

    admit()
    while len(decoder) or waiting:
        for request, token in decoder.step():
            row = row_of[request]
            if on_token is not None:
                on_token(row, token)
            if stop_strings:
                streams[row].push(token)
                if streams[row].stopped:
                    request.cancelled = "stop_string"
        collect()
        admit()
    collect()
    failed = next((request.error for request in requests if request.error is not None), None)
    if failed is not None:  # offline generation has no row to spare: the caller sees the failure
        raise failed
    return results


def stream_tokens(model: torch.nn.Module, tokenizer: Tokenizer, prompt: list[int], *, max_new_tokens: int = 256,
                  stop_ids: Sequence[int] = (), sampling: Sampling = Sampling()) -> Iterator[int]:
    """Token ids one at a time, as a plain generator (chat reads it directly); closing the
    generator stops the decoding."""
    decoder = Decoder(model, tokenizer.pad_id)
    request = Request(list(prompt), max_new_tokens, frozenset(stop_ids), sampling)
    decoder.join([request])
    while len(decoder):
        for _, token in decoder.step():
            yield token
    if request.error is not None:
        raise request.error


def stream_text(model: torch.nn.Module, tokenizer: Tokenizer, prompt: list[int], *, max_new_tokens: int = 256,
                stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), sampling: Sampling = Sampling()) -> Iterator[str]:
    """Text pieces as tokens arrive (TextStream's rules)."""
    stream = TextStream(tokenizer, stop_strings)
    for token in stream_tokens(model, tokenizer, prompt, max_new_tokens=max_new_tokens, stop_ids=stop_ids, sampling=sampling):
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    if rest := stream.finish():
        yield rest


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
    device = next(model.parameters()).device
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
