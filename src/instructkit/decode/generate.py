"""Text generation, apart from the models: a pure `sample_next_token` and a KV-cache engine.

`Decoder` holds sequences that decode together from one KV cache. Requests join between steps
(prefilled in groups of similar length, left-padded, then merged into the running cache,
right-aligned) and leave when they finish, so one batch serves a changing set of requests: what
`generate` (a whole test split at once), `stream_tokens` (a chat, one token at a time, as a plain
generator) and the server's continuous batching are built on. Each row has its own positions
(starting at 0 on its first real token) and padding is masked, so a row's tokens do not depend on
what else is in the batch; each row samples with its own generator, for the same reason.

`TextStream` turns a growing list of token ids into text pieces the way chat and serving need:
only the new suffix of the decoded text, never half a UTF-8 character, never the start of a stop
string that is later cut.

`generate_cacheless` is the chapter's loop (re-run the whole context each step, cut to the
context length); it is kept as a reference and a benchmark baseline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from instructkit.decode.vocabulary import greedy
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
        return greedy(logits)
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


def _generator(sampling: Sampling) -> torch.Generator | None:
    """A generator of its own for sampling: seeded when asked, else from the OS's entropy. Never
    the global one (torch.seed() would reseed it, changing every later draw of the program)."""
    if sampling.temperature <= 0:
        return None
    seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(seed)


@dataclass(eq=False)
class Request:
    """One sequence to decode. `cancelled` may be set from another thread: the row leaves the
    batch at the next step."""

    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    sampling: Sampling = Sampling()
    tokens: list[int] = field(default_factory=list)  # generated, without the stop token
    finish_reason: str | None = None  # "stop_token", "length", "repeat", or what cancelled it
    # > 0: end the row when its last `repeat_stop` tokens already appeared, in that order, earlier
    # in its output (greedy decoding in a loop), dropping the repeat.
    repeat_stop: int = 0
    cancelled: str | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        self.stop_ids = frozenset(self.stop_ids)
        if self.generator is None:
            self.generator = _generator(self.sampling)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def repeats_itself(tokens: list[int], window: int) -> bool:
    """Whether the last `window` tokens occur, in order, earlier in `tokens` (overlap allowed, so a
    token repeated window + 1 times counts)."""
    if len(tokens) <= window:
        return False
    tail = tokens[-window:]
    first = tail[0]
    return any(tokens[i] == first and tokens[i : i + window] == tail for i in range(len(tokens) - window))


def _fit_prompt(prompt: list[int], max_new_tokens: int, context_length: int) -> list[int]:
    """Keep the end of a prompt so that prompt + new tokens fit the context (the chapter's cut)."""
    room = max(1, context_length - max_new_tokens)
    return prompt[-room:]


def prefill(model: torch.nn.Module, pad_id: int, prompts: list[list[int]], extra: int):
    """Left-pad one group of prompts, run it through the model into a fresh cache with `extra` free
    slots. Returns the cache, the last position's logits (B, V) and each row's next position (B,)."""
    device = next(model.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    valid = torch.zeros((batch, width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        valid[row, width - len(prompt):] = True
    # Each row counts positions from its first real token; padding sits at position 0 (masked).
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    cache = model.new_cache(batch, width + extra, device=device)
    hidden = model(input_ids.to(device), positions=positions.to(device), valid=valid.to(device), cache=cache,
                   return_hidden=True)
    return cache, model.head(hidden[:, -1]), positions[:, -1] + 1


class Decoder:
    """Rows decoding together from one KV cache; see the module docstring."""

    def __init__(self, model: torch.nn.Module, pad_id: int, *, prefill_batch: int = 16):
        self.model, self.pad_id, self.prefill_batch = model, pad_id, prefill_batch
        self.device = next(model.parameters()).device
        self.rows: list[Request] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # (B, V): the next token of each row comes from these
        self.next_position: torch.Tensor | None = None  # (B,)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def join(self, requests: Sequence[Request]) -> None:
        """Prefill new requests (groups of similar length) and merge them into the running batch."""
        context = self.model.config.context_length
        for request in requests:
            request.max_new_tokens = max(1, min(request.max_new_tokens, context - 1))
            request.prompt = _fit_prompt(list(request.prompt), request.max_new_tokens, context)
        order = sorted(requests, key=lambda r: len(r.prompt))
        caches = [self.cache] if self.cache is not None else []
        logits = [self.logits] if self.logits is not None else []
        positions = [self.next_position] if self.next_position is not None else []
        remaining = [r.max_new_tokens - len(r.tokens) for r in self.rows + order]
        alone = not caches and len(order) <= self.prefill_batch
        for start in range(0, len(order), self.prefill_batch):
            group = [r.prompt for r in order[start : start + self.prefill_batch]]
            # A lone group keeps its own cache, so it needs room for the new tokens.
            cache, group_logits, group_positions = self._prefill(group, max(remaining) if alone else 0)
            caches.append(cache)
            logits.append(group_logits)
            positions.append(group_positions)
        if len(caches) > 1:
            width = max(cache.length for cache in caches)
            self.cache = KVCache.merge(caches, width + max(remaining))
        else:
            self.cache = caches[0]
        self.rows += order
        self.logits, self.next_position = torch.cat(logits), torch.cat(positions)

    def _prefill(self, prompts: list[list[int]], extra: int):
        return prefill(self.model, self.pad_id, prompts, extra)

    def _keep(self, slots: list[int]) -> None:
        if len(slots) == len(self.rows):
            return
        if not slots:
            self.rows, self.cache, self.logits, self.next_position = [], None, None, None
            return
        index = torch.tensor(slots)
        self.cache.keep_rows(index.to(self.device))
        self.rows = [self.rows[slot] for slot in slots]
        self.logits, self.next_position = self.logits[index], self.next_position[index]

    def _sample(self) -> list[int]:
        tokens = greedy(self.logits).tolist()  # (B,) greedy for every row, then the sampling rows
        for slot, request in enumerate(self.rows):
            if request.sampling.temperature > 0:
                tokens[slot] = int(sample_next_token(self.logits[slot : slot + 1], request.sampling, request.generator)[0])
        return tokens

    @torch.no_grad()
    def step(self) -> list[tuple[Request, int]]:
        """One token for every row. Rows that end here (stop token, budget, cancelled) leave the
        batch; the others run one forward pass. Returns the (request, token) pairs produced."""
        for request in self.rows:
            if request.cancelled:
                request.finish_reason = request.cancelled
        self._keep([slot for slot, r in enumerate(self.rows) if not r.cancelled])
        if not self.rows:
            return []
        produced, keep = [], []
        for slot, (request, token) in enumerate(zip(self.rows, self._sample())):
            if token in request.stop_ids:
                request.finish_reason = "stop_token"
                continue
            request.tokens.append(token)
            produced.append((request, token))
            if len(request.tokens) >= request.max_new_tokens:
                request.finish_reason = "length"
                continue
            if request.repeat_stop and repeats_itself(request.tokens, request.repeat_stop):
                del request.tokens[-request.repeat_stop :]
                request.finish_reason = "repeat"
                continue
            keep.append(slot)
        step_tokens = torch.tensor([token for _, token in produced], dtype=torch.long)
        kept_tokens = step_tokens[[i for i, (request, _) in enumerate(produced) if not request.finished]]
        self._keep(keep)
        if self.rows:
            tokens, positions = kept_tokens[:, None].to(self.device), self.next_position[:, None].to(self.device)
            static_step = getattr(self.model, "static_step", None)  # instructkit.decode.static_decode.enable
            if static_step is not None:
                self.logits = static_step(tokens, positions, self.cache)
            else:
                hidden = self.model(tokens, positions=positions, cache=self.cache, return_hidden=True)
                self.logits = self.model.head(hidden[:, -1])
            self.next_position = self.next_position + 1
        return produced


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
) -> list[Generated]:
    """Generate for every prompt (lists of token ids) in one batch with a KV cache. With a seed,
    row i samples from seed + i, so its tokens do not depend on the other rows. `repeat_stop`: see
    Request."""
    if not prompts:
        return []
    requests = [Request(list(p), max_new_tokens, frozenset(stop_ids),
                        Sampling(sampling.temperature, sampling.top_k, sampling.top_p,
                                 None if sampling.seed is None else sampling.seed + row), repeat_stop=repeat_stop)
                for row, p in enumerate(prompts)]
    row_of = {request: row for row, request in enumerate(requests)}
    streams = [TextStream(tokenizer, stop_strings) for _ in requests]
    decoder = Decoder(model, tokenizer.pad_id, prefill_batch=prefill_batch)
    decoder.join(requests)
    while len(decoder):
        for request, token in decoder.step():
            row = row_of[request]
            if on_token is not None:
                on_token(row, token)
            if stop_strings:
                streams[row].push(token)
                if streams[row].stopped:
                    request.cancelled = "stop_string"
    results = []
    for request, stream in zip(requests, streams):
        reason = "stop_string" if stream.stopped else request.finish_reason
        text = stream.text if stream.stopped else tokenizer.decode(request.tokens)
        results.append(Generated(request.tokens, text, reason))
    return results


def stream_tokens(model: torch.nn.Module, tokenizer: Tokenizer, prompt: list[int], *, max_new_tokens: int = 256,
                  stop_ids: Sequence[int] = (), sampling: Sampling = Sampling()) -> Iterator[int]:
    """Token ids one at a time, as a plain generator (chat reads it directly); closing the
    generator stops the decoding."""
    decoder = Decoder(model, tokenizer.pad_id)
    decoder.join([Request(list(prompt), max_new_tokens, frozenset(stop_ids), sampling)])
    while len(decoder):
        for _, token in decoder.step():
            yield token


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
