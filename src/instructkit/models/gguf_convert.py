"""GGUF files -> our model folder (fp32 safetensors, config, tokenizer.json).

Reading a GGUF with `gguf.GGUFReader` takes ~15 s for Gemma (it parses 262,144 vocabulary
entries one by one) and dequantizing takes ~7 s, so a GGUF is converted once and the folder is
cached; later loads read safetensors and tokenizer.json in well under 3 s.

Tokenizers are built in gguf_tokenizer.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from instructkit.errors import UserError
from instructkit.models.families import family_for_gguf_arch, family_of
from instructkit.models.gpt2 import GPT2Config
from instructkit.models.gguf_tokenizer import _array, _field, special_token_names, tokenizer_from_gguf



def read_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise UserError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def dequantized_tensors(reader) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    tensors = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
        shape = tuple(reversed([int(n) for n in tensor.shape]))
        tensors[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return tensors


def config_from_gguf(reader, tensors: dict[str, torch.Tensor], path: Path):
    """The model config from a GGUF's metadata: llama.cpp's `{arch}.*` keys are read into the
    shape of an HF config.json and go through the family's own reader (families.py), so windows,
    RoPE and norms are decided in one place. What a GGUF leaves out comes from the architecture
    (Gemma 3: a global layer every 6th, local RoPE base 10,000, FINDINGS.md)."""
    arch = _field(reader, "general.architecture")
    vocab = int(tensors["token_embd.weight"].shape[0]) if "token_embd.weight" in tensors else len(_array(reader, "tokenizer.ggml.tokens"))

    def key(name: str, default=None):
        value = _field(reader, f"{arch}.{name}", default)
        return value

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, context_length=int(key("context_length")), emb_dim=int(key("embedding_length")),
            n_layers=int(key("block_count")), n_heads=int(key("attention.head_count")),
            layer_norm_eps=float(key("attention.layer_norm_epsilon", 1e-5)),
        )
    family = family_for_gguf_arch(str(arch), str(path))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", int(key("embedding_length")) // heads))
    hf = {
        "vocab_size": vocab, "max_position_embeddings": int(key("context_length")),
        "hidden_size": int(key("embedding_length")), "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)), "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10_000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attn_logit_softcapping": key("attn_logit_softcapping"), "final_logit_softcapping": key("final_logit_softcapping"),
    }
    window = key("attention.sliding_window")
    if window:
        hf.update(sliding_window=int(window), use_sliding_window=True, max_window_layers=0)
    rotary = key("rope.dimension_count")
    if rotary and int(rotary) != head_dim:
        hf["partial_rotary_factor"] = int(rotary) / head_dim
    if arch in ("gemma2", "gemma3"):  # llama.cpp scales queries by 1/sqrt(head_dim) for these
        hf.update(query_pre_attn_scalar=head_dim, rope_local_base_freq=10_000.0)
    if key("rope.scaling.type") == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    config = family.config_from_hf(hf)
    if "rope_freqs.weight" in tensors:  # llama3-style scaling, stored as per-frequency divisors
        config = replace(config, rope_scaling={"rope_type": "factors", "factors": tensors["rope_freqs.weight"].tolist()})
    if "rope_factors_long.weight" in tensors:  # Phi-3's longrope
        config = replace(config, rope_scaling={
            "rope_type": "longrope", "long_factor": tensors["rope_factors_long.weight"].tolist(),
            "short_factor": tensors["rope_factors_short.weight"].tolist(),
            "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
            "attention_factor": float(key("rope.scaling.attn_factor", 1.0))})
    return config


def convert_gguf(path: Path, out_dir: Path) -> Path:
    """Convert a GGUF into a model folder, written atomically (temporary folder, then rename)."""
    from safetensors.torch import save_file

    reader = read_gguf(path)
    tensors = dequantized_tensors(reader)
    config = config_from_gguf(reader, tensors, path)
    state = family_of(config.family).from_gguf(tensors, config)
    tokenizer = tokenizer_from_gguf(reader, path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(staging / "model.safetensors"))
        tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "model.json").write_text(json.dumps({"family": config.family, "config": asdict(config)}, indent=2))
        (staging / "tokenizer_ref.json").write_text(
            json.dumps({"kind": "tokenizer.json", "file": "tokenizer.json", **special_token_names(reader)}, indent=2)
        )
        (staging / "source.json").write_text(json.dumps({"gguf": str(path), "size": path.stat().st_size}, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
