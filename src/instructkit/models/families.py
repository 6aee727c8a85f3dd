"""The family table: what the rest of the package needs to know about a model family, in one
place instead of `if family == ...` across modules (its config switches, HF and GGUF names,
LoRA targets, the default prompt style and presets).

Every family but GPT-2 runs on the one `Transformer` (transformer.py); an entry says which of
its switches the family sets and how its checkpoints name things (weight_maps.py turns that
into converters). Adding a family is one `TransformerFamily(...)` entry below: see
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from instructkit.errors import UserError
from instructkit.models import checkpoints, weight_maps
from instructkit.models.gpt2 import GPT2, GPT2_PRESETS, GPT2Config
from instructkit.models.transformer import MLP as MLPModule
from instructkit.models.transformer import Attention, Transformer, TransformerConfig
from instructkit.models.weight_maps import TransformerFamily

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# The stacked projections (transformer.py FUSIBLE: q/k/v, gate/up) under a layer's names. Phi-3's
# checkpoints store exactly these stacks.
STACKED = {f"{owner}.{group}": tuple(f"{owner}.{name}" for name in members)
           for owner, module in (("self_attn", Attention), ("mlp", MLPModule))
           for group, members in module.FUSIBLE.items()}


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    model_class: type
    presets: dict
    default_prompt_style: str
    # --lora-targets groups -> the suffixes of the linear layers they name.
    lora_targets: dict[str, tuple[str, ...]]
    to_hf: Callable  # (our state dict, config) -> HF names
    from_hf: Callable  # (HF state dict, config) -> ours; per tensor, so weights can stream in
    hf_config: Callable  # our config -> HF config.json
    config_from_hf: Callable  # HF config.json -> our config
    to_gguf: Callable  # (our state dict, config) -> GGUF names
    from_gguf: Callable  # (GGUF names (dequantized), config) -> our state dict
    gguf_arch: str
    hf_model_types: tuple[str, ...] = ()
    # The tokenizer of the family's random-weight presets (tests, benchmarks).
    preset_tokenizer_ref: dict = field(default_factory=lambda: {"kind": "smollm2"})
    # Old run folders' config keys -> today's (model.json written by earlier versions).
    upgrade_config: Callable[[dict], dict] = lambda values: values


def _transformer(spec: TransformerFamily, presets: dict | None = None, prompt_style: str = "alpaca",
                 tokenizer_ref: dict | None = None, upgrade: Callable[[dict], dict] | None = None) -> Family:
    return Family(
        name=spec.name, config_class=TransformerConfig, model_class=Transformer, presets=presets or {},
        # A fused HF name (Phi-3's self_attn.qkv_proj, mlp.gate_up_proj) targets the layers it holds here.
        default_prompt_style=prompt_style, lora_targets={"attention": ATTENTION, "mlp": MLP, **spec.fused},
        to_hf=partial(weight_maps.to_hf, spec), from_hf=partial(weight_maps.from_hf, spec),
        hf_config=partial(weight_maps.hf_config, spec), config_from_hf=partial(weight_maps.config_from_hf, spec),
        to_gguf=partial(weight_maps.to_gguf, spec), from_gguf=partial(weight_maps.from_gguf, spec),
        gguf_arch=spec.gguf_arch, hf_model_types=spec.hf_model_types,
        preset_tokenizer_ref=tokenizer_ref or {"kind": "smollm2"}, upgrade_config=upgrade or (lambda values: values))


# The table ---------------------------------------------------------------------------------------
LLAMA = TransformerFamily(name="llama", hf_model_types=("llama",), hf_architecture="LlamaForCausalLM",
                          gguf_arch="llama", gguf_permute_qk=True)
QWEN2 = TransformerFamily(name="qwen2", hf_model_types=("qwen2",), hf_architecture="Qwen2ForCausalLM",
                          gguf_arch="qwen2", switches={"qkv_bias": True}, window="qwen")
QWEN3 = TransformerFamily(name="qwen3", hf_model_types=("qwen3",), hf_architecture="Qwen3ForCausalLM",
                          gguf_arch="qwen3", switches={"qk_norm": "head"}, window="qwen")
MISTRAL = TransformerFamily(name="mistral", hf_model_types=("mistral",), hf_architecture="MistralForCausalLM",
                            gguf_arch="llama", gguf_permute_qk=True, window="all")
PHI3 = TransformerFamily(name="phi3", hf_model_types=("phi3",), hf_architecture="Phi3ForCausalLM",
                         gguf_arch="phi3", window="all",
                         fused=STACKED)
GEMMA2 = TransformerFamily(name="gemma2", hf_model_types=("gemma2",), hf_architecture="Gemma2ForCausalLM",
                           gguf_arch="gemma2", window="alternate",
                           switches={"norm_plus_one": True, "norms": "sandwich", "activation": "gelu_tanh",
                                     "embed_scale": True})
GEMMA3 = TransformerFamily(name="gemma3", hf_model_types=("gemma3", "gemma3_text"), hf_architecture="Gemma3ForCausalLM",
                           gguf_arch="gemma3", window="every-6th-full", hf_model_type_out="gemma3_text",
                           switches={"norm_plus_one": True, "norms": "sandwich", "activation": "gelu_tanh",
                                     "embed_scale": True, "qk_norm": "head"})
OLMO2 = TransformerFamily(name="olmo2", hf_model_types=("olmo2",), hf_architecture="Olmo2ForCausalLM",
                          gguf_arch="olmo2", switches={"norms": "post", "qk_norm": "full"})


def _gemma3(**values) -> TransformerConfig:
    """A Gemma 3 shape: the family's switches, 262,144 tokens, local RoPE base 10,000."""
    shape = dict(vocab_size=262144, context_length=32768, n_heads=4, n_kv_heads=1, head_dim=256,
                 query_pre_attn_scalar=256.0, sliding_window=512, rope_theta=1_000_000.0, rope_theta_local=10_000.0)
    shape.update(values)
    n_layers = shape["n_layers"]
    pattern = shape.pop("pattern", 6)
    shape["layer_types"] = tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers))
    return TransformerConfig(family="gemma3", **GEMMA3.switches, **shape)


