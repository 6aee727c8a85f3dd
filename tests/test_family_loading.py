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


def test_sharded_bf16_folder_streams_in_as_fp32_or_keeps_bf16_linears_for_a_quantized_base(tmp_path):
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
    _half_linears_quantize_as_the_fp32_load(tmp_path / "bf16", loaded)


def _half_linears_quantize_as_the_fp32_load(folder, fp32_model):
    """LoRA on an int8 base loads the body's linear weights as stored (bf16: half of fp32's bytes)
    and quantizes them from there: the same int8 weights as from the fp32 load, nothing 16-bit left."""
    from instructkit.train.lora import apply_lora
    from instructkit.train.quantized_base import FrozenQuantizedLinear, quantize_base

    half = load_model(str(folder), half_linears=True).model
    fp32_linears = dict(fp32_model.named_modules())
    linears = {name: m for name, m in half.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears.values())
    assert all(torch.equal(m.weight.float(), fp32_linears[name].weight) for name, m in linears.items())
    assert all(p.dtype == torch.float32 for name, p in half.named_parameters() if not name.endswith(".weight")
               or name.rsplit(".", 1)[0] not in linears)
    for model in (half, fp32_model):
        apply_lora(model, ["attention"], 4, 8.0)  # the MLP is left frozen without adapters: quantized too
        assert quantize_base(model, "int8") > 0
    assert all(p.dtype == torch.float32 for p in half.parameters())
    ours = {name: m.layer for name, m in half.named_modules() if isinstance(m, FrozenQuantizedLinear)}
    theirs = {name: m.layer for name, m in fp32_model.named_modules() if isinstance(m, FrozenQuantizedLinear)}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n].dequantized(), theirs[n].dequantized()) for n in ours)


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
