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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from instructkit.errors import UserError
from instructkit.models.families import family_of
from instructkit.models.gemma3 import Gemma3Config
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


def config_from_gguf(reader, path: Path) -> Gemma3Config | GPT2Config:
    arch = _field(reader, "general.architecture")
    vocab = len(_array(reader, "tokenizer.ggml.tokens"))
    if arch == "gemma3":
        return Gemma3Config(
            vocab_size=vocab,
            context_length=int(_field(reader, "gemma3.context_length")),
            emb_dim=int(_field(reader, "gemma3.embedding_length")),
            n_layers=int(_field(reader, "gemma3.block_count")),
            n_heads=int(_field(reader, "gemma3.attention.head_count")),
            n_kv_heads=int(_field(reader, "gemma3.attention.head_count_kv")),
            head_dim=int(_field(reader, "gemma3.attention.key_length")),
            hidden_dim=int(_field(reader, "gemma3.feed_forward_length")),
            query_pre_attn_scalar=float(_field(reader, "gemma3.attention.key_length")),
            rms_norm_eps=float(_field(reader, "gemma3.attention.layer_norm_rms_epsilon")),
            sliding_window=int(_field(reader, "gemma3.attention.sliding_window")),
            # Not stored in the GGUF: fixed by the architecture (FINDINGS.md).
            sliding_window_pattern=6,
            rope_base_global=float(_field(reader, "gemma3.rope.freq_base", 1_000_000.0)),
            rope_base_local=10_000.0,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            context_length=int(_field(reader, "gpt2.context_length")),
            emb_dim=int(_field(reader, "gpt2.embedding_length")),
            n_layers=int(_field(reader, "gpt2.block_count")),
            n_heads=int(_field(reader, "gpt2.attention.head_count")),
            layer_norm_eps=float(_field(reader, "gpt2.attention.layer_norm_epsilon", 1e-5)),
        )
    raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (supported: gemma3, gpt2)")


def convert_gguf(path: Path, out_dir: Path) -> Path:
    """Convert a GGUF into a model folder, written atomically (temporary folder, then rename)."""
    from safetensors.torch import save_file

    reader = read_gguf(path)
    config = config_from_gguf(reader, path)
    tensors = dequantized_tensors(reader)
    state = family_of(config.family).from_gguf(tensors)
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
