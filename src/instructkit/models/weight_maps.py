"""Checkpoint names and configs of the transformer families (transformer.py), driven by each
family's table entry (families.py): Hugging Face folders (config.json and tensor names) and GGUF
tensor names, both ways.

Our parameter names are the HF names, so the HF map is a key copy except where a family fuses
tensors (Phi-3's qkv_proj and gate_up_proj, split on reading and joined on writing). GGUF names
follow llama.cpp's (blk.N.attn_q, ...); the norms' GGUF names depend on where they sit, Gemma's
norms hold 1 + w there, and llama.cpp's `llama` architecture stores query and key rows of each
head interleaved (its converter permutes them; `_permute` and `_unpermute` below).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

import torch

from instructkit.errors import UserError
from instructkit.models.transformer import TransformerConfig


@dataclass(frozen=True)
class TransformerFamily:
    """One row of the family table: what a family sets and how its checkpoints name things."""

    name: str
    hf_model_types: tuple[str, ...]  # config.json model_type values it reads
    hf_architecture: str  # config.json "architectures" it writes
    gguf_arch: str  # llama.cpp's architecture name
    switches: dict = field(default_factory=dict)  # TransformerConfig fields the family fixes
    # Which layers slide when config.json has no layer_types: "none", "all" (Mistral, Phi-3),
    # "qwen" (use_sliding_window, from max_window_layers up), "alternate" (Gemma 2: even layers),
    # "every-6th-full" (Gemma 3: sliding_window_pattern).
    window: str = "none"
    fused: dict = field(default_factory=dict)  # HF fused tensor -> our tensors, in order
    gguf_permute_qk: bool = False  # llama.cpp's `llama` architecture: interleaved Q/K rows
    hf_model_type_out: str | None = None  # model_type written on export (default: the first read)


# HF config.json -> ours ------------------------------------------------------------------------
def _rope(hf: dict) -> tuple[float, dict | None, float | None]:
    """(base, scaling or None, local base or None) from either transformers 4's rope_theta /
    rope_scaling / rope_local_base_freq or transformers 5's rope_parameters."""
    parameters = hf.get("rope_parameters")
    local = hf.get("rope_local_base_freq")
    if isinstance(parameters, dict) and "full_attention" in parameters:  # per layer kind (Gemma 3, v5)
        local = parameters.get("sliding_attention", {}).get("rope_theta", local)
        parameters = parameters["full_attention"]
    if isinstance(parameters, dict):
        base = parameters.get("rope_theta", hf.get("rope_theta", 10_000.0))
        scaling = {k: v for k, v in parameters.items() if k not in ("rope_theta", "partial_rotary_factor")}
    else:
        base, scaling = hf.get("rope_theta", 10_000.0), dict(hf.get("rope_scaling") or {})
    kind = scaling.pop("type", None) or scaling.get("rope_type", "default")
    kind = {"su": "longrope"}.get(kind, kind)
    if kind == "default":
        return float(base), None, local
    if kind not in ("linear", "llama3", "longrope"):
        raise UserError(f"rope scaling {kind!r} is not supported (supported: linear, llama3, longrope)")
    scaling["rope_type"] = kind
    if kind == "longrope":
        scaling.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    return float(base), scaling, local


