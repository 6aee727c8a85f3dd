"""Export to a GGUF file that llama.cpp (and Ollama) load, with the `gguf` package's writer.

Quantizations: f32, f16 and q8_0 with the writer's own quantizers (its Q8_0 is byte-identical to
llama.cpp's); q4_k_m through llama.cpp's quantizer in llama-cpp-python, from an F32 file. Norms
and other vectors stay F32. What llama.cpp needs, learnt by probing (shared/FINDINGS.md):
hyper-parameters as typed UINT32 / FLOAT32 values, tensors in its names (weight_maps.to_gguf:
Gemma's norms as 1 + w, Llama's interleaved Q/K rows, Phi-3's fused tensors), the tokenizer's
arrays padded to the embedding's rows, and `tokenizer.chat_template` from the run's prompt
style, which llama-cpp-python's chat handling then uses by itself.

What llama.cpp does with each architecture is one table (gguf_convert.LLAMA_CPP, which the
reader uses too); `plan_gguf` compares a model with it. Where llama.cpp would run the model
differently, the export either writes what makes it exact, with a one-line notice where the user
should know (a window llama.cpp cannot apply: the GGUF's context length is capped at it; a query
scale llama.cpp fixes otherwise: folded into the query weights), or is refused in one line that
names the family and the reason.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from instructkit.data.prompts import PromptStyle
from instructkit.errors import UserError
from instructkit.export.templates import jinja_chat_template
from instructkit.models.families import family_of
from instructkit.models.gguf_convert import LLAMA_CPP, LlamaCppArch
from instructkit.models.registry import LoadedModel
from instructkit.models.tokenizer import gguf_vocabulary
from instructkit.models.transformer import TransformerConfig, inverse_frequencies

QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
# llama.cpp's file types (llama_ftype), recorded as general.file_type.
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}
_UNUSED = 5  # llama.cpp's token type of padding entries


@dataclass
class GGUFPlan:
    """What a GGUF of a model holds beyond its tensors, and what the user is told about it."""

    arch: str
    context_length: int
    notices: list[str] = field(default_factory=list)
    query_factor: float = 1.0  # folded into the query path (llama.cpp fixes another query scale)


def plan_gguf(config) -> GGUFPlan:
    """How to write `config` so llama.cpp runs it as we do, or a UserError in one line saying why
    it cannot. GPT-2 has nothing llama.cpp could run otherwise."""
    family = family_of(config.family)
    if not isinstance(config, TransformerConfig):
        return GGUFPlan(family.gguf_arch, config.context_length)
    arch = LLAMA_CPP[family.gguf_arch]
    plan = GGUFPlan(family.gguf_arch, config.context_length)
    unsupported = []
    sliding = [config.is_sliding(i) for i in range(config.n_layers)]
    if any(sliding) and not arch.windows and config.sliding_window < config.context_length:
        # Up to the window, attending over the whole context and over the window are the same.
        plan.context_length = config.sliding_window
        plan.notices.append(f"{config.family}: llama.cpp runs its '{plan.arch}' architecture without sliding windows, "
                            f"so the GGUF's context length is capped at the window ({config.sliding_window} tokens), "
                            "where the two agree")
    if config.rope_theta_local is not None and arch.local_rope_base is None and any(sliding):
        unsupported.append("a separate RoPE base on sliding layers")
    if config.attn_softcap and not arch.attn_softcap:
        unsupported.append("soft-capping of attention scores")
    if config.final_softcap and not arch.final_softcap:
        unsupported.append("soft-capping of the final logits")
    if config.rotary_dim is not None and config.rotary_dim != config.head_dim and not arch.partial_rotary:
        unsupported.append("partial rotary embeddings")
    kind = (config.rope_scaling or {}).get("rope_type", "default")
    if kind in ("llama3", "factors") and not arch.rope_freqs:
        unsupported.append(f"{kind} RoPE scaling")
    if kind == "longrope":
        if not arch.longrope:
            unsupported.append("longrope RoPE scaling")
        elif plan.context_length > config.rope_scaling["original_max_position_embeddings"]:
            original = config.rope_scaling["original_max_position_embeddings"]
            plan.notices.append(f"{config.family}: llama.cpp picks the long RoPE factors by the context it is run with "
                                f"(n_ctx above {original}), not by the text's length as transformers does")
    if unsupported:
        raise UserError(f"{config.family}: llama.cpp's '{plan.arch}' architecture has no {' or '.join(unsupported)}, "
                        "so a GGUF of this model would run differently there; export it as hf instead")
    theirs = arch.llama_cpp_query_scalar(config.n_layers, config.emb_dim, config.n_heads, config.head_dim)
    plan.query_factor = math.sqrt(theirs) * config.query_scale  # ours / llama.cpp's
    if abs(plan.query_factor - 1.0) < 1e-6:
        plan.query_factor = 1.0
    return plan


# Hyper-parameters --------------------------------------------------------------------------------
def _add_transformer_hyperparameters(writer, config: TransformerConfig, arch: LlamaCppArch, plan: GGUFPlan,
                                     tensors: dict[str, torch.Tensor]) -> None:
    """llama.cpp's keys for the model's shape, norms, windows, soft-caps and RoPE (the tensors
    that carry RoPE factors are added to `tensors`)."""
    import gguf

    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(plan.context_length)
    writer.add_embedding_length(config.emb_dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.rotary_dim or config.head_dim)
    sliding = [config.is_sliding(i) for i in range(config.n_layers)]
    if any(sliding):  # written even where llama.cpp ignores them (plan capped the context): our reader keeps them
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern(sliding)
        if arch.local_rope_base is not None:  # llama.cpp's default for it is no model's own
            writer.add_rope_freq_base_swa(config.rope_theta_local or config.rope_theta)
    if config.attn_softcap:
        writer.add_attn_logit_softcapping(config.attn_softcap)
    if config.final_softcap:
        writer.add_final_logit_softcapping(config.final_softcap)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind in ("llama3", "factors"):
        # llama.cpp divides each rotary frequency by its entry of rope_freqs.
        positions = torch.zeros(1, 1, dtype=torch.long)
        scaled, _ = inverse_frequencies(config, local=False, positions=positions)
        plain, _ = inverse_frequencies(replace(config, rope_scaling=None), local=False, positions=positions)
        tensors["rope_freqs.weight"] = (plain / scaled).float()
    elif kind == "longrope":
        _, attention_factor = inverse_frequencies(config, local=False, positions=torch.zeros(1, 1, dtype=torch.long))
        writer.add_rope_scaling_attn_factors(float(attention_factor))
        # A context capped within the original one never needs the long factors; llama.cpp
        # (which rounds n_ctx up to 256) could still pick them, so they equal the short ones.
        original = int(scaling["original_max_position_embeddings"])
        long = scaling["short_factor"] if plan.context_length <= original else scaling["long_factor"]
        tensors["rope_factors_long.weight"] = torch.tensor(long, dtype=torch.float32)
        writer.add_rope_scaling_orig_ctx_len(original)
        tensors["rope_factors_short.weight"] = torch.tensor(scaling["short_factor"], dtype=torch.float32)


def _add_gpt2_hyperparameters(writer, config) -> None:
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.emb_dim)
    writer.add_block_count(config.n_layers)
    writer.add_head_count(config.n_heads)
    writer.add_feed_forward_length(4 * config.emb_dim)
    writer.add_layer_norm_eps(config.layer_norm_eps)


def _fold_query_scale(tensors: dict[str, torch.Tensor], config: TransformerConfig, factor: float) -> None:
    """Scale every layer's queries by `factor` before RoPE (which is linear): through the query
    norm's weight where there is one (it would undo a scaled projection), else the projection's
    rows (the first n_heads * head_dim of a fused qkv) and bias."""
    rows = config.n_heads * config.head_dim
    for name in list(tensors):
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if (config.qk_norm != "none" and kind == "attn_q_norm") or (config.qk_norm == "none" and kind == "attn_q"):
            tensors[name] = tensors[name] * factor
        elif config.qk_norm == "none" and kind == "attn_qkv":
            tensors[name] = torch.cat([tensors[name][:rows] * factor, tensors[name][rows:]])


# Tokenizer ---------------------------------------------------------------------------------------
def _add_tokenizer(writer, loaded: LoadedModel, style: PromptStyle, vocab_size: int) -> None:
    tokenizer = loaded.tokenizer
    vocabulary = gguf_vocabulary(tokenizer)
    tokens, types, scores = list(vocabulary.tokens), list(vocabulary.token_types), vocabulary.scores
    if len(tokens) > vocab_size:
        raise UserError(f"{loaded.model.config.family}: the tokenizer has {len(tokens):,} tokens but the model's "
                        f"embedding only {vocab_size:,} rows; llama.cpp needs one row per token")
    # The embedding may have more rows than the tokenizer has tokens (Qwen pads it): llama.cpp
    # wants one token per row, so the rest are unused placeholders, as its own converter writes.
    padding = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [_UNUSED] * padding
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(list(scores) + [-1000.0] * padding)  # as llama.cpp's converter
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


# Writing -----------------------------------------------------------------------------------------
def gguf_tensors(loaded: LoadedModel, plan: GGUFPlan) -> dict[str, torch.Tensor]:
    """The model's tensors in llama.cpp's names, as plan says (a head where the arch needs one)."""
    config = loaded.model.config
    family = family_of(config.family)
    state = {name: tensor.detach().float() for name, tensor in loaded.model.state_dict().items()}
    tensors = family.to_gguf(state, config)
    if isinstance(config, TransformerConfig):
        if "output.weight" not in tensors and LLAMA_CPP[plan.arch].output_required:
            tensors["output.weight"] = tensors["token_embd.weight"]
        if plan.query_factor != 1.0:
            _fold_query_scale(tensors, config, plan.query_factor)
    return tensors


def _write(loaded: LoadedModel, style: PromptStyle, path: Path, quant: str, plan: GGUFPlan) -> None:
    """One GGUF in f32, f16 or q8_0."""
    import gguf

    config = loaded.model.config
    writer = gguf.GGUFWriter(str(path), arch=plan.arch)
    writer.add_name(loaded.name)
    writer.add_file_type(_FILE_TYPE[quant])
    if quant != "f32":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors = gguf_tensors(loaded, plan)
    if isinstance(config, TransformerConfig):
        _add_transformer_hyperparameters(writer, config, LLAMA_CPP[plan.arch], plan, tensors)
    else:
        _add_gpt2_hyperparameters(writer, config)
    _add_tokenizer(writer, loaded, style, config.vocab_size)
    # Each tensor's layout is declared first and its data converted and written one at a time:
    # handing the writer every converted array (add_tensor) held the whole f16 / q8_0 copy beside
    # the fp32 model until the end (a 1.5B model's f16 export peaked at 9.3 GB, the model being 6.1).
    for name, tensor in tensors.items():
        shape, dtype, raw = _stored_layout(tuple(tensor.shape), quant)
        writer.add_tensor_info(name, shape, dtype, math.prod(shape) * dtype.itemsize, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors.values():
        _, dtype, raw = _stored_layout(tuple(tensor.shape), quant)
        array = tensor.numpy()
        writer.write_tensor_data(gguf.quants.quantize(array, raw) if raw else np.ascontiguousarray(array, dtype=dtype))
    writer.close()


def _stored_layout(shape: tuple[int, ...], quant: str):
    """How a tensor of `shape` is stored: (shape as written, numpy dtype, GGML type for quantized
    bytes or None). Norms, biases and other vectors stay F32; q8_0 matrices are bytes."""
    import gguf

    if len(shape) < 2 or quant == "f32":
        return shape, np.dtype(np.float32), None
    if quant == "f16":
        return shape, np.dtype(np.float16), None
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quant_shape_to_byte_shape(shape, q8_0), np.dtype(np.uint8), q8_0


def write_gguf(loaded: LoadedModel, style: PromptStyle, path: Path, quant: str = "f16") -> Path:
    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    plan = plan_gguf(loaded.model.config)
    for notice in plan.notices:
        print(f"note: {notice}", file=sys.stderr, flush=True)
    if quant != "q4_k_m":
        _write(loaded, style, path, quant, plan)
        return path
    try:
        import llama_cpp
    except ImportError:
        raise UserError("--quant q4_k_m needs llama.cpp's quantizer: `pip install llama-cpp-python` "
                        "(or export f16 / q8_0, which need nothing more)") from None
    fd, staging = tempfile.mkstemp(suffix=".f32.gguf", dir=path.parent)
    os.close(fd)
    try:
        _write(loaded, style, Path(staging), "f32", plan)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(staging.encode(), str(path).encode(), params) != 0:
            raise UserError(f"llama.cpp could not quantize {path.name} to Q4_K_M")
    finally:
        Path(staging).unlink(missing_ok=True)
    return path
