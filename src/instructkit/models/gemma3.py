"""Gemma 3 (text) in plain PyTorch.

Features: token embeddings scaled by sqrt(C) and tied to the LM head; pre- and post-norms around
both attention and MLP (RMSNorm computing x * (1 + w) in fp32, eps 1e-6); grouped-query
attention (4 query heads, 1 KV head for 270M) with RMSNorm on queries and keys (QK-norm);
rotary embeddings (rotate-half) with base 10,000 on sliding-window layers and 1,000,000 on
global layers; a sliding window of 512 on five of every six layers (layers 5, 11, 17 of the
270M model are global); query scale 1/sqrt(query_pre_attn_scalar); gated GELU-tanh MLP.

Parameter names follow HF's Gemma3ForCausalLM (`model.layers.N.self_attn.q_proj`, ...), so
HF checkpoints load as a plain key copy; GGUF names are mapped in the checkpoint module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from instructkit.models.attention import KVCache, attend, prepare_positions


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int = 262144
    context_length: int = 32768
    emb_dim: int = 640
    n_layers: int = 18
    n_heads: int = 4
    n_kv_heads: int = 1
    head_dim: int = 256
    hidden_dim: int = 2048
    query_pre_attn_scalar: float = 256.0
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    sliding_window_pattern: int = 6  # every 6th layer is global
    rope_base_global: float = 1_000_000.0
    rope_base_local: float = 10_000.0
    # Explicit per-layer kinds ("sliding_attention" / "full_attention") from an HF config;
    # when None, the pattern above decides.
    layer_types: tuple[str, ...] | None = None

    family = "gemma3"

    def is_sliding(self, layer: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return (layer + 1) % self.sliding_window_pattern != 0


GEMMA3_PRESETS: dict[str, Gemma3Config] = {
    "gemma-3-270m": Gemma3Config(),
    "gemma-3-1b": Gemma3Config(emb_dim=1152, n_layers=26, hidden_dim=6912),
    # For tests: the real vocabulary size, a 6-token window and a global layer every 3rd layer,
    # so short sequences exercise both attention kinds.
    "tiny-gemma3": Gemma3Config(
        context_length=512, emb_dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
        query_pre_attn_scalar=16.0, sliding_window=6, sliding_window_pattern=3,
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # Gemma scales by (1 + weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, D) for the given positions (B, T)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    def __init__(self, config: Gemma3Config, layer: int):
        super().__init__()
        self.config = config
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.q_proj = nn.Linear(config.emb_dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.emb_dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.emb_dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.emb_dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x, rope, positions, valid, cache, cache_state, default_positions):
        batch, steps, _ = x.shape
        c = self.config
        q = self.q_norm(self.q_proj(x).view(batch, steps, c.n_heads, c.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(batch, steps, c.n_kv_heads, c.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, steps, c.n_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = attend(q, k, v, positions=positions, valid=valid, cache=cache, cache_state=cache_state,
                     window=self.window, scale=c.query_pre_attn_scalar ** -0.5, default_positions=default_positions)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, c.n_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.emb_dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.emb_dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.emb_dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3Config, layer: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.is_sliding = config.is_sliding(layer)
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.emb_dim, eps)
        self.post_attention_layernorm = RMSNorm(config.emb_dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.emb_dim, eps)
        self.post_feedforward_layernorm = RMSNorm(config.emb_dim, eps)

    def forward(self, x, rope, positions, valid, cache, cache_state, default_positions):
        attn = self.self_attn(self.input_layernorm(x), rope, positions, valid, cache, cache_state, default_positions)
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                # sparse=True: the lookup's gradient touches only the rows in the batch, so it adds
                # into the tied head's dense gradient in place instead of a second V x C tensor.
                embed_tokens=nn.Embedding(config.vocab_size, config.emb_dim, sparse=True),
                layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers)),
                norm=RMSNorm(config.emb_dim, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

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
        embed = self.model.embed_tokens(input_ids)
        # HF multiplies by sqrt(C) cast to the embedding dtype; in fp32 that is the plain product.
        x = embed * torch.tensor(c.emb_dim**0.5, dtype=embed.dtype)
        rope_local = rope_angles(positions, c.head_dim, c.rope_base_local)
        rope_global = rope_angles(positions, c.head_dim, c.rope_base_global)
        for index, layer in enumerate(self.model.layers):
            layer_cache = cache.layers[index] if cache is not None else None
            rope = rope_local if layer.is_sliding else rope_global
            x = layer(x, rope, positions, valid, layer_cache, cache_state, default_positions)
        hidden = self.model.norm(x)
        return hidden if return_hidden else self.lm_head(hidden)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
