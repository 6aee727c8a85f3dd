"""Batching: the chapter's collate, batch orders, and the padding they cost.

`collate` reproduces the chapter's `custom_collate_fn` exactly when the end token is the pad
token (GPT-2): every row is padded to the batch's longest, inputs are ids[:-1], targets are
labels[1:], so the end token is the last target of each row and every position after it is
IGNORE_INDEX. (The chapter appends the end token inside the collate; our examples already end
with it, so "longest + 1" there is "longest" here.) No device moves happen here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from instructkit.data.tokenize import IGNORE_INDEX, EncodedExample


def collate(
    examples: Sequence[EncodedExample],
    *,
    pad_id: int,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns inputs (B, T) and targets (B, T), T = longest example - 1 (optionally capped)."""
    width = max(len(example) for example in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), ignore_index, dtype=torch.long)
    for row, example in enumerate(examples):
        positions = len(example) - 1
        inputs[row, :positions] = torch.tensor(example.input_ids[:-1], dtype=torch.long)
        targets[row, :positions] = torch.tensor(example.labels[1:], dtype=torch.long)
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def pack_rows(spans: Sequence[int], row_length: int | None = None) -> list[list[int]]:
    """First-fit decreasing: indices of `spans` grouped into rows of at most `row_length` positions
    (default, and at least: the longest span). Longest first, ties by index: a pure function."""
    capacity = max(row_length or 0, max(spans))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(spans)), key=lambda i: (-spans[i], i)):
        row = next((r for r, free in enumerate(room) if free >= spans[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= spans[index]
    return rows


def pack(
    examples: Sequence[EncodedExample],
    *,
    pad_id: int,
    row_length: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Packing: the examples' (input, target) pairs (as `collate` makes them: ids[:-1], labels[1:])
    laid end to end in as few rows as first-fit decreasing finds, each row at most `row_length`
    positions (default: the longest example's, so no row is longer than collate's); rows are padded
    to the longest row. Returns inputs, targets and positions (R, W): positions restart at 0 at
    every example, which keeps attention inside it (models/attention.py), and padding continues
    as a run of its own with ignored targets. An example longer than `row_length` gets a row alone.
    Positions are None when no two examples share a row: positions 0..W-1 then, and the model's
    plain causal attention is exact.

    Each example's tokens, targets and positions are those `collate` gives it, so the summed loss
    is the unpacked one; only which examples share a row changes (order: longest first, ties by
    their index, so the packing is a pure function of the examples)."""
    spans = [len(example) - 1 for example in examples]
    rows = pack_rows(spans, row_length)
    width = max(sum(spans[i] for i in row) for row in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), ignore_index, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for index in members:
            example, span = examples[index], spans[index]
            inputs[r, start : start + span] = torch.tensor(example.input_ids[:-1], dtype=torch.long)
            targets[r, start : start + span] = torch.tensor(example.labels[1:], dtype=torch.long)
            positions[r, start : start + span] = torch.arange(span)
            start += span
        positions[r, start:] = torch.arange(width - start)
    return inputs, targets, positions if len(rows) < len(examples) else None


def chapter_shuffle_order(num_examples: int, seed: int = 123) -> list[int]:
    """The order of the chapter's first training epoch: `torch.manual_seed(seed)` followed by a
    `DataLoader(shuffle=True)`. Iterating it first draws the loader's base seed from the global
    generator, then the RandomSampler draws its own seed and permutes with it."""
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
    sampler_generator = torch.Generator().manual_seed(sampler_seed)
    return torch.randperm(num_examples, generator=sampler_generator).tolist()


def batches_in_order(order: Sequence[int], batch_size: int, *, drop_last: bool) -> list[list[int]]:
    batches = [list(order[start : start + batch_size]) for start in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    drop_last: bool,
    batches_per_group: int = 32,
) -> list[list[int]]:
    """Shuffle, then sort by length inside groups of `batches_per_group` batches, so each batch holds
    examples of similar length (little padding) while the epoch order stays random."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group_size = batch_size * batches_per_group
    batches: list[list[int]] = []
    for start in range(0, len(order), group_size):
        group = sorted(order[start : start + group_size], key=lambda index: lengths[index], reverse=True)
        batches.extend(batches_in_order(group, batch_size, drop_last=False))
    # Only the one short batch, if any, may be dropped, as the chapter's drop_last does.
    if drop_last:
        batches = [batch for batch in batches if len(batch) == batch_size]
    rng.shuffle(batches)
    return batches


def packed_padding_share(batches: Sequence[Sequence[int]], lengths: Sequence[int], row_length: int | None = None) -> float:
    """Share of input positions that are padding when each batch is packed (see `pack`)."""
    real = padded = 0
    for batch in batches:
        spans = [lengths[index] - 1 for index in batch]
        rows = pack_rows(spans, row_length)
        real += sum(spans)
        padded += len(rows) * max(sum(spans[i] for i in row) for row in rows)
    return 1.0 - real / padded if padded else 0.0


def padding_share(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of input positions that are padding, for examples whose ids have `lengths`."""
    real = padded = 0
    for batch in batches:
        width = max(lengths[index] for index in batch) - 1
        real += sum(lengths[index] - 1 for index in batch)
        padded += width * len(batch)
    return 1.0 - real / padded if padded else 0.0
