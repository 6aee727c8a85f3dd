"""LoRA on a frozen int8 / int4 base ("QLoRA on a CPU", `--base-quantize int8|int4`).

With LoRA the base weights never change, so they need not be fp32: each frozen linear layer of the
body is held in 8 or 4 bits, and the adapters, their gradients and AdamW's state stay fp32. A
layer's two products (Wq has no gradient):

    forward   y = x Wq^T (+ b)          x (M, K), Wq (N, K)
    backward  dL/dx = dL/dy Wq          (M, N) @ (N, K)

int8 (`IntegerProductLinear`): W ~= q * s[:, None], one scale per output row, and both products
run in integers (torch._int_mm: oneDNN's int8 GEMM, VNNI where the processor has it: 4.5x to 4.9x
the fp32 rate on the AMD EPYC Zen 4 of docs/BENCHMARKS.md): each row of x, and each row of
dL/dy * s, is put on its own symmetric int8 grid (max |row| / 127), multiplied exactly into int32
and scaled back. This is SwitchBack's recipe (Wortsman et al., 2023: int8 forward and
input-gradient products, row-wise inputs and gradients; it keeps the weight-gradient product in
16 bits, and LoRA's frozen base has none). The inputs' rounding is the price: what it costs in
final loss is measured (`bench base --only quality`). Evaluation and sampling run on fp32 inputs,
as the merged model that is saved does.

int4 (`FrozenQuantizedLinear` around the decoder's Int4GroupLinear: groups of 32 along the input,
a scale and a low end each): its group scales run along the products' inner dimension, so it has
no integer product; each call dequantizes the layer into one fp32 scratch buffer
(csrc/dequantize.cpp, one pass) and runs fp32 BLAS: one layer's fp32 weights exist at a time.

The token embedding and the head (tied in most small models) stay fp32: the fused loss head reads
them and the embedding is a lookup. After training the adapters are merged into the dequantized
base (lora.merged_state, written a layer at a time); the merged weights are fp32 (re-quantize them
at decode time with --quantize).
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from instructkit.decode import native
from instructkit.decode.quantize import GROUP, KERNEL_MAX_ROWS, Int4GroupLinear, Int8RowLinear
from instructkit.errors import UserError
from instructkit.models.checkpoints import FrozenLinears

MODES = ("none", "int8", "int4")


_scratch = threading.local()


def _weights(layer: nn.Module) -> torch.Tensor:
    """The layer's fp32 weights (N, K), dequantized into this thread's one scratch buffer, grown to
    the largest layer and refilled by every call: a fresh tensor per call cost its pages anew each
    time (the page faults made dequantizing ~5x a copy), and letting the allocator keep freed
    blocks instead grew the process by gigabytes. The products below use the weights at once and
    keep nothing, so one buffer serves every layer, forward, backward and recomputation alike."""
    size = layer.out_features * layer.in_features
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < size:
        _scratch.buffer = buffer = torch.empty(size)
    return layer.dequantized(out=buffer[:size].view(layer.out_features, layer.in_features))


class _FrozenProduct(torch.autograd.Function):
    """x @ Wq^T (+ b) through a quantized layer, with the input's gradient through the same weights.
    Both products run on the layer's weights dequantized for the call (int4: csrc/dequantize.cpp,
    one pass; int8: q * scale) and fp32 BLAS: one layer's fp32 weights exist at a time, never the
    model's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        rows = x.reshape(-1, layer.in_features)  # (M, K)
        y = rows @ _weights(layer).T  # (M, N)
        if layer.bias is not None:
            y = y + layer.bias
        return y.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (..., N) -> (..., K)
        layer = ctx.layer
        rows = grad.reshape(-1, layer.out_features)  # (M, N)
        return (rows @ _weights(layer)).reshape(*grad.shape[:-1], layer.in_features), None


class FrozenBaseLinear(nn.Module):
    """A frozen linear layer of a quantized base, differentiable with respect to its input:
    in_features, out_features, and its fp32 values for merging and saving (plain_weight: a fresh
    (out, in) tensor; plain_bias)."""

    in_features: int
    out_features: int

    def plain_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def plain_bias(self) -> torch.Tensor | None:
        raise NotImplementedError


