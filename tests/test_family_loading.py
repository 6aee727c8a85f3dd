"""Where models come from, for the new families: sharded and bf16 Hugging Face folders, Hub ids
offline, and folders we cannot read (one line each)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from instructkit.errors import UserError
from instructkit.models.registry import load_model

from .conftest import require_module
from .test_family_parity import VOCAB, make_checkpoint

transformers = require_module("transformers")


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, (1, 12), generator=torch.Generator().manual_seed(5))


def test_sharded_bf16_folder_streams_in_as_fp32_or_quantized_for_a_quantized_base(tmp_path):
    """A bf16 checkpoint in several shards (model.safetensors.index.json) loads tensor by tensor
    into fp32 and gives transformers' logits of the same bf16 weights upcast."""
    reference = make_checkpoint("qwen2", tmp_path / "fp32")
    with torch.no_grad():  # the reference: fp32 holding exactly the bf16 values (its RoPE buffer stays fp32)
        for parameter in reference.parameters():
            parameter.copy_(parameter.bfloat16().float())
    copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / name).write_bytes((tmp_path / "fp32" / name).read_bytes())
    shards = sorted((tmp_path / "bf16").glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    loaded = load_model(str(tmp_path / "bf16")).model
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        expected = reference(_ids()).logits
        assert (loaded(_ids()) - expected).abs().max().item() <= 1e-4
    _quantized_as_read_equals_quantized_after(tmp_path / "bf16", loaded)
    _each_weight_is_encoded_as_read_and_dropped(tmp_path / "bf16", loaded)


def _each_weight_is_encoded_as_read_and_dropped(folder, fp32_model):
    """The loader hands each body weight over as stored (bf16) as soon as it is read: when a weight
    is encoded, no other 16-bit body weight is alive (a loader that collected them first, as ours
    did before, held a 1.5B model's whole 3.1 GB bf16 body at that point)."""
    import gc

    from instructkit.models.checkpoints import FrozenLinears

    alive: list[int] = []

    def encode(weight: torch.Tensor):
        assert weight.dtype == torch.bfloat16
        alive.append(sum(type(o) in (torch.Tensor, torch.nn.Parameter) and o.dtype == torch.bfloat16 and o.dim() == 2
                         and o.shape[0] != VOCAB for o in gc.get_objects()))  # the embedding is not a body weight
        return weight.float().clone()

    def build(stored, bias):
        layer = torch.nn.Linear(stored.shape[1], stored.shape[0], bias=bias is not None)
        layer.weight.data, layer.bias = stored, None if bias is None else torch.nn.Parameter(bias)
        return layer

    model = load_model(str(folder), frozen=FrozenLinears(encode, build)).model
    assert len(alive) == sum(isinstance(m, torch.nn.Linear) for name, m in model.named_modules() if name != "lm_head")
    assert max(alive) == 1, alive  # the weight being encoded, nothing else
    with torch.no_grad():
        assert torch.equal(model(_ids()), fp32_model(_ids()))


def _quantized_as_read_equals_quantized_after(folder, fp32_model):
    """LoRA on an int8 / int4 base loads the body's linear layers quantized as each weight is read
    (from its stored bf16 values: never the whole body in 16 or 32 bits) and gives the layers,
    adapters and logits that quantizing the fp32 load after LoRA gives; nothing 16-bit is left."""
    from instructkit.train.lora import LoRALinear, apply_lora
    from instructkit.train.quantized_base import FrozenBaseLinear, frozen_linears, quantize_base

    for mode in ("int8", "int4"):
        loaded = load_model(str(folder), frozen=frozen_linears(mode)).model
        quantized = {name for name, m in loaded.named_modules() if isinstance(m, FrozenBaseLinear)}
        assert quantized and not any(isinstance(m, torch.nn.Linear) and name != "lm_head" for name, m in loaded.named_modules())
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        after = copy.deepcopy(fp32_model)
        for model in (loaded, after):
            apply_lora(model, ["attention"], 4, 8.0, seed=3)  # the MLP is left frozen without adapters: quantized too
            with torch.no_grad():  # adapters that move the output, the same in both
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(len(name))))
        assert quantize_base(loaded, mode) == 0 and quantize_base(after, mode) == len(quantized)
        ours = dict(loaded.named_modules())
        theirs = dict(after.named_modules())
        quantized = {n for n, m in ours.items() if isinstance(m, FrozenBaseLinear)}  # some now inside LoRA
        assert {n for n, m in theirs.items() if isinstance(m, FrozenBaseLinear)} == quantized
        assert sum(isinstance(m, LoRALinear) for m in ours.values()) > 0
        for name in quantized:
            assert torch.equal(ours[name].plain_weight(), theirs[name].plain_weight())
            if ours[name].plain_bias() is not None:  # qwen2: q/k/v biases, fp32
                assert torch.equal(ours[name].plain_bias(), theirs[name].plain_bias())
        for name, parameter in loaded.named_parameters():
            assert torch.equal(parameter, after.get_parameter(name)), name
        with torch.no_grad():
            assert torch.equal(loaded(_ids()), after(_ids()))


def test_truncated_shard_and_unknown_family_are_one_line(tmp_path):
    make_checkpoint("llama", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=r"model\.safetensors: not a complete safetensors file"):
        load_model(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(UserError, match=r"model_type 'mamba' is not supported \(supported: gpt2, gemma3, .*qwen2"):
        load_model(str(tmp_path))


def test_a_hub_id_offline_names_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(UserError, match=r"'Qwen/Qwen2\.5-0\.5B' is not in the Hugging Face cache .*offline"):
        load_model("Qwen/Qwen2.5-0.5B")
    with pytest.raises(UserError, match=r"'HuggingFaceTB/SmolLM2-135M' is not in the Hugging Face cache"):
        load_model("smollm2-135m")  # a preset name of a Hub model