def _layer_types(spec: TransformerFamily, hf: dict, n_layers: int) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding window, per-layer kinds) as transformers decides them for the family."""
    window = hf.get("sliding_window")
    if spec.window == "qwen" and not hf.get("use_sliding_window", False):
        window = None
    if window is None or spec.window == "none":
        return None, None
    if hf.get("layer_types"):
        return window, tuple(hf["layer_types"])
    if spec.window == "all":
        return window, None
    if spec.window == "qwen":
        first = hf.get("max_window_layers", n_layers)
        return window, tuple("sliding_attention" if i >= first else "full_attention" for i in range(n_layers))
    if spec.window == "alternate":
        return window, tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers))
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    return window, tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers))


def config_from_hf(spec: TransformerFamily, hf: dict) -> TransformerConfig:
    hf = hf.get("text_config", hf)  # multimodal Gemma 3 configs nest the text model
    if hf.get("mlp_bias") or (hf.get("attention_bias") and not spec.switches.get("qkv_bias")):
        raise UserError(f"{spec.name}: attention_bias / mlp_bias checkpoints are not supported")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    base, scaling, local = _rope(hf)
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    window, layer_types = _layer_types(spec, hf, hf["num_hidden_layers"])
    return TransformerConfig(
        family=spec.name, **spec.switches,
        vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 4096),
        emb_dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim, hidden_dim=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
        sliding_window=window, layer_types=layer_types, rope_theta=base,
        rope_theta_local=float(10_000.0 if local is None else local) if spec.window == "every-6th-full" else None,
        rope_scaling=scaling, rotary_dim=int(head_dim * partial) if partial != 1.0 else None,
        tie_embeddings=hf.get("tie_word_embeddings", spec.window in ("alternate", "every-6th-full")),
    )


def hf_config(spec: TransformerFamily, config: TransformerConfig) -> dict:
    """config.json that transformers 4.5x and 5.x both read back into the same model."""
    c = config
    if c.rope_scaling and c.rope_scaling.get("rope_type") == "factors":
        raise UserError("this model's RoPE frequencies came from a GGUF file (rope_freqs) and have no "
                        "Hugging Face config form; export it as gguf instead")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}
    out = {
        "architectures": [spec.hf_architecture], "model_type": spec.hf_model_type_out or spec.hf_model_types[0],
        "vocab_size": c.vocab_size, "hidden_size": c.emb_dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.context_length, "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": "gelu_pytorch_tanh" if c.activation == "gelu_tanh" else "silu",
        "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0, "torch_dtype": "float32",
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
        "rope_parameters": rope, "sliding_window": c.sliding_window,
    }
    if c.activation == "gelu_tanh":
        out["hidden_activation"] = "gelu_pytorch_tanh"
    if "qkv_bias" not in spec.switches:
        out["attention_bias"] = False
    if c.layer_types is not None:
        out["layer_types"] = list(c.layer_types)
    if spec.window == "qwen":
        out["use_sliding_window"] = c.sliding_window is not None
        out["max_window_layers"] = next((i for i in range(c.n_layers) if c.is_sliding(i)), c.n_layers)
    if c.query_pre_attn_scalar is not None:
        # transformers' strict config wants an int where the value is whole (256, not 256.0).
        value = c.query_pre_attn_scalar
        out["query_pre_attn_scalar"] = int(value) if float(value).is_integer() else value
    if spec.window in ("alternate", "every-6th-full"):
        out["attn_logit_softcapping"], out["final_logit_softcapping"] = c.attn_softcap, c.final_softcap
    if c.rope_theta_local is not None:
        out["rope_local_base_freq"] = c.rope_theta_local
        out["rope_parameters"] = {"full_attention": rope,
                                  "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_theta_local}}
    if c.rotary_dim is not None:
        out["partial_rotary_factor"] = c.rotary_dim / c.head_dim
        out["rope_parameters"]["partial_rotary_factor"] = c.rotary_dim / c.head_dim
    if c.rope_scaling and c.rope_scaling.get("rope_type") == "longrope":
        out["original_max_position_embeddings"] = c.rope_scaling["original_max_position_embeddings"]
    return out


# HF tensors <-> ours -----------------------------------------------------------------------------
def _split_sizes(ours: tuple[str, ...], config: TransformerConfig) -> list[int]:
    sizes = {"q_proj": config.n_heads * config.head_dim, "k_proj": config.n_kv_heads * config.head_dim,
             "v_proj": config.n_kv_heads * config.head_dim, "gate_proj": config.hidden_dim, "up_proj": config.hidden_dim}
    return [sizes[name.rsplit(".", 1)[-1]] for name in ours]


def from_hf(spec: TransformerFamily, state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> ours. Works tensor by tensor (a loader may pass one at a time)."""
    ours = {}
    for name, tensor in state.items():
        name = name.replace("model.language_model.", "model.")  # multimodal Gemma 3
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_embeddings):
            continue  # a recomputed buffer; the tied head
        fused = next(((stem, parts) for stem, parts in spec.fused.items() if f".{stem}." in name), None)
        if fused is None:
            ours[name] = tensor
            continue
        stem, parts = fused
        for part, piece in zip(parts, torch.split(tensor, _split_sizes(parts, config), dim=0)):
            ours[name.replace(stem, part)] = piece
    return ours


