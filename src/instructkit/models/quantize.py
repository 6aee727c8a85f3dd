"""Weight-only quantization for decoding: int8 (one scale per output channel) and int4 (groups of
32 weights with a scale and a zero point), on PyTorch's own CPU kernels, the ones gpt-fast and
torchao use (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`).

Batch-1 decoding reads every weight once per token, so its speed is memory bandwidth: fp32 Gemma
3 270M reads ~1.07 GB a token (the tied 262,144 x 640 head alone 671 MB), int8 about a quarter of
that, int4 about an eighth. Activations stay fp32; the training weights are untouched (the
quantized copies replace the linear layers of a model loaded for inference only). The head is
quantized as a separate copy of the tied embedding; the embedding lookup keeps its fp32 rows.

`shortlist`: the quantized head proposes its top candidates and the exact fp32 rows of those
candidates rescore them, so the greedy choice is the fp32 one unless the true best token falls
outside the shortlist. Quantized weights are made once and cached (safetensors) beside the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from instructkit.errors import UserError

MODES = ("none", "int8", "int4")
INT4_GROUP = 32
INT4_INNER_TILES = 2


def kernels_available(mode: str) -> bool:
    ops = {"int8": ("_weight_int8pack_mm",), "int4": ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")}
    return all(hasattr(torch.ops.aten, name) for name in ops.get(mode, ()))


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ~= q * scale. weight (N, K) -> q (N, K), scale (N,)."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"q": q.contiguous(), "scale": scale.float().contiguous()}


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> dict[str, torch.Tensor]:
    """Asymmetric int4 in groups along K: weight ~= (q - 8) * scale + zero, q in 0..15.
    weight (N, K) -> packed (N, K/2) uint8 (the CPU kernel's layout), scales_and_zeros (K/group, N, 2)."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"int4 needs the input width ({k}) to be a multiple of {group}")
    grouped = weight.float().reshape(n, k // group, group)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale = (high - low).clamp(min=1e-12) / 15.0
    zero = low + 8 * scale
    q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_TILES)
    return {"packed": packed, "scales_and_zeros": torch.stack([scale.T, zero.T], dim=-1).contiguous()}


def dequantize(mode: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """The fp32 weight a quantized one stands for (tests and the kernel-less fallback)."""
    if mode == "int8":
        return tensors["q"].float() * tensors["scale"][:, None]
    n, k = shape
    identity = torch.eye(k, dtype=torch.float32)
    return QuantizedLinear.int4_matmul(identity, tensors, n).T.contiguous()


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored int8 or int4 (see the module docstring). x (..., K) fp32."""

    def __init__(self, mode: str, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.mode, self.out_features, self.in_features = mode, out_features, in_features
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @staticmethod
    def int4_matmul(x2d: torch.Tensor, tensors: dict, out_features: int) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, tensors["packed"], INT4_GROUP, tensors["scales_and_zeros"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features).float().contiguous()
        if self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2d, self.q, self.scale)
        else:
            y = self.int4_matmul(x2d, {"packed": self.packed, "scales_and_zeros": self.scales_and_zeros}, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class ShortlistHead(nn.Module):
    """The quantized head proposes `k` candidates per row; their exact fp32 logits are computed
    from the fp32 rows of the tied embedding. Logits outside the shortlist are -inf, so greedy
    and top-k/top-p sampling see the exact values of every token they can pick."""

    def __init__(self, quantized: QuantizedLinear, exact_weight: torch.Tensor, k: int = 32):
        super().__init__()
        self.quantized, self.exact_weight, self.k = quantized, exact_weight, k

    @property
    def weight(self) -> torch.Tensor:
        return self.exact_weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden (..., C)
        rough = self.quantized(hidden)  # (..., V)
        candidates = rough.topk(self.k, dim=-1).indices  # (..., k)
        exact = torch.einsum("...c,...kc->...k", hidden.float(), self.exact_weight[candidates])
        return torch.full_like(rough, float("-inf")).scatter_(-1, candidates, exact)


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name != "lm_head"]


def quantize_model(model: nn.Module, mode: str, *, cache: Path | None = None, source: Path | None = None,
                   shortlist: int | None = 32) -> nn.Module:
    """Replace every linear layer (and the head) of an inference model by a quantized one, in
    place; "none" returns the model unchanged. `cache`: a safetensors file for the quantized
    weights, reused while it records the same `source` file (size and modification time).
    Raises UserError, in one line, when this torch has no kernel for the mode."""
    if mode == "none":
        return model
    if mode not in MODES:
        raise UserError(f"--quantize must be one of {', '.join(MODES)}, got {mode!r}")
    if not kernels_available(mode):
        raise UserError(f"--quantize {mode}: this torch ({torch.__version__}) has no CPU kernel for weight-only {mode} "
                        "matmuls; use --quantize none")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"--quantize {mode} runs on the CPU kernels; the model is on {device}")
    identity = {}
    if source is not None and source.exists():
        stat = source.stat()
        identity = {"source_size": str(stat.st_size), "source_mtime_ns": str(stat.st_mtime_ns)}
    saved = _read_cache(cache, identity)
    quantizer = quantize_int8 if mode == "int8" else quantize_int4
    keys = ("q", "scale") if mode == "int8" else ("packed", "scales_and_zeros")
    made: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, linear in _linear_layers(model) + [("lm_head", model.lm_head)]:
            if saved is not None and all(f"{name}.{key}" in saved for key in keys):
                tensors = {key: saved[f"{name}.{key}"] for key in keys}
            else:
                tensors = quantizer(linear.weight.detach().float())
            made.update({f"{name}.{key}": value for key, value in tensors.items()})
            replacement = QuantizedLinear(mode, tensors, linear.out_features, linear.in_features, linear.bias)
            if name == "lm_head" and shortlist:
                replacement = ShortlistHead(replacement, model.lm_head.weight.detach(), shortlist)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, replacement)
    if cache is not None and saved is None and identity:
        from safetensors.torch import save_file

        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        save_file(made, str(tmp), metadata=identity)
        tmp.replace(cache)
    model.quantized = mode
    return model


def _read_cache(cache: Path | None, identity: dict) -> dict | None:
    if cache is None or not identity or not cache.exists():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(cache), framework="pt") as handle:
        if handle.metadata() != identity:
            return None  # made from another version of the weights
    return load_file(str(cache))
