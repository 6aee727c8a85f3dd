"""Batching and loss against the chapter's printed oracles."""

import pytest
import torch

from instructkit.data.batching import (
    batches_in_order,
    chapter_shuffle_order,
    collate,
    length_grouped_batches,
    padding_share,
)
from instructkit.data.pipeline import encode_splits, prepare_data
from instructkit.data.prompts import ALPACA
from instructkit.data.tokenize import IGNORE_INDEX, EncodedExample
from instructkit.train.loss import masked_cross_entropy

P = 50256


def test_collate_reproduces_the_chapter_toy_oracle():
    batch = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    examples = [EncodedExample.from_token_ids(ids, end_id=P) for ids in batch]
    inputs, targets = collate(examples, pad_id=P)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, P, P, P], [7, 8, 9, P, P]]
    assert targets.tolist() == [[1, 2, 3, 4, P], [6, P, -100, -100, -100], [8, 9, P, -100, -100]]
    assert inputs.device.type == "cpu" and inputs.dtype == torch.long


def test_collate_allowed_max_length_cuts_both_tensors():
    examples = [EncodedExample.from_token_ids([0, 1, 2, 3, 4], end_id=P)]
    inputs, targets = collate(examples, pad_id=P, allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2]] and targets.tolist() == [[1, 2, 3]]


def test_cross_entropy_demo_from_the_chapter():
    logits_1 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5]])
    targets_1 = torch.tensor([0, 1])
    assert masked_cross_entropy(logits_1, targets_1).item() == pytest.approx(1.1269, abs=1e-4)
    logits_2 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
    assert masked_cross_entropy(logits_2, torch.tensor([0, 1, 1])).item() == pytest.approx(0.7936, abs=1e-4)
    assert masked_cross_entropy(logits_2, torch.tensor([0, 1, IGNORE_INDEX])).item() == pytest.approx(1.1269, abs=1e-4)


def test_chapter_order_equals_torch_dataloader_after_manual_seed():
    torch.manual_seed(123)
    loader = torch.utils.data.DataLoader(list(range(935)), batch_size=8, shuffle=True, drop_last=True)
    expected = [batch.tolist() for batch in loader]
    assert batches_in_order(chapter_shuffle_order(935, seed=123), 8, drop_last=True) == expected


def test_chapter_train_split_gives_116_batches_of_57_to_91_tokens(chapter_data_path, gpt2):
    data = prepare_data(str(chapter_data_path))
    examples, _ = encode_splits(data, ALPACA, gpt2)["train"]
    batches = batches_in_order(chapter_shuffle_order(len(examples)), 8, drop_last=True)
    widths = [collate([examples[i] for i in batch], pad_id=gpt2.pad_id)[0].shape[1] for batch in batches]
    assert len(batches) == 116
    assert (min(widths), max(widths)) == (57, 91)
    # The chapter prints the first shapes of its loader: [8, 61], [8, 76], [8, 73], ...
    assert widths[:3] == [61, 76, 73]


def test_length_grouping_cuts_padding_and_keeps_every_example():
    lengths = [10 + (i * 37) % 80 for i in range(400)]
    grouped = length_grouped_batches(lengths, 8, seed=1, drop_last=False)
    assert sorted(i for batch in grouped for i in batch) == list(range(400))
    chapter = batches_in_order(chapter_shuffle_order(400), 8, drop_last=False)
    assert padding_share(grouped, lengths) < padding_share(chapter, lengths) / 3
    assert length_grouped_batches(lengths, 8, seed=1, drop_last=False) == grouped
