"""LoRA on a frozen int8 / int4 base ("QLoRA on a CPU", `--base-quantize int8|int4`).

With LoRA the base weights never change, so they need not be fp32: each frozen linear layer of the
body is held in the decoder's own formats (decode/quantize.py: int8 or int4 in groups of 32 along
the input, one scale each), 1/4 or about 1/7 of its fp32 bytes, and the adapters, their gradients
and AdamW's state stay fp32. A layer's products:

    forward   y = x Wq^T (+ b)                 x (M, K), Wq (N, K) dequantized for the call
    backward  dL/dx = dL/dy Wq                 (M, N) @ (N, K), dequantized again; Wq has no gradient

so one layer's fp32 weights exist at a time (a 8,960 x 1,536 MLP matrix of a 1.5B model: 55 MB),
never the model's; dequantizing is one pass (csrc/dequantize.cpp), the products fp32 BLAS. The token embedding and the head (tied in most
small models) stay fp32: the fused loss head reads them and the embedding is a lookup.

After training the adapters are merged into the dequantized base, the weights they were trained
against (lora.merged_state, written a layer at a time): the exported model computes what the
trained one did. The merged weights are fp32 (re-quantize them at decode time with --quantize).
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn

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
    Both products run on the layer's weights dequantized for the call (csrc/dequantize.cpp, one
    pass) and fp32 BLAS: one layer's fp32 weights exist at a time, never the model's."""

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


class FrozenQuantizedLinear(nn.Module):
    """A frozen linear layer held quantized (`layer`: decode/quantize.py's Int8GroupLinear or
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


def _kind(mode: str):
    """The quantized layer class of `mode` (int8 / int4), its kernels loaded, or one line."""
    if mode not in MODES or mode == "none":
        raise UserError(f"--base-quantize must be one of {', '.join(MODES)}, got {mode!r}")
    from instructkit.decode import native
    from instructkit.decode.quantize import Int4GroupLinear, Int8GroupLinear

    if (reason := native.load()) is not None:
        raise UserError(f"--base-quantize {mode}: the int8/int4 kernels are unavailable ({reason})")
    return {"int8": Int8GroupLinear, "int4": Int4GroupLinear}[mode]


def frozen_linears(mode: str) -> FrozenLinears | None:
    """How load_model holds the body's linear layers for LoRA on an int8 / int4 base: each
    quantized from its weights as stored (bf16 / fp16 / fp32) the moment they are read, so a 1.5B
    Hugging Face folder never exists as a whole bf16 (3.1 GB) or fp32 body. The layers are
    those quantize_base makes from the loaded model (the same values); an input size not a
    multiple of 32 stays an fp32 nn.Linear."""
    if mode == "none":
        return None
    kind = _kind(mode)

    def encode(weight: torch.Tensor):
        return kind.quantize(weight.float()) if kind.fits(weight) else None

    def build(stored, bias: torch.Tensor | None) -> nn.Module:
        return FrozenQuantizedLinear(kind(stored, None if bias is None else bias.clone()))

    return FrozenLinears(encode, build)


def quantize_base(model: nn.Module, mode: str) -> int:
    """Replace the frozen linear layers of the body still plain (LoRA applied first: the adapters'
    bases and any layer left without one; a model loaded with `frozen_linears` has none left but
    those that do not fit) by int8 / int4 ones, in place; returns how many. Only for LoRA: a
    trainable weight must stay fp32."""
    if mode == "none":
        return 0
    kind = _kind(mode)
    # Names only, each layer fetched when its turn comes: a list of the modules themselves would keep
    # every replaced fp32 layer alive to the end, holding the fp32 and the quantized model together.
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not name.endswith("lm_head") and not module.weight.requires_grad]
    replaced = 0
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            if not kind.fits(module.weight):  # an input size not a multiple of 32 stays fp32
                continue
            bias = None if module.bias is None else module.bias.detach().float().clone()
            layer = kind(kind.quantize(module.weight.detach().float()), bias)
            model.set_submodule(name, FrozenQuantizedLinear(layer))
            del module
            replaced += 1
    return replaced
