"""GGUF files -> our model folder (fp32 safetensors, config, tokenizer.json).

A GGUF is read by `read_gguf` (its metadata in well under a second, where `gguf.GGUFReader`
takes ~15 s for Gemma's vocabulary) and dequantized (~7 s for Gemma) once; the folder is cached,
and later loads read safetensors and tokenizer.json in well under 3 s.

Tokenizers are built in gguf_tokenizer.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from instructkit.errors import UserError
from instructkit.models.families import FAMILIES, family_for_gguf_arch, family_of
from instructkit.models.gpt2 import GPT2Config
from instructkit.models.gguf_tokenizer import _array, _field, special_token_names, tokenizer_from_gguf



# Reading GGUF files -------------------------------------------------------------------------------
# gguf.GGUFReader builds numpy views for every string of the vocabulary (~15 s for Gemma's 262,144
# tokens, ~10 s for GPT-2's 50,257 tokens and 50,000 merges); this parse of the same v2/v3 layout
# (header, typed key-values, tensor infos, aligned data) takes well under a second, with numeric
# arrays read in bulk and tensors left memory-mapped.
# GGUF value types -> struct formats (little-endian) and numpy dtypes; 8 is a string, 9 an array.
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRUCTS = {kind: struct.Struct(fmt) for kind, fmt in _FORMATS.items()}
_DTYPES = {kind: np.dtype(fmt) for kind, fmt in _FORMATS.items()}
_U64 = _STRUCTS[10]
_STRING, _ARRAY = 8, 9
# Tensor types whose data are plain numbers (the rest are blocks of bytes to dequantize).
_TYPED = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64}


@dataclass
class GGUFField:
    value: object

    def contents(self):
        return self.value


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # fastest-varying first, as the file lists them
    tensor_type: int
    data: np.ndarray  # as gguf.GGUFReader gives it: typed for _TYPED, rows of bytes otherwise


@dataclass
class GGUFFile:
    fields: dict[str, GGUFField]
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buffer):
        self.buffer, self.at = buffer, 0

    def scalar(self, kind: int):
        (value,) = _STRUCTS[kind].unpack_from(self.buffer, self.at)
        self.at += _STRUCTS[kind].size
        return value

    def string(self) -> str:
        (size,) = _U64.unpack_from(self.buffer, self.at)
        start = self.at + 8
        self.at = start + size
        return bytes(self.buffer[start:self.at]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.scalar(kind)
        item, count = self.scalar(4), self.scalar(10)
        if item == _STRING:
            return [self.string() for _ in range(count)]
        if item == _ARRAY:
            return [self.value(_ARRAY) for _ in range(count)]
        dtype = _DTYPES[item]
        values = np.frombuffer(self.buffer, dtype, count, self.at).tolist()
        self.at += dtype.itemsize * count
        return values


def read_gguf(path: Path) -> GGUFFile:
    """A GGUF file's metadata and (memory-mapped) tensors, or a UserError in one line."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    try:
        buffer = np.memmap(path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(buffer).cast("B").toreadonly())
        if bytes(buffer[:4]) != b"GGUF":
            raise ValueError("no GGUF magic number")
        cursor.at = 4
        version = cursor.scalar(4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian, or newer than v3)")
        n_tensors, n_fields = cursor.scalar(10), cursor.scalar(10)
        fields = {}
        for _ in range(n_fields):
            key = cursor.string()
            fields[key] = GGUFField(cursor.value(cursor.scalar(4)))
        infos = []
        for _ in range(n_tensors):
            name = cursor.string()
            shape = tuple(cursor.scalar(10) for _ in range(cursor.scalar(4)))
            infos.append((name, shape, cursor.scalar(4), cursor.scalar(10)))
        alignment = int(fields["general.alignment"].value) if "general.alignment" in fields else 32
        start = -(-cursor.at // alignment) * alignment
        tensors = []
        for name, shape, kind, offset in infos:
            kind = GGMLQuantizationType(kind)
            block, size = GGML_QUANT_SIZES[kind]
            count = int(np.prod(shape, dtype=np.int64))
            rows = tuple(reversed(shape))
            raw = buffer[start + offset:start + offset + count // block * size]
            if kind.name in _TYPED:
                data = raw.view(_TYPED[kind.name]).reshape(rows)
            else:  # quantized (and BF16): rows of bytes
                data = raw.reshape(quant_shape_to_byte_shape(rows, kind))
            tensors.append(GGUFTensor(name, shape, kind, data))
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise UserError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    return GGUFFile(fields, tensors)


def dequantized_tensors(reader) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    tensors = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
        shape = tuple(reversed([int(n) for n in tensor.shape]))
        tensors[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return tensors


# What llama.cpp's implementation of each architecture reads from a GGUF and what it fixes ----------
@dataclass(frozen=True)
class LlamaCppArch:
    """One row of what llama.cpp (as in llama-cpp-python 0.3.36) does with a GGUF architecture,
    learnt from its source and by probing (shared/FINDINGS.md): export/gguf.py writes by it, and
    `config_from_gguf` reads by it, so both sides agree on what a GGUF leaves unsaid."""

    # Sliding windows: `attention.sliding_window` and a per-layer `attention.sliding_window_pattern`
    # (bools). Without them llama.cpp runs every layer over the whole context.
    windows: bool = False
    # A separate RoPE base on sliding layers (`rope.freq_base_swa`) and llama.cpp's default for it.
    local_rope_base: float | None = None
    attn_softcap: bool = False  # attn_logit_softcapping
    final_softcap: bool = False  # final_logit_softcapping
    rope_freqs: bool = False  # a `rope_freqs` tensor of per-frequency divisors (Llama 3's scaling)
    longrope: bool = False  # `rope_factors_long` / `rope_factors_short` (Phi-3)
    # `rope.dimension_count` below key_length (most graphs assert they are equal, aborting the process)
    partial_rotary: bool = False
    output_required: bool = False  # no tied head: `output.weight` must be present
    # llama.cpp scales queries by 1 / sqrt(head_dim) and reads no key for it; where it derives
    # another value from the shape: (layers, hidden size, heads, head_dim) -> what it takes the
    # inverse square root of (our query_pre_attn_scalar).
    query_scalar: Callable[[int, int, int, int], float] | None = None

    def llama_cpp_query_scalar(self, layers: int, hidden: int, heads: int, head_dim: int) -> float:
        return head_dim if self.query_scalar is None else self.query_scalar(layers, hidden, heads, head_dim)


def _gemma_query_scalar(layers_of_27b: int) -> Callable[[int, int, int, int], float]:
    """llama.cpp's Gemma 2 / 3 rule: 1/sqrt(head_dim), but 1/sqrt(hidden / heads) for the 27B's
    layer count (after google/gemma_pytorch's configs)."""
    return lambda layers, hidden, heads, head_dim: hidden / heads if layers == layers_of_27b else head_dim


LLAMA_CPP: dict[str, LlamaCppArch] = {
    "llama": LlamaCppArch(rope_freqs=True),
    "qwen2": LlamaCppArch(),
    "qwen3": LlamaCppArch(),
    "phi3": LlamaCppArch(longrope=True, partial_rotary=True),
    "gemma2": LlamaCppArch(windows=True, attn_softcap=True, final_softcap=True, partial_rotary=True,
                           query_scalar=_gemma_query_scalar(46)),
    "gemma3": LlamaCppArch(windows=True, local_rope_base=10_000.0, final_softcap=True, partial_rotary=True,
                           query_scalar=_gemma_query_scalar(62)),
    "olmo2": LlamaCppArch(output_required=True),
}


def config_from_gguf(reader, tensors: dict[str, torch.Tensor], path: Path):
    """The model config from a GGUF's metadata: llama.cpp's `{arch}.*` keys are read into the
    shape of an HF config.json and go through the family's own reader (families.py), so windows,
    RoPE and norms are decided in one place. What a GGUF leaves out is what llama.cpp assumes for
    the architecture (LLAMA_CPP; Gemma 3: a global layer every 6th, a local RoPE base of 10,000)."""
    arch = str(_field(reader, "general.architecture"))
    vocab = int(tensors["token_embd.weight"].shape[0]) if "token_embd.weight" in tensors else len(_array(reader, "tokenizer.ggml.tokens"))

    def key(name: str, default=None):
        return _field(reader, f"{arch}.{name}", default)

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, context_length=int(key("context_length")), emb_dim=int(key("embedding_length")),
            n_layers=int(key("block_count")), n_heads=int(key("attention.head_count")),
            layer_norm_eps=float(key("attention.layer_norm_epsilon", 1e-5)),
        )
    family = family_for_gguf_arch(arch, str(path))
    llama_cpp = LLAMA_CPP.get(arch, LlamaCppArch())
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", int(key("embedding_length")) // heads))
    output = tensors.get("output.weight")
    hf = {
        "vocab_size": vocab, "max_position_embeddings": int(key("context_length")),
        "hidden_size": int(key("embedding_length")), "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)), "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10_000.0)),
        # A head written out that equals the embedding is a tied one (archs that require the tensor).
        "tie_word_embeddings": output is None or (output.shape == tensors["token_embd.weight"].shape
                                                  and torch.equal(output, tensors["token_embd.weight"])),
    }
    if llama_cpp.query_scalar is not None:
        hf["query_pre_attn_scalar"] = llama_cpp.query_scalar(hf["num_hidden_layers"], hf["hidden_size"], heads,
                                                             head_dim)
    if llama_cpp.attn_softcap:
        hf["attn_logit_softcapping"] = key("attn_logit_softcapping")
    if llama_cpp.final_softcap:
        hf["final_logit_softcapping"] = key("final_logit_softcapping")
    if llama_cpp.local_rope_base is not None:
        hf["rope_local_base_freq"] = float(key("rope.freq_base_swa", llama_cpp.local_rope_base))
    window = key("attention.sliding_window")
    if window:
        hf.update(sliding_window=int(window), use_sliding_window=True, max_window_layers=0)
        pattern = key("attention.sliding_window_pattern")
        if isinstance(pattern, list):  # per layer; a scalar (or none) leaves the family's default
            hf["layer_types"] = ["sliding_attention" if bool(p) else "full_attention" for p in pattern]
    rotary = key("rope.dimension_count")
    if rotary and int(rotary) != head_dim:
        hf["partial_rotary_factor"] = int(rotary) / head_dim
    if key("rope.scaling.type") == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    config = family.config_from_hf(hf)
    if window and config.sliding_window is None:  # llama.cpp's `llama` is Llama and Mistral: the one with windows
        config = next((c for c in (f.config_from_hf(hf) for f in FAMILIES.values() if f.gguf_arch == arch)
                       if c.sliding_window is not None), config)
    if "rope_freqs.weight" in tensors:  # llama3-style scaling, stored as per-frequency divisors
        config = replace(config, rope_scaling={"rope_type": "factors", "factors": tensors["rope_freqs.weight"].tolist()})
    if "rope_factors_long.weight" in tensors:  # Phi-3's longrope
        config = replace(config, rope_scaling={
            "rope_type": "longrope", "long_factor": tensors["rope_factors_long.weight"].tolist(),
            "short_factor": tensors["rope_factors_short.weight"].tolist(),
            "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
            "attention_factor": float(key("rope.scaling.attn_factor", 1.0))})
    return config


def _chat_template(reader) -> dict:
    """{"chat_template": text} when the file carries one (`tokenizer.chat_template`), else {}."""
    field = reader.fields.get("tokenizer.chat_template")
    value = field.contents() if field is not None else None
    return {"chat_template": value} if isinstance(value, str) and value.strip() else {}


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
            json.dumps({"kind": "tokenizer.json", "file": "tokenizer.json", **special_token_names(reader, path),
                        **_chat_template(reader)}, indent=2)
        )
        (staging / "source.json").write_text(json.dumps({"gguf": str(path), "size": path.stat().st_size}, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
