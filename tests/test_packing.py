"""Packing (`--packing`) and activation checkpointing (`--checkpoint-activations`).

Packing lays a micro-batch's examples end to end in fewer rows, positions restarting at every
example; the model keeps attention inside each example from the positions alone
(models/attention.py). What must hold, on a tiny random model of every family (GPT-2 and the
transformer table's eight, windows of 5 tokens, so sliding windows bite inside the examples) and
once on the real default model (Gemma 3 270M): the summed loss of a packed batch equals the
unpacked examples' to 1e-5 relative through the training loss (fp32), and every gradient to 1e-6
in fp64 (fp32 rounding alone moves gradients ~1e-5 between two layouts of the same rows); changing one example of a packed row moves
its own logits and nobody else's, both ways packed rows attend (example by example, the CPU default, and
through the block-diagonal mask). Checkpointed layers give the same gradients and do recompute.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from instructkit.data.batching import collate, pack, pack_rows, packed_padding_share, padding_share
from instructkit.data.pipeline import encode_splits, prepare_data
from instructkit.data.prompts import ALPACA
from instructkit.data.tokenize import IGNORE_INDEX, EncodedExample
from instructkit.models.registry import load_model
from instructkit.train.loop import supervised_loss_sum

from .conftest import require_module, run_cli

transformers = require_module("transformers")

from .test_family_parity import FAMILIES, VOCAB, make_checkpoint  # noqa: E402


def _examples(count: int, seed: int, vocab: int) -> list[EncodedExample]:
    """Random examples of 7-30 tokens, the first third of each unsupervised (a prompt)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(7, 31, (1,), generator=generator))
        ids = torch.randint(0, vocab - 1, (length,), generator=generator).tolist()
        start = length // 3
        examples.append(EncodedExample(ids, [IGNORE_INDEX] * start + ids[start:], start))
    return examples


@pytest.fixture(params=["by example", "block mask"])
def packed_attention(request, monkeypatch):
    """Both ways packed rows attend on a CPU: example by example (the default) and through the
    block-diagonal mask (other devices' way)."""
    import instructkit.models.attention as attention

    monkeypatch.setattr(attention, "BY_EXAMPLE_ON_CPU", request.param == "by example")
    return request.param


@pytest.fixture(scope="module", params=["gpt2", *FAMILIES])
def tiny(request, tmp_path_factory):
    if request.param == "gpt2":
        return "gpt2", load_model("tiny-gpt2", seed=5).model
    folder = tmp_path_factory.mktemp(request.param)
    make_checkpoint(request.param, folder)
    return request.param, load_model(str(folder)).model


def _loss_and_gradients(model, inputs, targets, positions=None) -> tuple[float, int, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, count = supervised_loss_sum(model, inputs, targets, positions)
    loss.backward()
    grads = {name: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
             for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), count, grads


def _assert_same_gradients(ours: dict, reference: dict, rel: float) -> None:
    assert ours.keys() == reference.keys()
    for name, expected in reference.items():
        difference = (ours[name] - expected).norm() / expected.norm().clamp_min(1e-30)
        assert difference <= rel, f"{name}: relative difference {difference:.2e}"


def test_pack_rows_first_fit_decreasing_and_positions_restart():
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert pack_rows([9, 3], 4) == [[0], [1]]  # a span longer than the rows gets one alone
    examples = _examples(6, seed=1, vocab=100)
    inputs, targets, positions = pack(examples, pad_id=99, row_length=40)
    assert positions is not None and inputs.shape[0] < len(examples)
    # Every example appears once, whole, with collate's inputs and targets and positions 0..n-1.
    found = 0
    for row in range(inputs.shape[0]):
        starts = (positions[row] == 0).nonzero().flatten().tolist() + [inputs.shape[1]]
        for start, stop in zip(starts, starts[1:]):
            piece = inputs[row, start:stop].tolist()
            match = [e for e in examples if e.input_ids[:-1] == piece]
            if not match:  # the padding run at the row's end
                assert set(piece) == {99} and (targets[row, start:stop] == IGNORE_INDEX).all()
                continue
            assert targets[row, start:stop].tolist() == match[0].labels[1:]
            assert positions[row, start:stop].tolist() == list(range(stop - start))
            found += 1
    assert found == len(examples)
    # Nothing shares a row: plain rows, no positions needed.
    assert pack(examples[:1], pad_id=99)[2] is None
    lengths = [len(e) for e in examples]
    assert packed_padding_share([list(range(6))], lengths, 40) < padding_share([list(range(6))], lengths)


def _full_logits_loss_and_gradients(model, inputs, targets, positions=None) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(inputs) if positions is None else model(inputs, positions=positions)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum",
                                             ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = {name: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
             for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_packed_loss_and_gradients_equal_the_unpacked_examples(tiny, packed_attention):
    """Through the training loss (fp32): the summed loss to 1e-5. The gradients in fp64, where
    float noise is out of the way (fp32 puts 4e-6 between batching the same rows differently and
    ~1e-5 between packed and unpacked rows, on these wide random weights): to 1e-6."""
    family, model = tiny
    model = copy.deepcopy(model).train()
    vocab = model.config.vocab_size
    examples = _examples(8, seed=2, vocab=vocab)
    inputs, targets, positions = pack(examples, pad_id=vocab - 1, row_length=64)
    assert positions is not None and inputs.shape[0] <= 4  # examples really share rows
    unpacked_batch = collate(examples, pad_id=vocab - 1)
    packed = _loss_and_gradients(model, inputs, targets, positions)
    unpacked = _loss_and_gradients(model, *unpacked_batch)
    assert packed[1] == unpacked[1]
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5), family
    _assert_same_gradients(packed[2], unpacked[2], 1e-4)
    model.double()
    packed = _full_logits_loss_and_gradients(model, inputs, targets, positions)
    unpacked = _full_logits_loss_and_gradients(model, *unpacked_batch)
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-9), family
    _assert_same_gradients(packed[1], unpacked[1], 1e-6)


