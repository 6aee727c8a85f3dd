"""Low-precision weights for decoding, on PyTorch's own CPU kernels.

Batch-1 decoding reads every weight once per token, so its speed is memory bandwidth: fp32 Gemma
3 270M reads ~1.07 GB a token (the tied 262,144 x 640 head alone 671 MB, the body ~400 MB). Each
mode stores the weights smaller and multiplies them with fp32 activations; the training weights
are untouched (the copies replace the linear layers of a model loaded for inference only).

| mode | body (attention, MLP) | head | kernel |
| --- | --- | --- | --- |
| fp16 | fp16 | fp16 | FBGEMM `linear_dynamic_fp16` (x86) |
| int8 | fp16 | int8 per row, shortlist rescored in fp32 | FBGEMM `linear_dynamic` (x86) |
| int4 | int4, groups of 32 | int4, shortlist rescored | aten `_weight_int4pack_mm_for_cpu` |

Why int8 keeps an fp16 body: measured on the default model (docs/BENCHMARKS.md), an int8 body
agrees with fp32 greedy decoding on 98.4% (weight-only int8) or 95.3% (FBGEMM's int8 activations)
of teacher-forced steps, under the 99% target, and decodes no faster, because the head is 63% of
the weights read. The head, though, is safe in int8: it only has to *propose* candidates (the
`shortlist`), whose exact logits then come from the fp32 rows of the tied embedding, so a greedy
or top-k choice is the fp32 one unless the best token falls outside the shortlist. FBGEMM
quantizes its input per call; rows scaled to max |x| = 1 and an anchor row that fixes the call's
range make a row's candidates independent of what else is in the batch (Int8RowLinear).
PyTorch's weight-only `_weight_int8pack_mm` exists too, but on the processor we first measured
on (AMD EPYC, AVX-512) it decodes slower than fp32 (6.9 vs 10.0 tokens/s), and the int4 kernel,
the only int4 matmul in torch, slower still (3.6; a 2048 x 640 layer takes 1.2 ms for one row,
fp32 0.3 ms): int4 is here for its memory (an eighth of fp32) and for processors where
that kernel is fast, not for speed on this one.

Quantized weights are made once and cached (safetensors, plain tensors) beside the model folder;
the kernels' packed forms are rebuilt from them at load, which takes well under a second.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn as nn

from instructkit.errors import UserError

MODES = ("none", "fp16", "int8", "int4")
INT4_GROUP = 32
INT4_INNER_TILES = 2
INT4_ROWS_MULTIPLE = 16  # the int4 CPU packing works on tiles of 16 output rows
SHORTLIST = 32


# FBGEMM's packed weights are TorchScript objects, which torch.compile cannot pass through a
# graph (every product would break it in two). So each packed weight is registered here under an
# int, and the products are custom ops taking only tensors and ints: a compiled decode step
# (instructkit.static_decode) then holds them as single external calls. A layer's entry leaves
# with the layer.
_PACKED: dict[int, object] = {}
_next_key = itertools.count()


def _register_packed(owner: nn.Module, packed) -> int:
    key = next(_next_key)
    _PACKED[key] = packed
    weakref.finalize(owner, _PACKED.pop, key, None)
    return key


# A plain operator library rather than torch.library.custom_op: its Python wrapper costs ~20 us a
# call against ~4 us here, and a decode step makes 127 of them.
_LIBRARY = torch.library.Library("instructkit", "DEF")
_LIBRARY.define("fbgemm_fp16(Tensor x, int key, int out_features) -> Tensor")
_LIBRARY.define("fbgemm_int8(Tensor x, int key, int out_features) -> Tensor")


def _fbgemm_fp16(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N): FBGEMM's fp16-weight product with the packed weight `key`."""
    return torch.ops.quantized.linear_dynamic_fp16(x, _PACKED[key])


def _fbgemm_int8(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N): FBGEMM's dynamic int8 product (7-bit inputs, see Int8RowLinear)."""
    return torch.ops.quantized.linear_dynamic(x, _PACKED[key], True)


