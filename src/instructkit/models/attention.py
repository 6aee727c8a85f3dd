"""Pieces shared by the model families: the KV cache and attention with masks.

Positions are explicit per row (B, T), so one code path serves training (positions 0..T-1),
left-padded batched generation (each row's positions start at its first real token) and
cached decoding (positions continue from the cache). Masks are built from positions:

    allowed[b, q, k] = key_valid[b, k] and pos_k <= pos_q and (window is None or pos_q - pos_k < window)

When nothing is padded, no cache is used and the window cannot bite, attention takes SDPA's
`is_causal` fast path instead of materialising a mask.

Packed rows (several examples in one row, train/loop.py's `--packing`) need no argument of their own:
their positions restart at 0 at each example, and without a cache key j is token j of the query's
row, so a key lies in the query's example exactly when the positions rose one per token between
them (pos_q - pos_k == q - k). Without a cache the mask adds that rule, so no token attends across
examples, and positions (RoPE, GPT-2's learned ones) and sliding windows restart per example. The
same rule is what transformers' padding-free collator relies on (boundaries from position_ids).
On a CPU such rows attend example by example instead (`_attend_by_example`: each example on SDPA's
causal fast path), which computes the same values without the masked cross-example scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class LayerCache:
    keys: torch.Tensor  # (B, H_kv, capacity, D)
    values: torch.Tensor  # (B, H_kv, capacity, D)


class KVCache:
    """Preallocated keys and values for every layer, plus each slot's position and validity."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, kv_heads, capacity, head_dim)
        self.layers = [
            LayerCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.positions = torch.zeros((batch, capacity), dtype=torch.long, device=device)
        self.valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.length = 0
        self.capacity = capacity
        self.masks: dict = {}  # per window, for the current forward pass
        # Static-shape decoding (instructkit.decode.static_decode): when set, a one-token step writes at
        # this slot ((1,) long tensor, set by the caller) and attends over the whole capacity,
        # masked by position and validity, so no Python value in the step changes between steps
        # and a compiled step is reused for every token.
        self.write_slot: torch.Tensor | None = None
        # Set where our C++ kernels are built (decode/native.py) and the cache is fp32 on the CPU: a
        # one-token step's attention then runs csrc/one_query_attention.cpp (a static step's, and
        # the engine's, decode/decoder.py).
        self.one_query_kernel = False

    def reserve(self, positions: torch.Tensor, valid: torch.Tensor) -> slice | torch.Tensor:
        """Claim slots for T new tokens (positions and validity (B, T)); returns their slice, or
        the (1,) slot tensor of a static-shape step."""
        steps = positions.shape[1]
        if self.write_slot is not None and steps == 1:
            self.positions.index_copy_(1, self.write_slot, positions)
            self.valid.index_copy_(1, self.write_slot, valid)
            return self.write_slot
        if self.length + steps > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {steps} > {self.capacity}")
        slots = slice(self.length, self.length + steps)
        self.positions[:, slots] = positions
        self.valid[:, slots] = valid
        self.length += steps
        self.masks = {}  # every layer of this forward pass shares one mask per window size
        return slots

    @classmethod
    def for_model(cls, model, batch: int, capacity: int, device=None) -> "KVCache":
        """An empty cache shaped for `model` (its config names layers, KV heads and head size)."""
        c, weight = model.config, next(model.parameters())  # the embedding: fp32, on the model's device
        return cls(c.n_layers, batch, c.n_kv_heads, c.head_dim, capacity,
                   device=device or weight.device, dtype=weight.dtype)

    @classmethod
    def merge(cls, caches: list["KVCache"], capacity: int) -> "KVCache":
        """Stack caches of separately prefilled row groups into one, right-aligning their filled
        slots (shorter groups get invalid slots on the left, as left padding would)."""
        first = caches[0]
        width = max(cache.length for cache in caches)
        batch = sum(cache.positions.shape[0] for cache in caches)
        _, kv_heads, _, head_dim = first.layers[0].keys.shape
        merged = cls(len(first.layers), batch, kv_heads, head_dim, capacity,
                     dtype=first.layers[0].keys.dtype, device=first.positions.device)
        row = 0
        for cache in caches:
            rows, filled = slice(row, row + cache.positions.shape[0]), slice(width - cache.length, width)
            for target, source in zip(merged.layers, cache.layers):
                target.keys[rows, :, filled] = source.keys[:, :, : cache.length]
                target.values[rows, :, filled] = source.values[:, :, : cache.length]
            merged.positions[rows, filled] = cache.positions[:, : cache.length]
            merged.valid[rows, filled] = cache.valid[:, : cache.length]
            row = rows.stop
        merged.length = width
        return merged

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished sequences from the batch (rows: indices to keep)."""
        for layer in self.layers:
            layer.keys = layer.keys[rows]
            layer.values = layer.values[rows]
        self.positions = self.positions[rows]
        self.valid = self.valid[rows]
        self.masks = {}


def run_layers(model: torch.nn.Module, layers: torch.nn.ModuleList, x: torch.Tensor, extra_args, positions, valid,
               cache: KVCache | None, cache_state, default_positions: bool) -> torch.Tensor:
    """x (B, T, C) through every layer, each called as layer(x, *extra_args(layer), positions,
    valid, its cache, cache_state, default_positions).

    With `model.checkpoint_layers` set, while training with gradients, each layer keeps only its
    input (B, T, C) for the backward pass and runs its forward again there: activations go from
    every intermediate of every layer to one (B, T, C) tensor per layer plus one layer's
    intermediates, for about a third more compute (measured in docs/BENCHMARKS.md)."""
    checkpointed = model.checkpoint_layers and model.training and torch.is_grad_enabled()
    for index, layer in enumerate(layers):
        args = (*extra_args(layer), positions, valid, cache.layers[index] if cache is not None else None,
                cache_state, default_positions)
        if checkpointed:
            x = torch.utils.checkpoint.checkpoint(layer, x, *args, use_reentrant=False)
        else:
            x = layer(x, *args)
    return x


def prepare_positions(input_ids: torch.Tensor, positions: torch.Tensor | None, valid: torch.Tensor | None,
                      cache: KVCache | None) -> tuple[torch.Tensor, bool, tuple[KVCache, slice] | None]:
    """The start of every forward pass: default positions 0..T-1, and cache slots for the new tokens.
    Returns positions (B, T), whether they are the default, and (cache, slots) or None."""
    batch, steps = input_ids.shape
    default_positions = positions is None
    if positions is None:
        positions = torch.arange(steps, device=input_ids.device).expand(batch, steps)
    cache_state = None
    if cache is not None:
        slot_valid = valid if valid is not None else torch.ones_like(positions, dtype=torch.bool)
        cache_state = (cache, cache.reserve(positions, slot_valid))
    return positions, default_positions, cache_state


def attention_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, key_valid: torch.Tensor,
                   window: int | None, *, same_row: bool = False) -> torch.Tensor:
    """Boolean mask (B, 1, Tq, Tk), True where a query may attend to a key. `same_row`: queries and
    keys are the same tokens (no cache), so keys of another packed example are ruled out too."""
    q = q_positions[:, :, None]
    k = k_positions[:, None, :]
    allowed = (k <= q) & key_valid[:, None, :]
    if window is not None:
        allowed &= (q - k) < window
    if same_row:  # one example: positions rose one per token from key to query (see the module docstring)
        index = torch.arange(q_positions.shape[1], device=q_positions.device)
        allowed &= (q - k) == (index[:, None] - index[None, :])  # (B, T, T) vs (T, T)
    # A fully masked row (a padding query) would give NaN; let it see itself-free zeros instead.
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


def attend(
    q: torch.Tensor,  # (B, H, T, D)
    k: torch.Tensor,  # (B, H_kv, T, D) new keys
    v: torch.Tensor,  # (B, H_kv, T, D)
    *,
    positions: torch.Tensor,  # (B, T)
    valid: torch.Tensor | None,  # (B, T) False for padding, None when nothing is padded
    cache: LayerCache | None,
    cache_state: tuple[KVCache, slice | torch.Tensor] | None,
    window: int | None,
    scale: float,
    default_positions: bool,
    softcap: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA, optional cache, sliding window and logit
    soft-capping (Gemma 2). Returns (B, H, T, D).

    `default_positions` says positions are 0..T-1 in every row, so a plain causal mask is exact."""
    steps = q.shape[2]
    if cache is not None and cache_state is not None and isinstance(cache_state[1], torch.Tensor):
        kv_cache, slot = cache_state  # a static-shape step: see KVCache.write_slot
        cache.keys.index_copy_(2, slot, k)
        cache.values.index_copy_(2, slot, v)
        k, v = cache.keys, cache.values  # (B, H_kv, capacity, D)
        mask = attention_mask(positions, kv_cache.positions, kv_cache.valid, window)  # (B, 1, T, capacity)
        if kv_cache.one_query_kernel and softcap is None:  # a static step has one new token a row (KVCache.reserve)
            # SDPA's CPU kernel spends ~60 us a call on set-up for ~10 us of work at one query,
            # and computes the unfilled slots it then masks; ours skips both.
            return torch.ops.instructkit_native.one_query_attention(q, k, v, mask[:, 0, 0], scale)
    elif cache is not None and cache_state is not None:
        kv_cache, slots = cache_state
        cache.keys[:, :, slots] = k
        cache.values[:, :, slots] = v
        k = cache.keys[:, :, : slots.stop]
        v = cache.values[:, :, : slots.stop]
        if window in kv_cache.masks:
            mask = kv_cache.masks[window]
        else:
            # One new token per row, no padding anywhere and the window not yet reached: every
            # cached key is visible, so no mask (SDPA's unmasked path; ~10% of a GPT-2 decode step).
            everything_visible = (steps == 1 and (window is None or slots.stop <= window)
                                  and bool(kv_cache.valid[:, : slots.stop].all()))
            mask = None if everything_visible else attention_mask(
                positions, kv_cache.positions[:, : slots.stop], kv_cache.valid[:, : slots.stop], window)
            kv_cache.masks[window] = mask
        if steps == 1 and kv_cache.one_query_kernel and softcap is None:
            # One new token a row over the whole preallocated cache (contiguous: no copy), the
            # slots past the filled ones ruled out: csrc/one_query_attention.cpp skips every slot a
            # row may not see, where SDPA computes them all and masks after. A batch whose rows
            # joined at different times is mostly left padding (2.7x on such a batch, 2026-12-06).
            key = ("one_query", window)
            if key not in kv_cache.masks:
                allowed = torch.zeros(kv_cache.valid.shape, dtype=torch.bool, device=q.device)  # (B, capacity)
                allowed[:, : slots.stop] = kv_cache.valid[:, : slots.stop] if mask is None else mask[:, 0, 0]
                kv_cache.masks[key] = allowed
            return torch.ops.instructkit_native.one_query_attention(q, cache.keys, cache.values, kv_cache.masks[key], scale)
    elif default_positions and valid is None and (window is None or steps <= window):
        mask = None
    elif cache is None and valid is None and BY_EXAMPLE_ON_CPU and q.device.type == "cpu" \
            and (spans := example_spans(positions)) is not None:
        return _attend_by_example(q, k, v, spans, window, scale, softcap)
    else:
        key_valid = valid if valid is not None else torch.ones_like(positions, dtype=torch.bool)
        mask = attention_mask(positions, positions, key_valid, window, same_row=cache is None)
    # Grouped-query attention: SDPA shares each K/V head across H / H_kv query heads itself,
    # which on a CPU is ~15x faster at decode time than repeating K and V.
    gqa = q.shape[1] != k.shape[1]
    if softcap is not None:
        return _softcapped_attention(q, k, v, mask, cache is None or steps > 1, scale, softcap)
    if mask is None:
        causal = cache is None or steps > 1  # one cached query sees all keys: not the top-left causal corner
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)