class FrozenQuantizedLinear(FrozenBaseLinear):
    """A frozen linear layer held in the decoder's int4 format (`layer`: decode/quantize.py's
    Int4GroupLinear), differentiable with respect to its input."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: the products above (x may not need a gradient: the first layer's)
            return _FrozenProduct.apply(x, self.layer)
        return self.layer(x)  # evaluation and sampling: the decoder's own product

    def plain_weight(self) -> torch.Tensor:
        """The fp32 weights (out, in) these values stand for, a fresh tensor (for saving)."""
        return self.layer.dequantized()

    def plain_bias(self) -> torch.Tensor | None:
        return self.layer.bias


def _rows_on_int8_grids(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (M, K) fp32 -> q (M, K) int8 and scale (M, 1): rows ~= q * scale, each row on its own
    symmetric grid (max |row| / 127), so a row's result never depends on the others in its batch."""
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30).div_(127.0)
    return (rows / scale).round_().to(torch.int8), scale


@functools.cache
def integer_products_exact() -> bool:
    """Whether torch._int_mm multiplies int8 exactly into int32 here. oneDNN's int8 GEMM on a
    processor without VNNI may add pairs of u8 x s8 products in int16 and saturate (FBGEMM's does:
    see decode/quantize.py); a full-range block against float64 tells, once per process."""
    generator = torch.Generator().manual_seed(0)
    for m, k, n in ((16, 256, 32), (200, 1536, 72)):  # oneDNN may choose its kernel by shape
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
        a[0], b[0] = 127, -127  # the extremes, where a saturating sum shows
        try:
            product = torch._int_mm(a, b.T)  # b.T: a weight's (K, N) view, as the forward passes it
        except RuntimeError:
            return False
        if not torch.equal(product.double(), a.double() @ b.double().T):
            return False
    return True


@functools.cache
def _warn_products_inexact() -> None:
    warnings.warn("--base-quantize int8: torch's int8 product is not exact on this processor; the frozen "
                  "products run in fp32 on the dequantized weights (slower)", stacklevel=3)


