"""The decoding engine: a pure `sample_next_token` and `Decoder`, rows decoding together from one
KV cache.

Requests join between steps (prefilled in groups of similar length, left-padded, then merged into
the running cache, right-aligned) and leave when they finish, so one batch serves a changing set
of requests: what generate.py's `generate` (a whole test split at once) and `stream_tokens` (a
chat, one token at a time) and the server's continuous batching are built on. Each row has its
own positions (starting at 0 on its first real token) and padding is masked, so a row's tokens do
not depend on what else is in the batch; each row samples with its own generator, for the same
reason. The cache grows with the rows, and a failure while decoding ends only the rows it
belongs to (see `Decoder`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from instructkit.decode import native
from instructkit.decode.vocabulary import greedy
from instructkit.models.attention import KVCache, LayerCache


# Below this temperature sampling is greedy: dividing logits by a tiny temperature overflows
# (1e-300 gives inf and then NaN probabilities), and the distribution is a point mass by then anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 (or anything below GREEDY_BELOW) means greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def sample_next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy when the temperature is (nearly) 0."""
    if sampling.greedy:
        return greedy(logits)
    # Shift by the maximum first, so the largest scaled logit is exactly 0 and none can overflow.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / sampling.temperature
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
    if sampling.greedy:
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
    stop_token: int | None = None  # the stop token that ended it (finish_reason "stop_token")
    finish_reason: str | None = None  # "stop_token", "length", "repeat", or what cancelled it
    # > 0: end the row when its last `repeat_stop` tokens already appeared, in that order, earlier
    # in its output (greedy decoding in a loop), dropping the repeat.
    repeat_stop: int = 0
    cancelled: str | None = None
    generator: torch.Generator | None = None
    error: Exception | None = None  # why the row failed (finish_reason "error"); the other rows go on

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


def _resized(cache: KVCache, start: int, capacity: int) -> KVCache:
    """The slots [start, length) of `cache` in a new cache of `capacity` slots: drops a prefix that
    no live row uses any more, and grows the room for new tokens."""
    keys = cache.layers[0].keys
    batch, heads, _, dim = keys.shape
    length = cache.length - start
    new = KVCache(len(cache.layers), batch, heads, dim, capacity, dtype=keys.dtype, device=keys.device)
    for target, source in zip(new.layers, cache.layers):
        target.keys[:, :, :length] = source.keys[:, :, start : cache.length]
        target.values[:, :, :length] = source.values[:, :, start : cache.length]
    new.positions[:, :length] = cache.positions[:, start : cache.length]
    new.valid[:, :length] = cache.valid[:, start : cache.length]
    new.length = length
    return new


