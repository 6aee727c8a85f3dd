"""LoRA on a frozen int8 / int4 base (`--base-quantize`, train/quantized_base.py).

The base layer's forward and its input gradient go through the quantized weights; the reference
is plain autograd through an fp32 nn.Linear holding the dequantized values (the format's own
`reference`). On an int4 base LoRA must train exactly as fp32 LoRA on those values. On an int8 base
the training products also round their inputs and gradients to int8, a row at a time (torch's int8
GEMM): checked against the same products in float64 on the rounded values, and against fp32 LoRA
within that rounding; evaluation runs in fp32 on the dequantized weights, as the saved model does.
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
from instructkit.train import quantized_base
from instructkit.train.quantized_base import (FrozenQuantizedLinear, IntegerProductLinear, integer_products_exact,
                                              quantize_base)

from .conftest import merged_plain_model, run_cli

DECODER_FORMATS = {"int8": Int8GroupLinear, "int4": Int4GroupLinear}  # csrc/dequantize.cpp's
KINDS = {"int8": IntegerProductLinear, "int4": Int4GroupLinear}  # what --base-quantize holds


def _frozen(mode: str, weight: torch.Tensor, bias: torch.Tensor | None):
    kind = KINDS[mode]
    layer = kind(kind.quantize(weight), bias)
    return layer if mode == "int8" else FrozenQuantizedLinear(layer)
pytestmark = pytest.mark.skipif(native.load() is not None and not __import__("os").environ.get("CI"),
                                reason="the int8/int4 kernels need a C++ compiler")


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("out_features", [96, 40])  # int8: VNNI's blocks of 16 rows where it has them, and row order
def test_dequantized_rows_are_the_formats_reference_values_bit_for_bit(mode, out_features):
    """csrc/dequantize.cpp against the format's own reference (PyTorch ops): torch.equal, any slice."""
    weight = torch.randn(out_features, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    kind = DECODER_FORMATS[mode]
    layer, reference = kind(kind.quantize(weight), None), kind.reference(weight)
    assert torch.equal(layer.dequantized(), reference)
    assert torch.equal(layer.dequantized(slice(5, 21)), reference[5:21])
    buffer = torch.full((16, 64), float("nan"))  # a reused buffer (training's scratch) is written whole
    assert layer.dequantized(slice(5, 21), out=buffer) is buffer and torch.equal(buffer, reference[5:21])
    with pytest.raises(RuntimeError, match="out must be a contiguous fp32"):
        layer.dequantized(slice(5, 20), out=buffer)


def _fp32_reference(mode: str, weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Linear:
    reference = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        reference.weight.copy_(KINDS[mode].reference(weight))
        reference.bias.copy_(bias)
    return reference.requires_grad_(False)


def _forward_backward(layer, x: torch.Tensor, upstream: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("rows", [3, 40])
def test_int4_products_and_input_gradient_equal_fp32_on_the_dequantized_weights(rows):
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=generator), torch.randn(96, generator=generator)
    layer, reference = _frozen("int4", weight, bias.clone()), _fp32_reference("int4", weight, bias)
    x, upstream = torch.randn(2, rows, 64, generator=generator), torch.randn(2, rows, 96, generator=generator)
    for ours, theirs in zip(_forward_backward(layer, x, upstream), _forward_backward(reference, x, upstream)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # BLAS on the dequantized weights
    torch.testing.assert_close(layer.plain_weight(), reference.weight)


def _on_int8_grids(rows: torch.Tensor) -> torch.Tensor:
    """Each fp32 row rounded to its own symmetric int8 grid (step max |row| / 127, the quotient
    taken in fp32 as specified, so a value on a step's edge rounds as the code's does), returned
    in float64, written out independently of the code's. An all-zero row stays zero."""
    step = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30)
    return (torch.round(rows / step).clamp(-127, 127).double() * step.double())


@pytest.mark.parametrize("rows", [3, 40])
def test_int8_products_are_exact_integer_products_of_row_rounded_inputs_and_gradients(rows):
    """Training on an int8 base: forward x -> (x rounded per row) (q s)^T + b and backward
    g -> ((g s) rounded per row) q, equal to those float64 products (the int32 sums are exact, so
    only the final fp32 scaling rounds); within the rounding of fp32 on the dequantized weights; a
    row's result is its own whatever the batch; without grad (evaluation), fp32 on the dequantized
    weights exactly as the saved model computes."""
    if not integer_products_exact():  # the fallback is tested below; here, the integer products themselves
        pytest.skip("torch's int8 GEMM is not exact on this processor: --base-quantize int8 trains in fp32 here")
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=generator), torch.randn(96, generator=generator)
    layer, reference = _frozen("int8", weight, bias.clone()), _fp32_reference("int8", weight, bias)
    x, upstream = torch.randn(2, rows, 64, generator=generator), torch.randn(2, rows, 96, generator=generator)
    x[0, 0, 5] = 40.0  # one large input: its row's grid is coarse, the others' are not
    x[1, 0], upstream[1, 1] = 0.0, 0.0  # a padded position's input, a masked position's gradient
    out, x_grad = _forward_backward(layer, x, upstream)
    dequantized = reference.weight.double()
    expected_out = _on_int8_grids(x.reshape(-1, 64)) @ dequantized.T + bias.double()
    scales = layer.scale.double()
    expected_grad = _on_int8_grids(upstream.reshape(-1, 96) * layer.scale) @ (dequantized / scales[:, None])
    torch.testing.assert_close(out.reshape(-1, 96).double(), expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad.reshape(-1, 64).double(), expected_grad, rtol=1e-5, atol=1e-5)
    exact_out, exact_grad = _forward_backward(reference, x, upstream)
    error = (out - exact_out).norm(dim=-1).flatten()  # per row
    assert error[0] > 5 * error[1:].max()  # the large input coarsens its own row's grid only
    assert (error[1:] / exact_out.norm(dim=-1).flatten()[1:]).max() < 0.01
    assert torch.equal(out[1, 0], bias) and not x_grad[1, 1].any()  # zero rows stay exact
    assert (x_grad - exact_grad).norm() <= 0.01 * exact_grad.norm()
    alone, _ = _forward_backward(layer, x[1:, -1:], upstream[1:, -1:])
    assert torch.equal(alone[0, 0], out[1, -1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.plain_weight(), reference.weight, rtol=0, atol=0)


def test_int8_products_fall_back_to_fp32_where_torchs_are_not_exact(monkeypatch):
    """On a processor where torch's int8 GEMM saturates, training on an int8 base still runs, in
    fp32 on the dequantized weights, after one warning."""
    monkeypatch.setattr(quantized_base, "integer_products_exact", lambda: False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96)).requires_grad_(False)
    with pytest.warns(UserWarning, match="not exact on this processor"):
        assert quantize_base(model, "int8") == 1
    layer = model[0]
    reference = torch.nn.Linear(64, 96).requires_grad_(False)
    with torch.no_grad():
        reference.weight.copy_(layer.plain_weight())
        reference.bias.copy_(layer.plain_bias())
    generator = torch.Generator().manual_seed(1)
    x, upstream = torch.randn(5, 64, generator=generator), torch.randn(5, 96, generator=generator)
    for ours, theirs in zip(_forward_backward(model, x, upstream), _forward_backward(reference, x, upstream)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _tiny_examples(loaded, chapter_data_path, count=6):
    data = prepare_data(str(chapter_data_path))
    examples, _ = encode_splits(data, ALPACA, loaded.tokenizer, mask_instructions=True)["train"]
    return collate(examples[:count], pad_id=loaded.tokenizer.pad_id)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_on_a_quantized_base_trains_as_fp32_lora_on_its_values_up_to_int8s_rounding(mode, chapter_data_path):
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
    # int4: the same arithmetic as fp32 on its values. int8: inputs and gradients rounded to int8
    # a row at a time, every layer; the loss moves by that rounding, the gradients keep their direction.
    loss_tolerance, gradient_tolerance = {"int4": (1e-4, 1e-3), "int8": (1e-2, 0.15)}[mode]
    assert ours.loss == pytest.approx(reference.loss, rel=loss_tolerance)
    assert grads[0].keys() == grads[1].keys() and all("lora_" in name for name in grads[0])
    for name, expected in grads[1].items():
        assert (grads[0][name] - expected).norm() <= gradient_tolerance * expected.norm(), name
        assert torch.nn.functional.cosine_similarity(grads[0][name].flatten(), expected.flatten(), dim=0) > 0.98, name
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
    expected = IntegerProductLinear.reference(base[f"{name}.weight"]) + \
        scale * adapters[f"{name}.lora_B"] @ adapters[f"{name}.lora_A"]
    torch.testing.assert_close(saved[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    refused = run_cli(*common, "--out", str(tmp_path / "full"), "--base-quantize", "int4")
    assert refused.returncode != 0 and "--base-quantize int4 needs LoRA" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "full").exists()


def test_int8_base_on_smollm2_keeps_the_loss(chapter_data_path):
    """SmolLM2-135M-Instruct, real weights: LoRA starts at the base model, so the starting loss on
    chapter examples with an int8 / int4 base is the fp32 one within 1% / 3%, and on the int8 base
    the training pass (integer products, inputs and gradients rounded per row) keeps it within 1%
    and the adapters' gradients their direction."""
    loaded = load_model("smollm2-135m-instruct")
    inputs, targets = _tiny_examples(loaded, chapter_data_path, count=4)
    losses, grads = {}, {}
    for mode in ("none", "int8", "int4"):
        model = copy.deepcopy(loaded.model)
        apply_lora(model, ["attention", "mlp"], 8, 16.0)
        for module in model.modules():  # B starts at zero, and so would every A gradient
            if isinstance(module, LoRALinear):
                torch.nn.init.normal_(module.lora_B, std=0.02, generator=torch.Generator().manual_seed(2))
        quantize_base(model, mode)
        with torch.no_grad():
            loss, count = supervised_loss_sum(model, inputs, targets)
        losses[mode] = loss.item() / count
        if mode != "int4":  # the training pass: int8's integer products
            loss, count = supervised_loss_sum(model, inputs, targets)
            loss.backward()
            losses[f"{mode} training"] = loss.item() / count
            grads[mode] = torch.cat([p.grad.flatten() for n, p in sorted(model.named_parameters()) if p.grad is not None])
    assert losses["int8"] == pytest.approx(losses["none"], rel=0.01)
    assert losses["int4"] == pytest.approx(losses["none"], rel=0.03)
    assert losses["int8"] != losses["none"]  # the base really is quantized
    assert losses["int8 training"] == pytest.approx(losses["none"], rel=0.01)
    assert losses["int8 training"] != losses["int8"]  # and the training pass rounds its inputs
    # Measured 0.92: almost all of the change comes from rounding the forward products' inputs
    # (with those in fp32 and the backward's gradients rounded: 0.998), which the 40-step
    # fine-tunes in docs/BENCHMARKS.md show costs no final loss. A wrong scale or transpose: ~0.
    assert torch.nn.functional.cosine_similarity(grads["int8"], grads["none"], dim=0) > 0.9


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
