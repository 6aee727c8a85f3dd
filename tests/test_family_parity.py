"""Every transformer family against transformers (a reference nobody here wrote): a tiny random
checkpoint made locally by transformers' own config and model classes (`from_config`-style
construction, `save_pretrained` to a temporary folder, no download) loads through our HF-folder
loader and gives transformers' logits to 1e-4 in fp32 on a sequence longer than the family's
sliding window; greedy 32-token continuations with our KV cache (two prompts of different
lengths in one batch) equal transformers' `generate`; and our HF export of it reloads in
transformers with equal logits.

Weights are drawn wider than transformers' default (initializer_range 0.02 makes attention
nearly uniform, so a wrong window or RoPE would change little: FINDINGS.md), and norm weights
are randomised, so every switch the family sets moves the logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from instructkit.data.prompts import get_prompt_style
from instructkit.decode.generate import generate
from instructkit.export import export_model
from instructkit.models.registry import load_model
from instructkit.models.tokenizer import gpt2_tokenizer, hf_tokenizer

from .conftest import require_module

transformers = require_module("transformers")

VOCAB = 50257  # GPT-2's tokenizer (offline, real) serves every tiny checkpoint
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=VOCAB - 1,
             eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
WINDOW = 5


def _configs() -> dict:
    """family -> (transformers config, initializer std): each with the features the family is for."""
    T = transformers
    return {
        # Llama 3's rope_scaling (llama3), untied head.
        "llama": (T.LlamaConfig(**SHAPE, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), 0.3),
        # q/k/v biases; a sliding window on the layers from max_window_layers up.
        "qwen2": (T.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                tie_word_embeddings=True), 0.3),
        # QK-norm per head.
        "qwen3": (T.Qwen3Config(**SHAPE, tie_word_embeddings=True), 0.3),
        # A sliding window on every layer.
        "mistral": (T.MistralConfig(**SHAPE, sliding_window=WINDOW), 0.3),
        # Fused qkv and gate_up, partial rotary, longrope, window. The logits test passes the
        # original 48 positions (long factors), generation stays inside them (short factors):
        # transformers' Phi-3 `generate` re-encodes the whole sequence when it crosses them, which
        # a KV-cache engine (ours, llama.cpp's) does not.
        "phi3": (T.Phi3Config(**{**SHAPE, "max_position_embeddings": 192}, original_max_position_embeddings=48,
                              sliding_window=WINDOW, rope_parameters={
                                  "rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
                                  "short_factor": [1.0, 1.1, 1.2, 1.5], "long_factor": [1.0, 2.0, 3.0, 4.0],
                                  "original_max_position_embeddings": 48}), 0.3),
        # Soft-capping of scores and logits, sandwich norms, alternating windows, sqrt(C) embeddings.
        "gemma2": (T.Gemma2Config(**SHAPE, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                  attn_logit_softcapping=5.0, final_logit_softcapping=3.0), 0.05),
        # Today's family on the table: local and global RoPE bases, a global layer every 3rd.
        "gemma3": (T.Gemma3TextConfig(**SHAPE, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}), 0.05),
        # Post-norms only, QK-norm over the whole projection.
        "olmo2": (T.Olmo2Config(**SHAPE), 0.3),
    }


FAMILIES = list(_configs())


def make_checkpoint(family: str, folder) -> torch.nn.Module:
    """A tiny random `family` checkpoint saved by transformers into `folder` (with GPT-2's
    tokenizer files); returns transformers' model."""
    config, std = _configs()[family]
    config.initializer_range = std
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits norms to their identity; make them matter
        for name, parameter in reference.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0 if family.startswith("gemma") else 1.0, 0.3)
            elif name.endswith(".bias"):  # transformers starts Qwen 2's q/k/v biases at zero
                parameter.normal_(0.0, 0.3)
    reference.save_pretrained(folder)
    hf_tokenizer(gpt2_tokenizer()).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False}))
    return reference


def _ids(steps: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, (2, steps), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = make_checkpoint(request.param, folder)
    return request.param, folder, reference, load_model(str(folder))


def test_logits_match_transformers_past_the_window(checkpoint):
    family, _, reference, loaded = checkpoint
    assert loaded.model.config.family == family
    ids = _ids(56)  # far longer than the 5-token window and phi3's 48-position original context
    with torch.no_grad():
        expected = reference(ids).logits
        actual = loaded.model(ids)
    assert (actual - expected).abs().max().item() <= 1e-4
    windows = [layer.self_attn.window for layer in loaded.model.model.layers]
    if family in ("qwen2", "mistral", "phi3", "gemma2", "gemma3"):
        assert WINDOW in windows  # the window is on, and it matters:
        for layer in loaded.model.model.layers:
            layer.self_attn.window = None
        try:
            with torch.no_grad():
                assert (loaded.model(ids) - expected).abs().max().item() > 1e-3
        finally:
            for layer, window in zip(loaded.model.model.layers, windows):
                layer.self_attn.window = window


def test_greedy_continuations_match_transformers_generate(checkpoint):
    family, _, reference, loaded = checkpoint
    prompts = [_ids(9, seed=1)[0].tolist(), _ids(4, seed=2)[0].tolist()]  # batched: left padding
    ours = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=32)
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = VOCAB - 1
    for prompt, result in zip(prompts, ours):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):]
        assert result.token_ids == theirs.tolist(), family


def test_our_hf_export_reloads_in_transformers(checkpoint, tmp_path):
    family, _, _, loaded = checkpoint
    export_model(loaded, get_prompt_style("alpaca"), "hf", tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = _ids(20, seed=3)
    with torch.no_grad():
        assert (reloaded(ids).logits - loaded.model(ids)).abs().max().item() <= 1e-4