def _product_shape(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


_LIBRARY.impl("fbgemm_fp16", _fbgemm_fp16, "CPU")
_LIBRARY.impl("fbgemm_int8", _fbgemm_int8, "CPU")
torch.library.register_fake("instructkit::fbgemm_fp16", _product_shape, lib=_LIBRARY)
torch.library.register_fake("instructkit::fbgemm_int8", _product_shape, lib=_LIBRARY)


class Fp16Linear(nn.Module):
    """y = x W^T + b, W stored fp16 and packed for FBGEMM; x (..., K) fp32 -> y (..., N) fp32."""

    kernel = "fbgemm"

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.weight16 = tensors["weight16"]  # (N, K) fp16: the cached form
        self.out_features, self.in_features = self.weight16.shape
        self.packed_key = _register_packed(self, torch.ops.quantized.linear_prepack_fp16(self.weight16.float(), bias))

    @staticmethod
    def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight16": weight.to(torch.float16).contiguous()}

    @staticmethod
    def reference(weight: torch.Tensor) -> torch.Tensor:
        """The fp32 weight this layer stands for, in plain torch (tests compare the kernel with it)."""
        return weight.to(torch.float16).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).float().contiguous()
        return torch.ops.instructkit.fbgemm_fp16(x2d, self.packed_key, self.out_features).reshape(*x.shape[:-1], self.out_features)