def _shape(spec: TransformerFamily, **values) -> TransformerConfig:
    return TransformerConfig(family=spec.name, **spec.switches, **values)


GEMMA3_PRESETS = {
    "gemma-3-270m": _gemma3(emb_dim=640, n_layers=18, hidden_dim=2048),
    "gemma-3-1b": _gemma3(emb_dim=1152, n_layers=26, hidden_dim=6912),
    # For tests: the real vocabulary size, a 6-token window and a global layer every 3rd layer,
    # so short sequences exercise both attention kinds.
    "tiny-gemma3": _gemma3(context_length=512, emb_dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                           hidden_dim=128, query_pre_attn_scalar=16.0, sliding_window=6, pattern=3),
}
# Real shapes with random weights (`random:NAME`, benchmarks: speed and memory do not depend on the
# values); with the SmolLM2 tokenizer, whose ids all lie inside these vocabularies.
LLAMA_PRESETS = {
    "smollm2-135m": _shape(LLAMA, vocab_size=49152, context_length=8192, emb_dim=576, n_layers=30, n_heads=9,
                           n_kv_heads=3, head_dim=64, hidden_dim=1536, rms_norm_eps=1e-5, rope_theta=100_000.0),
    "llama-3.2-1b": _shape(LLAMA, vocab_size=128256, context_length=131072, emb_dim=2048, n_layers=16, n_heads=32,
                           n_kv_heads=8, head_dim=64, hidden_dim=8192, rms_norm_eps=1e-5, rope_theta=500_000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
QWEN2_PRESETS = {
    "qwen2.5-0.5b": _shape(QWEN2, vocab_size=151936, context_length=32768, emb_dim=896, n_layers=24, n_heads=14,
                           n_kv_heads=2, head_dim=64, hidden_dim=4864, rope_theta=1_000_000.0),
    "qwen2.5-1.5b": _shape(QWEN2, vocab_size=151936, context_length=32768, emb_dim=1536, n_layers=28, n_heads=12,
                           n_kv_heads=2, head_dim=128, hidden_dim=8960, rope_theta=1_000_000.0),
}


def _upgrade_gemma3(values: dict) -> dict:
    """model.json of the Gemma3-only model class (before the family table) -> TransformerConfig."""
    if "rope_base_global" not in values:
        return values
    values = dict(values)
    pattern = values.pop("sliding_window_pattern", 6)
    layer_types = values.pop("layer_types", None)
    n_layers = values["n_layers"]
    values["layer_types"] = tuple(layer_types) if layer_types else tuple(
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers))
    values["rope_theta"] = values.pop("rope_base_global")
    values["rope_theta_local"] = values.pop("rope_base_local")
    return {"family": "gemma3", **GEMMA3.switches, **values}


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2", config_class=GPT2Config, model_class=GPT2, presets=GPT2_PRESETS, default_prompt_style="alpaca",
        lora_targets={"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
        to_hf=lambda state, config: checkpoints.gpt2_to_hf(state),
        from_hf=lambda state, config: checkpoints.gpt2_from_hf(state),
        hf_config=checkpoints.gpt2_hf_config, config_from_hf=checkpoints.gpt2_config_from_hf,
        to_gguf=lambda state, config: checkpoints.gpt2_to_gguf(state),
        from_gguf=lambda tensors, config: checkpoints.gpt2_from_gguf(tensors), gguf_arch="gpt2",
        hf_model_types=("gpt2",), preset_tokenizer_ref={"kind": "gpt2"}),
    "gemma3": _transformer(GEMMA3, GEMMA3_PRESETS, "gemma", {"kind": "embedded-gemma"}, _upgrade_gemma3),
    "gemma2": _transformer(GEMMA2, prompt_style="gemma", tokenizer_ref={"kind": "embedded-gemma"}),
    "llama": _transformer(LLAMA, LLAMA_PRESETS),
    "mistral": _transformer(MISTRAL),
    "qwen2": _transformer(QWEN2, QWEN2_PRESETS),
    "qwen3": _transformer(QWEN3),
    "phi3": _transformer(PHI3, prompt_style="phi3"),
    "olmo2": _transformer(OLMO2),
}


def family_of(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r} (supported: {', '.join(FAMILIES)})") from None


def family_for_hf_model_type(model_type: str, source: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    supported = ", ".join(t for family in FAMILIES.values() for t in family.hf_model_types)
    raise UserError(f"{source}: model_type {model_type!r} is not supported (supported: {supported})")


def family_for_gguf_arch(arch: str, source: str) -> Family:
    """The family that reads a GGUF architecture (llama.cpp's "llama" covers Llama and Mistral)."""
    for family in FAMILIES.values():
        if family.gguf_arch == arch:
            return family
    supported = ", ".join(sorted({family.gguf_arch for family in FAMILIES.values()}))
    raise UserError(f"{source}: GGUF architecture {arch!r} is not supported (supported: {supported})")
