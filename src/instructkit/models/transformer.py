"""The decoder-only transformer of every family but GPT-2, in plain PyTorch.

Llama, Qwen 2/3, Mistral, Phi-3, Gemma 2/3 and OLMo 2 are one architecture with a handful of
switches, and `TransformerConfig` holds them as data (families.py fills them per family):

    x = embed(ids) [* sqrt(C) when embed_scale]
    per layer:  h = attention(norm?(x)) -> norm?(h) -> x + h      (norms: pre / sandwich / post)
                h = mlp(norm?(x))       -> norm?(h) -> x + h
    logits = head(norm(x)) [soft-capped when final_softcap]

- attention: grouped-query (n_kv_heads <= n_heads), optional q/k/v biases (Qwen 2), optional
  RMSNorm on queries and keys per head (Qwen 3, Gemma 3) or over the whole projection (OLMo 2),
  rotary embeddings (rotate-half, optionally on the first `rotary_dim` channels only) with
  default / linear / llama3 / longrope frequencies and a separate base on sliding layers
  (Gemma 3), a sliding window on the layers `layer_types` names, logit soft-capping (Gemma 2);
- MLP: gated, SiLU or tanh-GELU;
- RMSNorm in fp32, scaling by w or, Gemma's way, by (1 + w).

Parameter names follow each family's Hugging Face class (`model.layers.N.self_attn.q_proj`,
`model.layers.N.mlp.gate_proj`, ...), including the norms, whose HF names depend on where they
sit (see NORM_NAMES), so HF checkpoints load as a key copy; fused tensors (Phi-3's qkv_proj and
gate_up_proj) and GGUF names are mapped in checkpoints.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from instructkit.models.attention import KVCache, attend, prepare_positions, run_layers

# Where each norm sits, by the config's `norms`, as HF names them:
# (before attention, after attention, before the MLP, after the MLP); None: no norm there.
NORM_NAMES: dict[str, tuple[str | None, str | None, str | None, str | None]] = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),  # Llama, Qwen, Mistral, Phi-3
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),  # Gemma 2 / 3
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),  # OLMo 2
}


@dataclass(frozen=True)
class TransformerConfig:
    family: str
    vocab_size: int
    context_length: int
    emb_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    rms_norm_eps: float = 1e-6
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w)
    norms: str = "pre"  # a key of NORM_NAMES
    qk_norm: str = "none"  # "none", "head" (per head, over head_dim) or "full" (over the whole projection)
    qkv_bias: bool = False
    activation: str = "silu"  # "silu" or "gelu_tanh"
    embed_scale: bool = False  # Gemma: embeddings times sqrt(emb_dim)
    query_pre_attn_scalar: float | None = None  # queries scaled by its -1/2 power; None: head_dim
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    sliding_window: int | None = None
    # Per layer, "sliding_attention" or "full_attention"; None: every layer slides when
    # sliding_window is set (Mistral, Phi-3), none otherwise.
    layer_types: tuple[str, ...] | None = None
    rope_theta: float = 10_000.0
    rope_theta_local: float | None = None  # the base on sliding layers (Gemma 3); None: rope_theta
    # HF's rope_scaling / rope_parameters beyond the base: {"rope_type": "linear" | "llama3" |
    # "longrope", ...}; applied to full-attention layers only where rope_theta_local is set (Gemma 3).
    rope_scaling: dict | None = field(default=None, hash=False)
    rotary_dim: int | None = None  # rotary channels per head (partial rotary); None: head_dim
    tie_embeddings: bool = True

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return True
        return self.layer_types[layer] == "sliding_attention"

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


# Rotary embeddings -------------------------------------------------------------------------------
def inverse_frequencies(config: TransformerConfig, *, local: bool, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The rotary frequencies of one layer kind, (rotary_dim / 2,) or per row (B, rotary_dim / 2),
    and the factor cos and sin are multiplied by (longrope's attention factor, else 1).
    Longrope switches a row to its long factors once the row's largest position in this forward
    pass passes the original context, as transformers does per call; per row, so a row's tokens
    never depend on the rows batched with it."""
    device = positions.device
    dim = config.rotary_dim or config.head_dim
    base = config.rope_theta_local if local and config.rope_theta_local is not None else config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    scaling = config.rope_scaling
    if scaling is None or (local and config.rope_theta_local is not None):
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "factors":  # read from a GGUF's rope_freqs tensor: llama.cpp divides by them
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device=device), 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "longrope":
        original = scaling["original_max_position_embeddings"]
        short = torch.tensor(scaling["short_factor"], dtype=torch.float32, device=device)
        long = torch.tensor(scaling["long_factor"], dtype=torch.float32, device=device)
        beyond = (positions.amax(dim=1) + 1 > original)[:, None]  # (B, 1)
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            ratio = config.context_length / original
            attention_factor = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
        return inv_freq / torch.where(beyond, long, short), attention_factor  # (B, D/2)
    raise ValueError(f"unsupported rope_type {kind!r}")