class Int8RowLinear(nn.Module):
    """Symmetric per-output-row int8 weights (W ~= q * scale[:, None]) on FBGEMM, which also
    quantizes its input (7 bits, one scale and zero point per call). One call serves the whole
    batch, so the weights are read once a step, and yet a row's result never depends on the others:
    each row is divided by its own max |x| (the product is linear, so its output row is
    multiplied back before the bias), and a fixed anchor row [1, -1, 0, ...] pins the call's input range to
    exactly [-1, 1], so every row is quantized on the same grid and summed in exact integers.
    Used for the head, behind a shortlist."""

    kernel = "fbgemm"

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        q, scale = tensors["q"], tensors["scale"]  # (N, K) int8, (N,) fp32
        self.out_features, self.in_features = q.shape
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; FBGEMM's prepack still takes only them
            warnings.simplefilter("ignore", UserWarning)
            per_row = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.int64), 0)
        # the bias is added after the rows are scaled back
        self.packed_key = _register_packed(self, torch.ops.quantized.linear_prepack(per_row, None))
        self.bias = bias
        self.anchor = torch.zeros(1, self.in_features)  # (1, K): pins every call's input range to [-1, 1]
        self.anchor[0, 0], self.anchor[0, 1] = 1.0, -1.0

    @staticmethod
    def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"q": q.contiguous(), "scale": scale.float().contiguous()}

    @staticmethod
    def reference(weight: torch.Tensor) -> torch.Tensor:
        tensors = Int8RowLinear.quantize(weight)
        return tensors["q"].float() * tensors["scale"][:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()  # (M, K)
        size = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)  # (M, 1)
        # reduce_range=True: 7-bit inputs. Without AVX-512 VNNI, FBGEMM adds pairs of u8 x s8
        # products in int16, which saturates with full-range inputs (seen on AVX2: errors of 0.4
        # where the format allows 0.01); PyTorch's own dynamic quantization on fbgemm does the same.
        inputs = torch.cat([rows / size, self.anchor]).contiguous()
        out = torch.ops.instructkit.fbgemm_int8(inputs, self.packed_key, self.out_features)
        out = out[:-1] * size  # (M, N)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Asymmetric int4 in groups of 32 along K: W ~= (q - 8) * scale + zero, q in 0..15, on aten's
    `_weight_int4pack_mm_for_cpu`. packed (N, K/2) uint8, scales_and_zeros (K/32, N, 2)."""

    kernel = "aten"

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.packed, self.scales_and_zeros = tensors["packed"], tensors["scales_and_zeros"]
        self.out_features = self.scales_and_zeros.shape[1]
        self.in_features = self.scales_and_zeros.shape[0] * INT4_GROUP
        self.bias = bias

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        n, k = weight.shape
        return n % INT4_ROWS_MULTIPLE == 0 and k % INT4_GROUP == 0

    @staticmethod
    def _grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """weight (N, K) -> q (N, K/32, 32) in 0..15, low and scale (N, K/32)."""
        n, k = weight.shape
        grouped = weight.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
        scale = (high - low).clamp(min=1e-12) / 15.0
        q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15)
        return q, low, scale

    @staticmethod
    def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, low, scale = Int4Linear._grid(weight)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(weight.shape), INT4_INNER_TILES)
        zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        return {"packed": packed, "scales_and_zeros": torch.stack([scale.T, zero.T], dim=-1).contiguous()}

    @staticmethod
    def reference(weight: torch.Tensor) -> torch.Tensor:
        q, low, scale = Int4Linear._grid(weight)
        return (low[..., None] + q * scale[..., None]).reshape(weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).float().contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, INT4_GROUP, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


# mode -> (body layer kind, head layer kind); see the module docstring's table.
SCHEMES: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "fp16": (Fp16Linear, Fp16Linear),
    "int8": (Fp16Linear, Int8RowLinear),
    "int4": (Int4Linear, Int4Linear),
}


def kernels_available(mode: str) -> bool:
    """Whether this torch, on this processor, has the kernels a mode needs."""
    if mode == "none":
        return True
    needs = {layer.kernel for layer in SCHEMES[mode]}
    if "fbgemm" in needs and "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    if "aten" in needs and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    return True


def auto_mode() -> str:
    """The mode chat and serving use by default: int8 (fastest within the agreement target,
    docs/BENCHMARKS.md) where its kernels exist, else exact fp32."""
    return "int8" if kernels_available("int8") else "none"


class ShortlistHead(nn.Module):
    """The low-precision head proposes `k` candidates per row; their exact fp32 logits come from
    the fp32 rows of the tied embedding. Logits outside the shortlist are -inf, so greedy and
    top-k/top-p sampling see the exact values of every token they can pick."""

    def __init__(self, rough: nn.Module, exact_weight: torch.Tensor, k: int = SHORTLIST):
        super().__init__()
        self.rough, self.exact_weight, self.k = rough, exact_weight, k

    @property
    def weight(self) -> torch.Tensor:
        return self.exact_weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden (..., C) -> logits (..., V)
        rough = self.rough(hidden)
        candidates = rough.topk(self.k, dim=-1).indices  # (..., k)
        exact = torch.einsum("...c,...kc->...k", hidden.float(), self.exact_weight[candidates])
        return torch.full_like(rough, float("-inf")).scatter_(-1, candidates, exact)


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _layer_kind(mode: str, name: str, weight: torch.Tensor) -> type[nn.Module]:
    body, head = SCHEMES[mode]
    kind = head if name == "lm_head" else body
    if kind is Int4Linear and not Int4Linear.fits(weight):
        return Fp16Linear if kernels_available("fp16") else None  # documented fallback: that layer stays wider
    return kind


def quantize_model(model: nn.Module, mode: str, *, cache: Path | None = None, source: Path | None = None,
                   shortlist: int | None = SHORTLIST) -> nn.Module:
    """Replace the linear layers and the head of an inference model by low-precision ones, in
    place; "none" returns the model unchanged. `cache`: a safetensors file for the quantized
    weights, reused while it records the same `source` file (size and modification time).
    Raises UserError, in one line, for an unknown mode, a missing kernel or a non-CPU model."""
    if mode == "none":
        return model
    if mode not in MODES:
        raise UserError(f"--quantize must be one of {', '.join(MODES)}, got {mode!r}")
    if not kernels_available(mode):
        raise UserError(f"--quantize {mode}: this torch ({torch.__version__}) has no CPU kernel for {mode} weights on "
                        f"this processor (quantized engines: {', '.join(torch.backends.quantized.supported_engines)}); "
                        "use --quantize none")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"--quantize {mode} runs on CPU kernels; the model is on {device} (use --quantize none)")
    identity = {"mode": mode}
    if source is not None and source.exists():
        stat = source.stat()
        identity |= {"source_size": str(stat.st_size), "source_mtime_ns": str(stat.st_mtime_ns)}
    saved = _read_cache(cache, identity)
    made: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, linear in _linear_layers(model):
            kind = _layer_kind(mode, name, linear.weight)
            if kind is None:
                continue
            prefix = f"{name}.{kind.__name__}."
            tensors = ({key[len(prefix):]: value for key, value in saved.items() if key.startswith(prefix)}
                       if saved is not None else {})
            if not tensors:
                tensors = kind.quantize(linear.weight.detach().float())
            made.update({prefix + key: value for key, value in tensors.items()})
            bias = None if linear.bias is None else linear.bias.detach().float().clone()
            replacement = kind(tensors, bias)
            if name == "lm_head" and shortlist and kind is not Fp16Linear:
                replacement = ShortlistHead(replacement, linear.weight.detach(), shortlist)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, replacement)
    if cache is not None and saved is None and len(identity) > 1:
        from safetensors.torch import save_file

        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        save_file(made, str(tmp), metadata=identity)
        tmp.replace(cache)
    model.quantized = mode
    return model


def _read_cache(cache: Path | None, identity: dict) -> dict | None:
    if cache is None or len(identity) == 1 or not cache.exists():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(cache), framework="pt") as handle:
        if handle.metadata() != identity:
            return None  # made from another version of the weights
    return load_file(str(cache))