# Packed rows on a CPU attend example by example (see _attend_by_example); False: through the
# block-diagonal mask, as on other devices (tests run both).
BY_EXAMPLE_ON_CPU = True


def example_spans(positions: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row of positions (B, T), the (start, stop) runs whose positions count up one per token
    from 0: the examples of a packed row, and the padding run after them. None when a run starts
    elsewhere than 0 (not a packed row: the mask path handles it)."""
    rows = positions.tolist()
    spans = []
    for row in rows:
        starts = [index for index, position in enumerate(row) if index == 0 or position != row[index - 1] + 1]
        if any(row[start] != 0 for start in starts):
            return None
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def _attend_by_example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[list[tuple[int, int]]],
                       window: int | None, scale: float, softcap: float | None) -> torch.Tensor:
    """Attention of packed rows one example at a time: q (B, H, T, D), k and v (B, H_kv, T, D).

    The block-diagonal mask is exact but makes SDPA take its masked path over the whole row (and
    compute every cross-example score it then discards); each example alone takes the causal fast
    path over its own length. On a CPU the extra calls cost ~50 us each, little beside a layer's
    matmuls, and a packed batch then attends no more than the same examples unpacked."""
    gqa = q.shape[1] != k.shape[1]
    rows = []
    for row, row_spans in enumerate(spans):
        pieces = []
        for start, stop in row_spans:
            qs, ks, vs = (t[row : row + 1, :, start:stop] for t in (q, k, v))
            length = stop - start
            mask = None
            if window is not None and length > window:
                local = torch.arange(length, device=q.device)[None]
                mask = attention_mask(local, local, torch.ones_like(local, dtype=torch.bool), window)
            if softcap is not None:
                pieces.append(_softcapped_attention(qs, ks, vs, mask, True, scale, softcap))
            elif mask is None:
                pieces.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa))
            else:
                pieces.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          causal: bool, scale: float, softcap: float) -> torch.Tensor:
    """Attention with scores soft-capped before the softmax (cap * tanh(scores / cap)), which SDPA
    cannot do: written out, as transformers' eager Gemma 2 attention is. q (B, H, Tq, D), k and v
    (B, H_kv, Tk, D), mask (B, 1, Tq, Tk) or None (causal, bottom-right aligned, or everything)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and causal:
        queries, keys = scores.shape[-2:]
        mask = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril(diagonal=keys - queries)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).type_as(q) @ v
