"""LoRA on a frozen int8 / int4 base (`--base-quantize`, train/quantized_base.py).

The base layer's forward and its input gradient go through the quantized weights; the reference
is plain autograd through an fp32 nn.Linear holding the dequantized values (the format's own
`reference`), so a LoRA model on a quantized base must train exactly as fp32 LoRA on those values.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from instructkit.data.batching import collate
from instructkit.data.pipeline import encode_splits, prepare_data
from instructkit.data.prompts import ALPACA
from instructkit.decode import native
from instructkit.decode.quantize import Int4GroupLinear, Int8GroupLinear
from instructkit.models.registry import load_model
from instructkit.train.lora import LoRALinear, apply_lora
from instructkit.train.loop import supervised_loss_sum
from instructkit.train.quantized_base import FrozenQuantizedLinear, quantize_base

from .conftest import merged_plain_model, run_cli

KINDS = {"int8": Int8GroupLinear, "int4": Int4GroupLinear}
pytestmark = pytest.mark.skipif(native.load() is not None and not __import__("os").environ.get("CI"),
                                reason="the int8/int4 kernels need a C++ compiler")


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("out_features", [96, 40])  # int8: VNNI's blocks of 16 rows where it has them, and row order
def test_dequantized_rows_are_the_formats_reference_values_bit_for_bit(mode, out_features):
    """csrc/dequantize.cpp against the format's own reference (PyTorch ops): torch.equal, any slice."""
    weight = torch.randn(out_features, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    kind = KINDS[mode]
    layer, reference = kind(kind.quantize(weight), None), kind.reference(weight)
    assert torch.equal(layer.dequantized(), reference)
    assert torch.equal(layer.dequantized(slice(5, 21)), reference[5:21])
    buffer = torch.full((16, 64), float("nan"))  # a reused buffer (training's scratch) is written whole
    assert layer.dequantized(slice(5, 21), out=buffer) is buffer and torch.equal(buffer, reference[5:21])
    with pytest.raises(RuntimeError, match="out must be a contiguous fp32"):
        layer.dequantized(slice(5, 20), out=buffer)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [3, 40])
def test_products_and_input_gradient_equal_fp32_on_the_dequantized_weights(mode, rows):
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=generator), torch.randn(96, generator=generator)
    kind = KINDS[mode]
    layer = FrozenQuantizedLinear(kind(kind.quantize(weight), bias.clone()))
    reference = torch.nn.Linear(64, 96)
    with torch.no_grad():
        reference.weight.copy_(kind.reference(weight))
        reference.bias.copy_(bias)
    reference.requires_grad_(False)
    x = torch.randn(2, rows, 64, generator=generator)
    upstream = torch.randn(2, rows, 96, generator=generator)
    ours_x, theirs_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, theirs = layer(ours_x), reference(theirs_x)
    (ours * upstream).sum().backward()
    (theirs * upstream).sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # training: BLAS on the dequantized weights
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.plain_weight(), reference.weight)


def _tiny_examples(loaded, chapter_data_path, count=6):
    data = prepare_data(str(chapter_data_path))
    examples, _ = encode_splits(data, ALPACA, loaded.tokenizer, mask_instructions=True)["train"]
    return collate(examples[:count], pad_id=loaded.tokenizer.pad_id)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_on_a_quantized_base_trains_as_fp32_lora_on_its_values(mode, chapter_data_path):
    loaded = load_model("tiny-gemma3", seed=3)
    inputs, targets = _tiny_examples(loaded, chapter_data_path)
    ours, reference = copy.deepcopy(loaded.model), copy.deepcopy(loaded.model)
    for model in (ours, reference):
        apply_lora(model, ["attention", "mlp"], 4, 8.0, seed=1)
        for module in model.modules():  # B starts at zero: give it values, so the adapters matter
            if isinstance(module, LoRALinear):
                torch.nn.init.normal_(module.lora_B, std=0.05, generator=torch.Generator().manual_seed(2))
    replaced = quantize_base(ours, mode)
    assert replaced == sum(isinstance(m, LoRALinear) for m in ours.modules())  # every projection
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, LoRALinear):
                module.base.weight.copy_(KINDS[mode].reference(module.base.weight))
    grads = []
    for model in (ours, reference):
        model.train()
        loss, _ = supervised_loss_sum(model, inputs, targets)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.loss = loss.item()
    assert ours.loss == pytest.approx(reference.loss, rel=1e-4)
    assert grads[0].keys() == grads[1].keys() and all("lora_" in name for name in grads[0])
    for name, expected in grads[1].items():
        assert (grads[0][name] - expected).norm() <= 1e-3 * expected.norm(), name
    # Merged for saving (a layer at a time): a plain model of the dequantized base plus the update
    # computes what the fp32 LoRA model on those values does.
    ours.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged_plain_model(ours)(inputs), reference(inputs), rtol=1e-4, atol=1e-4)