def to_hf(spec: TransformerFamily, state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    out = {name: tensor.contiguous() for name, tensor in state.items()
           if not (name == "lm_head.weight" and config.tie_embeddings)}
    for stem, parts in spec.fused.items():
        for name in [n for n in out if f".{parts[0]}." in n]:
            names = [name.replace(parts[0], part) for part in parts]
            out[name.replace(parts[0], stem)] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


# GGUF tensors <-> ours ---------------------------------------------------------------------------
_GGUF_LAYER = {  # llama.cpp's per-layer names -> ours (norms are added per norm placement)
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_NORMS = {  # llama.cpp's names of the norms at each of NORM_NAMES' four places
    "pre": ("attn_norm", None, "ffn_norm", None),
    "sandwich": ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"),
    "post": (None, "post_attention_norm", None, "post_ffw_norm"),
}
_GGUF_FUSED = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def _gguf_layer_names(spec: TransformerFamily, config: TransformerConfig) -> dict[str, str]:
    from instructkit.models.transformer import NORM_NAMES

    names = dict(_GGUF_LAYER)
    for gguf, ours in zip(_GGUF_NORMS[config.norms], NORM_NAMES[config.norms]):
        if gguf is not None:
            names[gguf] = ours
    for stem, gguf in _GGUF_FUSED.items():
        if stem in spec.fused:
            names[gguf] = stem
    return names


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (its converter's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_gguf(spec: TransformerFamily, tensors: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    names = _gguf_layer_names(spec, config)
    fused_hf = {}
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
            continue  # read into the config (gguf_convert.config_from_gguf)
        if name == "token_embd.weight":
            ours["model.embed_tokens.weight"] = tensor
            continue
        if name == "output_norm.weight":
            ours["model.norm.weight"] = tensor - 1.0 if config.norm_plus_one else tensor
            continue
        if name == "output.weight":
            if not config.tie_embeddings:
                ours["lm_head.weight"] = tensor
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        if m is None or m.group(2) not in names:
            raise UserError(f"GGUF tensor {name!r} is not part of the {spec.name} architecture")
        layer, kind, what = m.groups()
        target = f"model.layers.{layer}.{names[kind]}.{what}"
        if kind.endswith("norm") and config.norm_plus_one:
            tensor = tensor - 1.0
        if spec.gguf_permute_qk and kind in ("attn_q", "attn_k"):
            tensor = _unpermute(tensor, config.n_heads if kind == "attn_q" else config.n_kv_heads)
        if names[kind] in spec.fused:
            fused_hf[target] = tensor
        else:
            ours[target] = tensor
    ours.update(from_hf(spec, fused_hf, config))
    if not config.tie_embeddings and "lm_head.weight" not in ours and "model.embed_tokens.weight" in ours:
        ours["lm_head.weight"] = ours["model.embed_tokens.weight"]  # llama.cpp ties when output is absent
    return ours


def to_gguf(spec: TransformerFamily, state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Our tensors in llama.cpp's names (the inverse of from_gguf; fused tensors joined)."""
    ours_to_gguf = {ours: gguf for gguf, ours in _gguf_layer_names(spec, config).items()}
    out = {}
    for name, tensor in to_hf(spec, state, config).items():
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = tensor
        elif name == "model.norm.weight":
            out["output_norm.weight"] = tensor + 1.0 if config.norm_plus_one else tensor
        elif name == "lm_head.weight":
            out["output.weight"] = tensor
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
            layer, ours, what = m.groups()
            kind = ours_to_gguf[ours]
            if kind.endswith("norm") and config.norm_plus_one:
                tensor = tensor + 1.0
            if spec.gguf_permute_qk and kind in ("attn_q", "attn_k"):
                tensor = _permute(tensor, config.n_heads if kind == "attn_q" else config.n_kv_heads)
            out[f"blk.{layer}.{kind}.{what}"] = tensor
        else:
            raise ValueError(f"no GGUF name for {name}")
    return out


def config_to_dict(config: TransformerConfig) -> dict:
    return asdict(config)


def config_from_dict(values: dict) -> TransformerConfig:
    known = {f.name for f in fields(TransformerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field {unknown[0]!r}")
    if values.get("layer_types") is not None:
        values = {**values, "layer_types": tuple(values["layer_types"])}  # JSON gives a list
    return TransformerConfig(**values)