class _IntegerProduct(torch.autograd.Function):
    """x @ (q * s)^T (+ b) and the input's gradient, both as int8 x int8 -> int32 products."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "IntegerProductLinear") -> torch.Tensor:
        ctx.layer = layer
        x_q, x_scale = _rows_on_int8_grids(x.reshape(-1, layer.in_features).float())  # (M, K) int8, (M, 1)
        y = torch._int_mm(x_q, layer.q.T).float().mul_(x_scale).mul_(layer.scale)  # q.T (K, N) -> (M, N)
        if layer.bias is not None:
            y.add_(layer.bias)
        return y.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (..., N) -> (..., K)
        layer = ctx.layer
        # dL/dx = g (q * s[:, None]) = (g * s) q: the row scales move onto the gradient's columns,
        # then each gradient row gets its own grid, as x's rows did.
        g_q, g_scale = _rows_on_int8_grids(grad.reshape(-1, layer.out_features) * layer.scale)  # (M, N) int8, (M, 1)
        dx = torch._int_mm(g_q, layer.q).float().mul_(g_scale)  # q (N, K) -> (M, K)
        return dx.reshape(*grad.shape[:-1], layer.in_features), None


class IntegerProductLinear(FrozenBaseLinear):
    """A frozen int8 linear layer (W ~= q * scale[:, None]: q (N, K) int8, scale (N,) fp32, the
    decoder's Int8RowLinear format) whose training products run in integers (_IntegerProduct);
    evaluation, and training where torch's int8 product is not exact on this processor (a warning
    says so), run in fp32 on the dequantized weights (_FrozenProduct)."""

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.q, self.scale, self.bias = tensors["q"], tensors["scale"], bias
        self.out_features, self.in_features = self.q.shape

    fits = staticmethod(Int8RowLinear.fits)
    quantize = staticmethod(Int8RowLinear.quantize)
    reference = staticmethod(Int8RowLinear.reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._evaluate(x)
        if integer_products_exact():
            return _IntegerProduct.apply(x, self)
        return _FrozenProduct.apply(x, self)  # training where torch's int8 product is not exact

    def _evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation and sampling: fp32 inputs on the dequantized weights, as the merged model that
        is saved computes (validation loss measures what is exported, not the inputs' rounding). A
        few rows (a sampled token) go through the decoder's weight-only int8 kernel, the row scale
        repeated for each group of 32 (K/32 values a row, made per call): dequantizing the whole
        layer for one token would cost ~1 ns a weight, over a second a token on a 1.5B model."""
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if rows.shape[0] > KERNEL_MAX_ROWS or self.in_features % GROUP or native.load() is not None:
            return _FrozenProduct.apply(x, self)
        group_scale = self.scale[:, None].expand(self.out_features, self.in_features // GROUP).contiguous()  # (N, K/32)
        y = torch.ops.instructkit_native.int8_group_mm(rows.float().contiguous(), self.q, group_scale)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weights (N, K), into `out` when given (the scratch buffer)."""
        return torch.mul(self.q, self.scale[:, None], out=out) if out is not None else self.q * self.scale[:, None]

    def plain_weight(self) -> torch.Tensor:
        return self.dequantized()

    def plain_bias(self) -> torch.Tensor | None:
        return self.bias


@dataclass(frozen=True)
class _Scheme:
    fits: Callable[[torch.Tensor], bool]
    quantize: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    build: Callable[[dict[str, torch.Tensor], torch.Tensor | None], nn.Module]  # the frozen module


def _scheme(mode: str) -> _Scheme:
    """How `mode` (int8 / int4) holds a frozen layer, its kernels loaded, or one line."""
    if mode not in MODES or mode == "none":
        raise UserError(f"--base-quantize must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "int8":
        if not integer_products_exact():
            _warn_products_inexact()  # once a process: finetune asks for the scheme twice
        return _Scheme(IntegerProductLinear.fits, IntegerProductLinear.quantize, IntegerProductLinear)
    if (reason := native.load()) is not None:
        raise UserError(f"--base-quantize {mode}: the int4 kernels are unavailable ({reason})")
    return _Scheme(Int4GroupLinear.fits, Int4GroupLinear.quantize,
                   lambda tensors, bias: FrozenQuantizedLinear(Int4GroupLinear(tensors, bias)))


def frozen_linears(mode: str) -> FrozenLinears | None:
    """How load_model holds the body's linear layers for LoRA on an int8 / int4 base: each
    quantized from its weights as stored (bf16 / fp16 / fp32) the moment they are read, so a 1.5B
    Hugging Face folder never exists as a whole bf16 (3.1 GB) or fp32 body. The layers are
    those quantize_base makes from the loaded model (the same values); a layer the format does not
    fit (int4: an input size not a multiple of 32) stays an fp32 nn.Linear."""
    if mode == "none":
        return None
    scheme = _scheme(mode)

    def encode(weight: torch.Tensor):
        return scheme.quantize(weight.float()) if scheme.fits(weight) else None

    def build(stored, bias: torch.Tensor | None) -> nn.Module:
        return scheme.build(stored, None if bias is None else bias.clone())

    return FrozenLinears(encode, build)


def quantize_base(model: nn.Module, mode: str) -> int:
    """Replace the frozen linear layers of the body still plain (LoRA applied first: the adapters'
    bases and any layer left without one; a model loaded with `frozen_linears` has none left but
    those that do not fit) by int8 / int4 ones, in place; returns how many. Only for LoRA: a
    trainable weight must stay fp32."""
    if mode == "none":
        return 0
    scheme = _scheme(mode)
    # Names only, each layer fetched when its turn comes: a list of the modules themselves would keep
    # every replaced fp32 layer alive to the end, holding the fp32 and the quantized model together.
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not name.endswith("lm_head") and not module.weight.requires_grad]
    replaced = 0
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            if not scheme.fits(module.weight):
                continue
            bias = None if module.bias is None else module.bias.detach().float().clone()
            model.set_submodule(name, scheme.build(scheme.quantize(module.weight.detach().float()), bias))
            del module
            replaced += 1
    return replaced
