"""argmax and top-k over a vocabulary-sized last dimension, in blocks.

Over Gemma's 262,144 logits, PyTorch's CPU `argmax` takes ~290 us and `topk(32)` ~440 us a row,
against ~11 us for `amax` (vectorized): at batch 1 that was ~5% of an int8 decode step
(docs/BENCHMARKS.md). Both are answered from block maxima instead: the vocabulary as blocks of
512, each block's max (one vectorized pass), then the exact search inside the few blocks that can
hold the answer. Same results as PyTorch's (argmax: the first index of the maximum; top-k: the
same set, in value order), ~30 and ~100 us.
"""

from __future__ import annotations

import torch

BLOCK = 512


def _blocks(scores: torch.Tensor) -> torch.Tensor | None:
    """scores (..., V) as (..., V/BLOCK, BLOCK), or None where V is not a multiple of BLOCK or too
    small for blocks to pay (gpt2's 50,257: plain PyTorch, ~5x less work than Gemma's anyway)."""
    vocab = scores.shape[-1]
    if vocab % BLOCK or vocab < 8 * BLOCK:
        return None
    return scores.unflatten(-1, (vocab // BLOCK, BLOCK))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) the first index of each row's maximum, as `logits.argmax(-1)`."""
    blocks = _blocks(logits)
    if blocks is None or logits.dim() != 2:
        return logits.argmax(dim=-1)
    # The first block holding the row's maximum, then the first maximum inside it (NaN counts as
    # the maximum in both, as in argmax).
    block = blocks.amax(dim=-1).argmax(dim=-1)  # (B,)
    inside = blocks[torch.arange(blocks.shape[0], device=logits.device), block].argmax(dim=-1)  # (B,)
    return block * BLOCK + inside


def top_candidates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (..., V) -> (..., k) indices of the k largest, as `scores.topk(k).indices`.

    Each of the k largest values is at least the k-th largest, so its block's maximum is too, and
    at most k blocks have such a maximum: the k best blocks by maximum hold them all."""
    blocks = _blocks(scores)
    if blocks is None or blocks.shape[-2] < k:
        return scores.topk(k, dim=-1).indices
    best = blocks.amax(dim=-1).topk(k, dim=-1).indices  # (..., k) blocks
    values = blocks.gather(-2, best[..., None].expand(*best.shape, BLOCK))  # (..., k, BLOCK)
    within = values.flatten(-2).topk(k, dim=-1).indices  # (..., k) positions among them
    return best.gather(-1, within // BLOCK) * BLOCK + within % BLOCK
