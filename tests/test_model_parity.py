"""Our models against HF transformers (a reference nobody here wrote), via our production loaders."""

import json
import shutil

import pytest
import torch

from instructkit.errors import UserError
from instructkit.models.registry import embedded_gemma_folder, load_model, save_chapter_pth

from .conftest import require_module

transformers = require_module("transformers")


def _tokens(vocab: int, steps: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, steps), generator=torch.Generator().manual_seed(seed))


def test_gpt2_logits_match_hf(tmp_path):
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path)  # config.json + model.safetensors, HF names and Conv1D layout
    ours = load_model(str(tmp_path)).model
    ids = _tokens(config.vocab_size, 20)
    with torch.no_grad():
        expected = reference(ids).logits
        actual = ours(ids)
    assert (actual - expected).abs().max().item() <= 1e-4


def _tiny_hf_gemma3(tmp_path):
    config = transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=256,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # HF inits norm weights to zero; make them matter
        for name, parameter in reference.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.3)
    reference.save_pretrained(tmp_path)
    shutil.copy(embedded_gemma_folder() / "tokenizer.json", tmp_path / "tokenizer.json")
    return reference


def test_gemma3_logits_match_hf_across_the_sliding_window(tmp_path):
    reference = _tiny_hf_gemma3(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sliding_window"] == 5
    ours = load_model(str(tmp_path)).model
    assert [layer.self_attn.window for layer in ours.model.layers] == [5, 5, None, 5]
    ids = _tokens(262144, 24)  # far longer than the window
    with torch.no_grad():
        expected = reference(ids).logits
        actual = ours(ids)
    assert (actual - expected).abs().max().item() <= 1e-4
    # The window matters: without it the logits would differ (so this test can catch a wrong mask).
    for layer in ours.model.layers:
        layer.self_attn.window = None
    with torch.no_grad():
        assert (ours(ids) - expected).abs().max().item() > 1e-3


def test_chapter_pth_round_trip(tmp_path):
    model = load_model("tiny-gpt2", seed=3).model
    path = tmp_path / "gpt2-tiny-sft.pth"
    save_chapter_pth(model, path)
    state = torch.load(path, weights_only=True)
    assert "trf_blocks.0.att.W_query.weight" in state and "final_norm.shift" in state and "out_head.weight" in state
    loaded = load_model(str(path)).model
    ids = _tokens(50257, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_pth_with_wrong_shape_is_one_line(tmp_path):
    model = load_model("tiny-gpt2").model
    path = tmp_path / "broken.pth"
    save_chapter_pth(model, path)
    state = torch.load(path, weights_only=True)
    state["trf_blocks.1.ff.layers.0.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(UserError, match=r"tensor 'transformer.h.1.mlp.c_fc.weight' has shape \(3, 3\)"):
        load_model(str(path))


def test_missing_tensor_and_bad_files_are_one_line(tmp_path):
    model = load_model("tiny-gpt2").model
    path = tmp_path / "missing.pth"
    save_chapter_pth(model, path)
    state = torch.load(path, weights_only=True)
    del state["trf_blocks.0.norm2.scale"]
    torch.save(state, path)
    with pytest.raises(UserError, match="missing tensor 'trf_blocks.0.norm2.scale'"):
        load_model(str(path))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        load_model(str(junk))
    with pytest.raises(UserError, match="unknown model"):
        load_model("no-such-model")
