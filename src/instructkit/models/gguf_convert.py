"""GGUF files -> our model folder (fp32 safetensors, config, tokenizer.json).

Reading a GGUF with `gguf.GGUFReader` takes ~15 s for Gemma (it parses 262,144 vocabulary
entries one by one) and dequantizing takes ~7 s, so a GGUF is converted once and the folder is
cached; later loads read safetensors and tokenizer.json in well under 3 s.

Tokenizers: a SentencePiece-style vocabulary (`tokenizer.ggml.model = llama`, as Gemma's) becomes
an HF `tokenizers` BPE whose merges are ranked by the score of the merged piece, which is how
llama.cpp's SPM tokenizer picks merges; user-defined pieces (whitespace runs, HTML tags) and
control tokens are matched whole before BPE, as llama.cpp does. GPT-2 style vocabularies
(`tokenizer.ggml.model = gpt2`) carry their merges and use byte-level BPE.
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

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _array(reader, key: str) -> list:
    field = reader.fields.get(key)
    if field is None:
        return []
    return field.contents()


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


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece-BPE scoring: a merge ranks by the merged piece's score."""
    mergeable = {token: score for token, score, kind in zip(tokens, scores, types) if kind == NORMAL}
    merges: list[tuple[float, float, str, str]] = []
    for piece, score in mergeable.items():
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in mergeable and right in mergeable:
                merges.append((score, mergeable[left] + mergeable[right], left, right))
    merges.sort(key=lambda m: (m[0], m[1]), reverse=True)
    return [(left, right) for _, _, left, right in merges]


def tokenizer_from_gguf(reader, path: Path):
    """Build an HF `tokenizers.Tokenizer` from the GGUF's vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = [str(t) for t in _array(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _array(reader, "tokenizer.ggml.token_type")] or [NORMAL] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    if kind == "llama":
        scores = [float(s) for s in _array(reader, "tokenizer.ggml.scores")]
        unk = tokens[int(_field(reader, "tokenizer.ggml.unknown_token_id", 0))]
        backend = Tokenizer(
            models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=unk,
                       byte_fallback=True, fuse_unk=True)
        )
        if _field(reader, "tokenizer.ggml.add_space_prefix", False):
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    elif kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in _array(reader, "tokenizer.ggml.merges")]
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    else:
        raise UserError(f"{path}: tokenizer model {kind!r} is not supported (supported: llama/SentencePiece, gpt2)")
    # Matched whole in raw text before BPE, as llama.cpp does; never normalised.
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL])
    return backend


def special_token_names(reader) -> dict[str, str | None]:
    tokens = _array(reader, "tokenizer.ggml.tokens")

    def name(key: str) -> str | None:
        index = _field(reader, key)
        return str(tokens[int(index)]) if index is not None else None

    bos = name("tokenizer.ggml.bos_token_id") if _field(reader, "tokenizer.ggml.add_bos_token", False) else None
    eos = name("tokenizer.ggml.eos_token_id")
    pad = name("tokenizer.ggml.padding_token_id") or eos
    return {"eos": eos, "pad": pad, "bos": bos}


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