def rope_angles(config: TransformerConfig, positions: torch.Tensor, *, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, rotary_dim) for the given positions (B, T)."""
    inv_freq, scale = inverse_frequencies(config, local=local, positions=positions)
    if inv_freq.dim() == 2:  # per row: (B, D/2) -> (B, 1, D/2)
        inv_freq = inv_freq[:, None]
    angles = positions[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos() * scale, angles.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, 1, T, R) with R <= D: the first R channels rotate."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    turned, kept = x[..., :rotary], x[..., rotary:]
    return torch.cat((turned * cos + rotate_half(turned) * sin, kept), dim=-1)


# Modules -----------------------------------------------------------------------------------------
def project(module: nn.Module, group: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The outputs of the projections `module.FUSIBLE[group]` names, all reading x (B, T, C).
    Decoding may replace them by one layer named `group` whose weight rows are theirs stacked
    (decode/quantize.py: one weight product instead of several, read from memory as one stream);
    `module.fused_sizes[group]` then gives each one's output width for the split."""
    sizes = module.fused_sizes.get(group)
    if sizes is None:
        return tuple(getattr(module, name)(x) for name in module.FUSIBLE[group])
    return getattr(module, group)(x).split(sizes, dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        # Gemma stores w with the scale being (1 + w), so "no change" is zeros there, ones elsewhere.
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = 1.0 + self.weight.float() if self.plus_one else self.weight.float()
        return (normed * scale).type_as(x)


class Attention(nn.Module):
    FUSIBLE = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # see project()

    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.fused_sizes: dict[str, list[int]] = {}
        c = self.config = config
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.q_proj = nn.Linear(c.emb_dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.emb_dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.emb_dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.emb_dim, bias=False)
        if c.qk_norm != "none":
            per_head = c.qk_norm == "head"
            self.q_norm = RMSNorm(c.head_dim if per_head else c.n_heads * c.head_dim, c.rms_norm_eps, c.norm_plus_one)
            self.k_norm = RMSNorm(c.head_dim if per_head else c.n_kv_heads * c.head_dim, c.rms_norm_eps, c.norm_plus_one)

    def forward(self, x, rope, positions, valid, cache, cache_state, default_positions):
        batch, steps, _ = x.shape
        c = self.config
        q, k, v = project(self, "qkv_proj", x)  # (B, T, H*D), (B, T, H_kv*D) x2
        if c.qk_norm == "full":  # OLMo 2: over all heads at once, before splitting them
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, steps, c.n_heads, c.head_dim)
        k = k.view(batch, steps, c.n_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
        v = v.view(batch, steps, c.n_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, positions=positions, valid=valid, cache=cache, cache_state=cache_state,
                     window=self.window, scale=c.query_scale, default_positions=default_positions,
                     softcap=c.attn_softcap)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, c.n_heads * c.head_dim))


class MLP(nn.Module):
    FUSIBLE = {"gate_up_proj": ("gate_proj", "up_proj")}  # see project()

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.fused_sizes: dict[str, list[int]] = {}
        self.gate_proj = nn.Linear(config.emb_dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.emb_dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.emb_dim, bias=False)
        self.gelu = config.activation == "gelu_tanh"

    def forward(self, x):
        gate, up = project(self, "gate_up_proj", x)  # (B, T, hidden) each
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.is_sliding = config.is_sliding(layer)
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.norm_names = NORM_NAMES[config.norms]
        for name in self.norm_names:
            if name is not None:
                self.add_module(name, RMSNorm(config.emb_dim, config.rms_norm_eps, config.norm_plus_one))

    def _norm(self, index: int, x: torch.Tensor) -> torch.Tensor:
        name = self.norm_names[index]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x, rope, positions, valid, cache, cache_state, default_positions):
        attn = self.self_attn(self._norm(0, x), rope, positions, valid, cache, cache_state, default_positions)
        x = x + self._norm(1, attn)
        return x + self._norm(3, self.mlp(self._norm(2, x)))


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        tied = config.tie_embeddings
        self.model = nn.ModuleDict(
            dict(
                # sparse=True (tied only): the lookup's gradient touches only the batch's rows, so it
                # adds into the tied head's dense gradient in place instead of a second V x C tensor.
                # An untied embedding stays dense: AdamW takes no sparse gradients.
                embed_tokens=nn.Embedding(config.vocab_size, config.emb_dim, sparse=tied),
                layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers)),
                norm=RMSNorm(config.emb_dim, config.rms_norm_eps, config.norm_plus_one),
            )
        )
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        # Whether head(hidden) is the plain linear map lm_head: the training loss then fuses it
        # into a chunked cross-entropy (train/loss.py); soft-capped logits take the plain way.
        self.plain_head = config.final_softcap is None
        # Activation checkpointing (training's --checkpoint-activations): see attention.run_layers.
        self.checkpoint_layers = False

    def new_cache(self, batch: int, capacity: int, device=None) -> KVCache:
        return KVCache.for_model(self, batch, capacity, device)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        *,
        positions: torch.Tensor | None = None,  # (B, T); default 0..T-1
        valid: torch.Tensor | None = None,  # (B, T) False at padding
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V), or the final hidden states (B, T, C) with `return_hidden`."""
        c = self.config
        positions, default_positions, cache_state = prepare_positions(input_ids, positions, valid, cache)
        x = self.model.embed_tokens(input_ids)
        if c.embed_scale:  # HF multiplies by sqrt(C) cast to the embedding dtype
            x = x * torch.tensor(c.emb_dim**0.5, dtype=x.dtype)
        rope_full = rope_angles(c, positions, local=False)
        # Sliding layers have their own base only in Gemma 3; elsewhere both kinds share one rope.
        rope_sliding = rope_angles(c, positions, local=True) if c.rope_theta_local is not None else rope_full
        x = run_layers(self, self.model.layers, x, lambda layer: (rope_sliding if layer.is_sliding else rope_full,),
                       positions, valid, cache, cache_state, default_positions)
        hidden = self.model.norm(x)
        return hidden if return_hidden else self.head(hidden)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        if cap is None:
            return logits
        capped = torch.tanh(logits / cap) * cap
        if isinstance(self.lm_head, nn.Linear):
            return capped
        # A quantized head's shortlist (decode/quantize.py ShortlistHead) rules tokens out with -inf,
        # which the cap would turn into -cap, a logit sampling could pick: they stay -inf.
        return capped.masked_fill(logits == float("-inf"), float("-inf"))
