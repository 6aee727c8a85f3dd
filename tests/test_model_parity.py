"""GPT-2 and the chapter's .pth files against HF transformers (a reference nobody here wrote), via our
production loaders. The transformer families are checked in test_family_parity.py."""


import pytest
import torch

from instructkit.errors import UserError
from instructkit.models.registry import load_model, save_chapter_pth

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