def test_finetune_with_an_int8_base_saves_merged_weights_and_refuses_full_training(chapter_data_path, tmp_path):
    out = tmp_path / "run"
    common = ["finetune", "--model", "tiny-gemma3", "--data", str(chapter_data_path), "--max-steps", "2",
              "--eval-every", "2", "--eval-batches", "1", "--no-sample"]
    result = run_cli(*common, "--out", str(out), "--lora-rank", "4", "--base-quantize", "int8")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["base_quantize"] == "int8"
    saved = load_file(str(out / "model.safetensors"))
    adapters = load_file(str(out / "adapter.safetensors"))
    base = load_model("tiny-gemma3", seed=123).model.state_dict()  # finetune draws random weights from --seed
    name = "model.layers.0.self_attn.q_proj"
    scale = 16.0 / 4
    expected = Int8GroupLinear.reference(base[f"{name}.weight"]) + \
        scale * adapters[f"{name}.lora_B"] @ adapters[f"{name}.lora_A"]
    torch.testing.assert_close(saved[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    refused = run_cli(*common, "--out", str(tmp_path / "full"), "--base-quantize", "int4")
    assert refused.returncode != 0 and "--base-quantize int4 needs LoRA" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "full").exists()


def test_int8_base_on_smollm2_keeps_the_loss(chapter_data_path):
    """SmolLM2-135M-Instruct, real weights: LoRA starts at the base model, so the starting loss on
    chapter examples with an int8 / int4 base is the fp32 one within 1% / 3%."""
    loaded = load_model("smollm2-135m-instruct")
    inputs, targets = _tiny_examples(loaded, chapter_data_path, count=4)
    losses = {}
    for mode in ("none", "int8", "int4"):
        model = copy.deepcopy(loaded.model)
        apply_lora(model, ["attention", "mlp"], 8, 16.0)
        quantize_base(model, mode)
        with torch.no_grad():
            loss, count = supervised_loss_sum(model, inputs, targets)
        losses[mode] = loss.item() / count
    assert losses["int8"] == pytest.approx(losses["none"], rel=0.01)
    assert losses["int4"] == pytest.approx(losses["none"], rel=0.03)
    assert losses["int8"] != losses["none"]  # the base really is quantized


def test_streamed_safetensors_are_read_back_by_safetensors_itself(tmp_path):
    """models/checkpoints.write_safetensors (the format written a tensor at a time) against
    safetensors' own reader: every dtype a model holds, scalars and empty tensors, lazy and not.
    A lazy tensor that makes something other than it declared is refused and nothing is left."""
    from safetensors import safe_open

    from instructkit.fileio import atomic_write_with
    from instructkit.models.checkpoints import LazyTensor, write_safetensors

    generator = torch.Generator().manual_seed(0)
    tensors = {"b.f32": torch.randn(3, 5, generator=generator), "a.bf16": torch.randn(7, generator=generator).bfloat16(),
               "c.f16": torch.randn(2, 2, generator=generator).half(), "d.i64": torch.arange(5), "e.bool": torch.tensor([True, False, True]),
               "f.scalar": torch.tensor(2.5), "g.empty": torch.empty(0, 4), "h.u8": torch.arange(9, dtype=torch.uint8)}
    lazy = {name: LazyTensor(tuple(t.shape), t.dtype, t.clone) if i % 2 else t for i, (name, t) in enumerate(tensors.items())}
    write_safetensors(tmp_path / "w.safetensors", lazy)
    back = load_file(str(tmp_path / "w.safetensors"))
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == sorted(tensors)
    wrong = {"x": LazyTensor((2, 3), torch.float32, lambda: torch.zeros(3, 2))}
    with pytest.raises(ValueError, match=r"x: made \(3, 2\)"):
        atomic_write_with(tmp_path / "bad.safetensors", lambda tmp: write_safetensors(tmp, wrong))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_saving_a_lora_run_on_an_int8_base_makes_one_fp32_layer_at_a_time(tmp_path):
    """merged_state's weights are made only as they are written, and each is gone before the next
    is made: saving holds one layer's fp32 weights beside the int8 model, never the fp32 model."""
    import weakref

    from instructkit.models.checkpoints import LazyTensor, write_safetensors
    from instructkit.train.lora import merged_state

    model = load_model("tiny-gemma3", seed=3).model
    apply_lora(model, ["attention", "mlp"], 4, 8.0, seed=1)
    assert quantize_base(model, "int8") > 0
    made: list[weakref.ref] = []

    def watched(lazy: LazyTensor) -> LazyTensor:
        def make():
            assert all(ref() is None for ref in made), "an earlier layer's fp32 weights are still alive"
            tensor = lazy.make()
            made.append(weakref.ref(tensor))
            return tensor
        return LazyTensor(lazy.shape, lazy.dtype, make)

    state = {name: watched(value) if isinstance(value, LazyTensor) else value for name, value in merged_state(model).items()}
    write_safetensors(tmp_path / "model.safetensors", state)
    assert len(made) == sum(isinstance(m, LoRALinear) for m in model.modules()) and all(ref() is None for ref in made)
