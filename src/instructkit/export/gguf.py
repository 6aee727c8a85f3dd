"""Export to a GGUF file that llama.cpp (and Ollama) load, with the `gguf` package's writer.

Quantizations: f32, f16 and q8_0 with the writer's own quantizers (its Q8_0 is byte-identical to
llama.cpp's); q4_k_m through llama.cpp's quantizer in llama-cpp-python, from an F32 file. Norms
and other vectors stay F32. What llama.cpp needs, learnt by probing (shared/FINDINGS.md):
hyper-parameters as typed UINT32 / FLOAT32 values, Gemma's norms stored as 1 + w, no output
tensor (the head is tied), the tokenizer's arrays, and `tokenizer.chat_template` from the run's
prompt style, which llama-cpp-python's chat handling then uses by itself.

llama.cpp fixes parts of Gemma 3 that the GGUF cannot say (a global layer every 6th, a local
RoPE base of 10,000, queries scaled by 1/sqrt(head_dim)), so a Gemma 3 model built otherwise
(e.g. the tiny test preset) is refused rather than exported to something llama.cpp would run
differently.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from instructkit.data.prompts import PromptStyle
from instructkit.errors import UserError
from instructkit.export.templates import jinja_chat_template
from instructkit.models.families import family_of
from instructkit.models.registry import LoadedModel
from instructkit.models.tokenizer import gguf_vocabulary

QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
# llama.cpp's file types (llama_ftype), recorded as general.file_type.
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}


def check_llama_cpp_compatible(config) -> None:
    if config.family != "gemma3":
        return
    fixed = {"a global layer every 6th": all(config.is_sliding(i) == ((i + 1) % 6 != 0) for i in range(config.n_layers)),
             "a local RoPE base of 10,000": config.rope_base_local == 10_000.0,
             "queries scaled by 1/sqrt(head_dim)": config.query_pre_attn_scalar == config.head_dim}
    broken = [what for what, holds in fixed.items() if not holds]
    if broken:
        raise UserError(f"this Gemma 3 model differs from what llama.cpp assumes for the architecture "
                        f"({', '.join(broken)}), so a GGUF of it would run differently there; export it as hf instead")


def _add_hyperparameters(writer, config) -> None:
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.emb_dim)
    writer.add_block_count(config.n_layers)
    writer.add_head_count(config.n_heads)
    if config.family == "gemma3":
        writer.add_feed_forward_length(config.hidden_dim)
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(config.rope_base_global)
        writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_feed_forward_length(4 * config.emb_dim)
        writer.add_layer_norm_eps(config.layer_norm_eps)


def _add_tokenizer(writer, loaded: LoadedModel, style: PromptStyle) -> None:
    tokenizer = loaded.tokenizer
    vocabulary = gguf_vocabulary(tokenizer)
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    if vocabulary.merges is not None:
        writer.add_token_merges(vocabulary.merges)
    writer.add_bos_token_id(tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    unknown = tokenizer.token_id("<unk>")
    if unknown is not None:
        writer.add_unk_token_id(unknown)
    end = style.end_token_id(tokenizer)
    if end != tokenizer.eos_id:
        writer.add_eot_token_id(end)  # llama.cpp ends generation on it too
    writer.add_add_bos_token(tokenizer.bos_id is not None)
    writer.add_add_eos_token(False)
    if vocabulary.model == "llama":
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    writer.add_chat_template(jinja_chat_template(style, bos=tokenizer.bos_id is not None))


def _write(loaded: LoadedModel, style: PromptStyle, path: Path, quant: str) -> None:
    """One GGUF in f32, f16 or q8_0."""
    import gguf

    config = loaded.model.config
    family = family_of(config.family)
    writer = gguf.GGUFWriter(str(path), arch=family.gguf_arch)
    writer.add_name(loaded.name)
    writer.add_file_type(_FILE_TYPE[quant])
    if quant != "f32":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, loaded, style)
    state = family.to_gguf({name: tensor.detach().float() for name, tensor in loaded.model.state_dict().items()}, config)
    for name, tensor in state.items():
        array = tensor.numpy()
        if array.ndim < 2 or quant == "f32":  # norms, biases and other vectors stay F32
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif quant == "f16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(loaded: LoadedModel, style: PromptStyle, path: Path, quant: str = "f16") -> Path:
    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    check_llama_cpp_compatible(loaded.model.config)
    if quant != "q4_k_m":
        _write(loaded, style, path, quant)
        return path
    try:
        import llama_cpp
    except ImportError:
        raise UserError("--quant q4_k_m needs llama.cpp's quantizer: `pip install llama-cpp-python` "
                        "(or export f16 / q8_0, which need nothing more)") from None
    fd, staging = tempfile.mkstemp(suffix=".f32.gguf", dir=path.parent)
    os.close(fd)
    try:
        _write(loaded, style, Path(staging), "f32")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(staging.encode(), str(path).encode(), params) != 0:
            raise UserError(f"llama.cpp could not quantize {path.name} to Q4_K_M")
    finally:
        Path(staging).unlink(missing_ok=True)
    return path