class Decoder:
    """Rows decoding together from one KV cache; see the module docstring.

    The cache grows as rows grow (doubling, never past what the rows can still use) rather than
    being sized for every row's whole budget up front, and slots no live row uses are dropped, so
    a request that asks for 10**9 tokens costs only what it generates. A failure while decoding
    ends only the rows it belongs to (finish_reason "error", `Request.error`): a failing sample is
    one row's, and a failing forward pass is retried row by row to find the rows that fail alone."""

    def __init__(self, model: torch.nn.Module, pad_id: int, *, prefill_batch: int = 16):
        self.model, self.pad_id, self.prefill_batch = model, pad_id, prefill_batch
        self.device = next(model.parameters()).device
        self.rows: list[Request] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # (B, V): the next token of each row comes from these
        self.next_position: torch.Tensor | None = None  # (B,)

    def __len__(self) -> int:
        """Rows still decoding (finished rows may stay in the batch a while: see `_retire`)."""
        return sum(not request.finished for request in self.rows)

    def fit(self, request: Request) -> Request:
        """Cut a request's budget and prompt to the context (the chapter's cut); idempotent."""
        context = self.model.config.context_length
        request.max_new_tokens = max(1, min(request.max_new_tokens, context - 1))
        request.prompt = _fit_prompt(list(request.prompt), request.max_new_tokens, context)
        return request

    def _live_start(self) -> int:
        """The first cache slot that some row still uses (slots before it are dead)."""
        used = self.cache.valid[:, : self.cache.length].any(dim=0)
        return int(used.int().argmax()) if bool(used.any()) else self.cache.length

    def planned_slots(self, joining: Sequence[Request] = ()) -> int:
        """Cache slots (rows x span) the batch needs at most to finish every row, if `joining` (fitted
        requests) joined now: what a memory budget is checked against."""
        rows = len(self.rows) + len(joining)
        if not rows:
            return 0
        length = self.cache.length if self.cache is not None else 0
        width = max([length, *(len(r.prompt) for r in joining)])  # joining right-aligns everything
        shift = width - length
        ends = [width, *(width + r.max_new_tokens - len(r.tokens) for r in [*self.rows, *joining] if not r.finished)]
        starts = [width - len(r.prompt) for r in joining] + ([shift + self._live_start()] if self.rows else [])
        return rows * (max(ends) - min(starts))

    def _room_needed(self) -> int:
        return max([1, *(r.max_new_tokens - len(r.tokens) for r in self.rows if not r.finished)])

    @torch.no_grad()
    def join(self, requests: Sequence[Request]) -> None:
        """Prefill new requests (groups of similar length) and merge them into the running batch.
        A request whose prefill fails alone ends with its error; the others join."""
        order = sorted((self.fit(r) for r in requests), key=lambda r: len(r.prompt))
        self._keep([slot for slot, r in enumerate(self.rows) if not r.finished])  # the merge copies anyway
        caches = [_resized(self.cache, self._live_start(), self.cache.length)] if self.cache is not None else []
        logits = [self.logits] if self.logits is not None else []
        positions = [self.next_position] if self.next_position is not None else []
        joined = []
        for start in range(0, len(order), self.prefill_batch):
            for group, (cache, group_logits, group_positions) in self._prefill_isolated(order[start : start + self.prefill_batch]):
                caches.append(cache)
                logits.append(group_logits)
                positions.append(group_positions)
                joined += group
        if not caches:
            return
        self.rows += joined
        width = max(cache.length for cache in caches)
        # Room for the first tokens only; step() grows the cache as the rows grow.
        self.cache = KVCache.merge(caches, width + min(self._room_needed(), max(64, width)))
        self.logits, self.next_position = torch.cat(logits), torch.cat(positions)

    def _prefill_isolated(self, group: list[Request]) -> list[tuple[list[Request], tuple]]:
        """Prefill a group; if that fails, each of its requests alone (those that fail alone end)."""
        try:
            return [(group, prefill(self.model, self.pad_id, [r.prompt for r in group], 0))]
        except Exception as exc:
            if len(group) == 1:
                self._fail(group[0], exc)
                return []
            return [part for request in group for part in self._prefill_isolated([request])]

    def _fail(self, request: Request, exc: Exception) -> None:
        request.error, request.finish_reason = exc, "error"

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

    def _sample(self) -> list[int | None]:
        """Each row's next token; None for a row whose sampling failed (it ends with the error)."""
        tokens: list[int | None] = greedy(self.logits).tolist()  # (B,) greedy for every row, then the sampling rows
        for slot, request in enumerate(self.rows):
            if not request.sampling.greedy and not request.finished:
                try:
                    tokens[slot] = int(sample_next_token(self.logits[slot : slot + 1], request.sampling, request.generator)[0])
                except Exception as exc:
                    self._fail(request, exc)
                    tokens[slot] = None
        return tokens

    @torch.no_grad()
    def step(self) -> list[tuple[Request, int]]:
        """One token for every row. Rows that end here (stop token, budget, cancelled, failed) are
        finished at once and leave the batch with the next quarter (`_retire`); the others run one
        forward pass. Returns the (request, token) pairs produced."""
        for request in self.rows:
            if request.cancelled and not request.finished:
                request.finish_reason = request.cancelled
        self._retire([slot for slot, r in enumerate(self.rows) if not r.finished])
        if not self.rows:
            return []
        produced, keep = [], []
        for slot, (request, token) in enumerate(zip(self.rows, self._sample())):
            if token is None or request.finished:  # failed sampling, or a finished row still in the batch
                continue
            if token in request.stop_ids:
                request.finish_reason, request.stop_token = "stop_token", token
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
        self._retire(keep)
        if self.rows:
            self._make_room()
            # A finished row still in the batch is fed any token: its outputs are never read.
            self._advance(torch.tensor([r.tokens[-1] if r.tokens else self.pad_id for r in self.rows], dtype=torch.long))
        return produced

    def _retire(self, live: list[int]) -> None:
        """Drop finished rows from the batch once they are a quarter of it, or every row has finished.
        Dropping copies the whole cache (B, H_kv, slots, D per layer); with many rows ending one by
        one (a long test split through `generate(max_batch=...)`) copying at every end cost more
        than the steps themselves (26% of IFEval's time on SmolLM2, 2026-12-06), while a finished
        row left in the batch costs one row of a batched step."""
        finished = len(self.rows) - len(live)
        if finished and (not live or 4 * finished >= len(self.rows)):
            self._keep(live)

    def _make_room(self) -> None:
        """Before a step: drop dead slots and, when full, double the room (up to what rows can use)."""
        start = self._live_start()
        if self.cache.length < self.cache.capacity and start < self.cache.length // 2:
            return
        used = self.cache.length - start
        self.cache = _resized(self.cache, start, used + max(1, min(self._room_needed(), max(used, 64))))

    def _forward(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens and positions (B,) -> logits (B, V), one slot further into `cache`."""
        tokens, positions = tokens[:, None].to(self.device), positions[:, None].to(self.device)
        # Read once a step: a step compiled in the background (decode/background.py) takes over
        # between two steps, never inside one (static_decode.enable attaches it the same way).
        static_step = getattr(self.model, "static_step", None)
        if static_step is not None:
            return static_step(tokens, positions, cache)
        cache.one_query_kernel = self._one_query_kernel(cache)
        hidden = self.model(tokens, positions=positions, cache=cache, return_hidden=True)
        return self.model.head(hidden[:, -1])

    def _one_query_kernel(self, cache: KVCache) -> bool:
        """Whether one-token steps attend through our C++ kernel (models/attention.py): an fp32
        cache on the CPU, where the kernels are built (decode/native.py; once per machine)."""
        keys = cache.layers[0].keys
        return keys.device.type == "cpu" and keys.dtype == torch.float32 and native.available()

    def _advance(self, tokens: torch.Tensor) -> None:
        """The forward pass of a step. If it fails, each row is tried alone on a copy of its cache
        row: the rows that fail alone end with their error and the rest are retried together. If no
        row fails alone, the failure is the batch's and every row ends with it."""
        length = self.cache.length
        try:
            self.logits = self._forward(self.cache, tokens, self.next_position)
        except Exception as exc:
            self.cache.length, self.cache.masks = length, {}  # undo the slot the failed pass reserved
            errors = [None if self.rows[slot].finished else self._fails_alone(slot, tokens)
                      for slot in range(len(self.rows))]
            if not any(errors):
                errors = [None if request.finished else exc for request in self.rows]
            for request, error in zip(self.rows, errors):
                if error is not None:
                    self._fail(request, error)
            keep = [slot for slot, error in enumerate(errors) if error is None]
            self._keep(keep)
            if self.rows:
                self._advance(tokens[keep])
            return
        self.next_position = self.next_position + 1

    def _fails_alone(self, slot: int, tokens: torch.Tensor) -> Exception | None:
        row = copy.copy(self.cache)
        row.layers = [LayerCache(layer.keys, layer.values) for layer in self.cache.layers]
        row.masks, row.write_slot = {}, None
        row.keep_rows(torch.tensor([slot], device=self.device))  # copies: the batch's cache is untouched
        try:
            self._forward(row, tokens[slot : slot + 1], self.next_position[slot : slot + 1])
        except Exception as exc:
            return exc
        return None
