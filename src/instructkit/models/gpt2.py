"""GPT-2 in plain PyTorch, as in the book's chapters 4-7.

Features: learned absolute position embeddings (1,024), pre-LayerNorm blocks (eps 1e-5),
fused QKV projection with bias, GELU (tanh approximation) MLP of width 4C, final LayerNorm,
LM head tied to the token embedding, no dropout at fine-tuning time by default.

Parameter names follow nanoGPT / HF (`transformer.h.N.attn.c_attn`, ...) with nn.Linear
weights stored as (out, in); the checkpoint module transposes HF's Conv1D weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from instructkit.models.attention import KVCache, attend, prepare_positions, run_layers


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5

    family = "gpt2"

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:  # plain multi-head attention: one K/V head per query head
        return self.n_heads


GPT2_PRESETS: dict[str, GPT2Config] = {
    "gpt2-small": GPT2Config(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPT2Config(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPT2Config(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPT2Config(emb_dim=1600, n_layers=48, n_heads=25),
    # For tests: the real vocabulary (so the real tokenizer works), tiny everything else.
    "tiny-gpt2": GPT2Config(context_length=256, emb_dim=64, n_layers=2, n_heads=4),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.c_attn = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.emb_dim, config.emb_dim)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, x, positions, valid, cache, cache_state, default_positions):
        batch, steps, channels = x.shape
        heads, head_dim = self.config.n_heads, self.config.head_dim
        # (B, T, 3C) -> three (B, H, T, D)
        q, k, v = self.c_attn(x).view(batch, steps, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v, positions=positions, valid=valid, cache=cache, cache_state=cache_state,
                     window=None, scale=1.0 / math.sqrt(head_dim), default_positions=default_positions)
        return self.dropout(self.c_proj(out.transpose(1, 2).reshape(batch, steps, channels)))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        self.c_proj = nn.Linear(4 * config.emb_dim, config.emb_dim)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions, valid, cache, cache_state, default_positions):
        x = x + self.attn(self.ln_1(x), positions, valid, cache, cache_state, default_positions)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                # sparse=True: see gemma3.py (the tied head supplies the dense part of the gradient).
                wte=nn.Embedding(config.vocab_size, config.emb_dim, sparse=True),
                wpe=nn.Embedding(config.context_length, config.emb_dim),
                drop=nn.Dropout(config.drop_rate),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
                ln_f=nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        self.checkpoint_layers = False  # training's --checkpoint-activations (attention.run_layers)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

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
        positions, default_positions, cache_state = prepare_positions(input_ids, positions, valid, cache)
        if int(positions.max()) >= self.config.context_length:
            raise ValueError(f"position {int(positions.max())} is beyond the context length {self.config.context_length}")
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(positions))
        x = run_layers(self, self.transformer.h, x, lambda block: (), positions, valid, cache, cache_state, default_positions)
        hidden = self.transformer.ln_f(x)
        return hidden if return_hidden else self.lm_head(hidden)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