def test_no_token_attends_across_packed_examples(tiny, packed_attention):
    family, model = tiny
    model.eval()
    vocab = model.config.vocab_size
    first, second, third = _examples(3, seed=3, vocab=vocab)
    inputs, _, positions = pack([first, second, third], pad_id=vocab - 1, row_length=100)
    assert inputs.shape[0] == 1
    spans = {}
    for start in (positions[0] == 0).nonzero().flatten().tolist():
        stop = start + int((positions[0, start:] == torch.arange(positions.shape[1] - start)).cumprod(0).sum())
        spans[tuple(inputs[0, start:stop].tolist())] = slice(start, stop)
    where = [spans[tuple(e.input_ids[:-1])] for e in (first, second, third)]
    changed = inputs.clone()
    changed[0, where[1]] = (changed[0, where[1]] + 7) % (vocab - 1)
    with torch.no_grad():
        before = model(inputs, positions=positions)
        after = model(changed, positions=positions)
        alone = model(torch.tensor([first.input_ids[:-1]]))
    for kept in (where[0], where[2]):
        assert torch.equal(before[0, kept], after[0, kept]), family
    assert (before[0, where[1]] - after[0, where[1]]).abs().max() > 1e-3  # the changed example did move
    # And each example sees what it would alone: positions (RoPE, learned, windows) restart.
    torch.testing.assert_close(before[0, where[0]], alone[0], rtol=1e-4, atol=1e-4)


def test_checkpointed_layers_give_the_same_gradients_and_recompute(tiny):
    family, model = tiny
    model = copy.deepcopy(model).train()
    vocab = model.config.vocab_size
    inputs, targets = collate(_examples(4, seed=4, vocab=vocab), pad_id=vocab - 1)
    plain = _loss_and_gradients(model, inputs, targets)
    calls = []
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    hook = layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # (recomputation stops early: no post-hook)
    model.checkpoint_layers = True
    try:
        checkpointed = _loss_and_gradients(model, inputs, targets)
    finally:
        hook.remove()
    assert len(calls) == 2  # the forward pass and its recomputation in the backward pass
    assert checkpointed[0] == pytest.approx(plain[0], rel=1e-6)
    _assert_same_gradients(checkpointed[2], plain[2], 1e-6)
    with torch.no_grad():  # no gradients, no checkpointing
        calls.clear()
        layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        model(inputs)
        assert len(calls) == 1


def test_packing_on_the_real_default_model(chapter_data_path):
    """Gemma 3 270M (real weights, 262k vocabulary, sliding layers): packed chapter examples
    give the unpacked loss and gradients (fp32 through the training loss; fp64 to 1e-6, as above),
    and checkpointed layers give the plain ones."""
    loaded = load_model("gemma-3-270m")
    model = loaded.model.train()
    data = prepare_data(str(chapter_data_path))
    examples, _ = encode_splits(data, ALPACA, loaded.tokenizer, mask_instructions=True)["train"]
    chosen = sorted(examples[:40], key=len)[:4]  # short ones: a quick backward pass through 270M weights
    pad = loaded.tokenizer.pad_id
    inputs, targets, positions = pack(chosen, pad_id=pad, row_length=2 * len(chosen[-1]))
    assert positions is not None and inputs.shape[0] < len(chosen)
    unpacked_batch = collate(chosen, pad_id=pad)
    packed = _loss_and_gradients(model, inputs, targets, positions)
    unpacked = _loss_and_gradients(model, *unpacked_batch)
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
    _assert_same_gradients(packed[2], unpacked[2], 1e-4)
    model.checkpoint_layers = True  # --checkpoint-activations at real size: the same loss and gradients
    checkpointed = _loss_and_gradients(model, *unpacked_batch)
    model.checkpoint_layers = False
    assert checkpointed[0] == pytest.approx(unpacked[0], rel=1e-6)
    _assert_same_gradients(checkpointed[2], unpacked[2], 1e-6)
    model.double()
    packed = _full_logits_loss_and_gradients(model, inputs, targets, positions)
    unpacked = _full_logits_loss_and_gradients(model, *unpacked_batch)
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-9)
    _assert_same_gradients(packed[1], unpacked[1], 1e-6)


def test_finetune_with_packing_and_checkpointing_takes_the_unpacked_steps(chapter_data_path, tmp_path):
    """The same examples in every step, so the same step losses; packed rows cost fewer positions."""
    common = ["finetune", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--max-steps", "3",
              "--batching", "chapter", "--eval-every", "3", "--eval-batches", "1", "--no-sample"]
    runs = {}
    for name, extra in (("plain", []), ("packed", ["--packing", "--pack-length", "512", "--checkpoint-activations"])):
        result = run_cli(*common, "--out", str(tmp_path / name), *extra)
        assert result.returncode == 0, result.stderr
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [row for row in rows if row["kind"] == "step"]
        runs[name + " seen"] = [row for row in rows if row["kind"] == "eval"][-1]["tokens_seen"]
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["packing"] is True
    assert len(runs["plain"]) == len(runs["packed"]) == 3
    for plain, packed in zip(runs["plain"], runs["packed"]):
        assert packed["loss"] == pytest.approx(plain["loss"], rel=1e-4)
        assert packed["real_tokens"] == plain["real_tokens"]
    assert runs["packed seen"] < runs["plain seen"]  # padded positions computed
    bad = run_cli(*common, "--out", str(tmp_path / "bad"), "--pack-length", "64")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith("--pack-length needs --packing")
    assert not (tmp_path / "bad").exists()
