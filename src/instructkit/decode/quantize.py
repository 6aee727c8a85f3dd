"""Low-precision weights for decoding, on our own C++ kernels and PyTorch's.

Batch-1 decoding reads every weight once per token, so its speed is memory bandwidth: fp32 Gemma
3 270M reads ~1.07 GB a token (the tied 262,144 x 640 head alone 671 MB, the body ~400 MB). Each
mode stores the weights smaller and multiplies them with fp32 activations; the training weights
are untouched (the copies replace the linear layers of a model loaded for inference only).

| mode | body (attention, MLP) | head (proposes 32 candidates, rescored in fp32) | kernel |
| --- | --- | --- | --- |
| fp16 | fp16 | fp16 (no shortlist) | FBGEMM `linear_dynamic_fp16` (x86) |
| int8 | int8, groups of 32 | int8, groups of 32 | ours (decode/native.py) |
| int4 | int4, groups of 32 | int4, groups of 32 | ours |
| int8 without AVX512-VNNI | int8, groups of 32 | int8 per row | body: ours; head: FBGEMM `linear_dynamic` |
| int8 without ours | fp16 | int8 per row | FBGEMM (`linear_dynamic_fp16`, `linear_dynamic`) |
| int4 without ours | int4, groups of 32 | int4 | aten `_weight_int4pack_mm_for_cpu` |

Our kernels are weight-only: the fp32 input is multiplied by the low-bit weights (each group of 32
with its own scale) without being rounded itself, and a row's result never depends on its batch.
One exception, on processors with AVX512-VNNI: int8 puts each group of 32 inputs on a 16-bit grid
(an error <= max|x_g| / 65278, ~250x below the int8 weights' own; llama.cpp's Q8_0 uses 8 bits)
and multiplies bytes exactly in integers, with the weights kept in blocks of 16 rows: about twice
the speed of widening int8 to fp32 (Int8GroupLinear, csrc/group_matmul.cpp).
Measured on the default model (docs/BENCHMARKS.md): one int8 scale per row instead agrees with
fp32 greedy decoding on only 98.4% of teacher-forced steps, and FBGEMM's int8 (which rounds the
*input* to 7 bits) on 95.3%, under the 99% target; groups of 32 agree on 99.7% of validation
steps. No PyTorch CPU kernel multiplies fp32 by int8 or int4 weights at memory speed
(`_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` run at ~2 GB/s of weights here, slower
than fp32), hence ours, built on first use; without a compiler each mode falls back to PyTorch's
kernels (the table's last rows, one line on stderr).

The head only has to *propose* candidates (the `shortlist`), whose exact logits then come from
the fp32 rows of the tied embedding, so a greedy or top-k choice is the fp32 one unless the best
token falls outside the shortlist. So the head may round its input too. int8 mode's head is our
int8 product (16-bit input grid on VNNI processors): on the 262,144 x 640 head ~5.7 ms for one row
against FBGEMM int8's ~6.2, and about as fast for a batch of 8 (~12 ms). Without VNNI, ours widens
int8 to fp32 row by row (~8.5 ms, ~21 for 8 rows), so int8 keeps FBGEMM's head there: it quantizes
its input per call; rows scaled to max |x| = 1 and an anchor row that fixes the call's range make a
row's candidates independent of what else is in the batch (Int8RowLinear). int4 mode's head is
ours with `round_input` (x rounded to bf16, half the multiplies of its exact product on
AVX512-BF16 processors): ~5 ms for one row on its 105 MB, but ~22 ms for 8 rows. The blocks'
argmax and top-k (decode/vocabulary.py) find the candidates.

Quantized weights are made once and cached (safetensors, plain tensors) beside the model folder;
the kernels' packed forms are rebuilt from them at load, which takes well under a second.
"""

from __future__ import annotations

import itertools
import sys
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn as nn

from instructkit.decode.vocabulary import top_candidates
from instructkit.errors import UserError

MODES = ("none", "fp16", "int8", "int4")
INT4_GROUP = 32
GROUP = 32  # our C++ kernels' group along K (csrc/group_matmul.cpp)
# int8's VNNI path puts each group of x on a grid of this many steps each side of 0 (kGrid there):
# 16 bits, against llama.cpp Q8_0's 8.
INT8_INPUT_GRID = 32639
# Up to this many input rows (decoding: one per sequence) our row-by-row C++ kernels (int4, and
# int8 without VNNI), which read the weights
# once but multiply row by row; beyond it (a prompt's prefill) fp32 BLAS on weights dequantized
# for the call, which costs a pass over them but runs at the processor's peak: a 500-token prompt
# prefilled in 0.8 s instead of 2.7 (int8, default model, 2026-12-05; the two paths cross at
# 16-32 rows on a 2,048 x 640 product).
KERNEL_MAX_ROWS = 16
# int8's AVX512-VNNI kernel (Int8GroupLinear in blocks of 16 rows) multiplies bytes in integers and
# beats that BLAS path at every row count measured: 1.2-4.3x at 17-2,048 rows on SmolLM2's, the
# default model's and a 1.5B model's shapes (`python -m bench kernels`, its third table; AMD Zen 4,
# 2 threads, 2026-12-07). Layers on it take every prefill too, in chunks of this many rows: each
# chunk's input grid (2 bytes an element) stays in cache however long the prompt (chunks of 256
# on the 1,536 x 8,960 product at 2,048 rows: 190 ms against 258 whole), and a row's result never
# depends on its batch (the kernel's property) whatever the prompts' lengths.
KERNEL_CHUNK_ROWS = 256
DEQUANTIZED_TILE_VALUES = 1 << 21  # 8 MB of fp32 weights at a time on that path
INT4_INNER_TILES = 2
INT4_ROWS_MULTIPLE = 16  # the int4 CPU packing works on tiles of 16 output rows
SHORTLIST = 32


# FBGEMM's packed weights are TorchScript objects, which torch.compile cannot pass through a
# graph (every product would break it in two). So each packed weight is registered here under an
# int, and the products are custom ops taking only tensors and ints: a compiled decode step
# (instructkit.decode.static_decode) then holds them as single external calls. A layer's entry leaves
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
    stacks_rows = True  # its stored tensors hold output rows along dim 0: see _stacked

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.weight16 = tensors["weight16"]  # (N, K) fp16: the cached form
        self.out_features, self.in_features = self.weight16.shape
        self.packed_key = _register_packed(self, torch.ops.quantized.linear_prepack_fp16(self.weight16.float(), bias))

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return True  # any shape

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
    stacks_rows = True

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
    def fits(weight: torch.Tensor) -> bool:
        return True  # any shape

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


class _GroupLinear(nn.Module):
    """Weights in groups of 32 along K, multiplied with fp32 inputs by the project's C++ kernels
    (decode/native.py): weight-only, so the input is never rounded and a row's result ignores its
    batch. Subclasses give the storage, the kernel call and the dequantized weight."""

    kernel = "native"
    stacks_rows = True
    # The tensors the kernel streams each call (moved into 2 MB pages: decode/huge_pages.py).
    streamed: tuple[str, ...] = ()
    # Whether the product may round the input (to bf16) where that is faster: only for a head that
    # proposes candidates for exact rescoring (ShortlistHead sets it).
    round_input = False

    def __init__(self, bias: torch.Tensor | None, out_features: int, in_features: int):
        super().__init__()
        from instructkit.decode import native

        if (reason := native.load()) is not None:
            raise UserError(f"the int8/int4 kernels are unavailable: {reason}")
        self.out_features, self.in_features, self.bias = out_features, in_features, bias

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return weight.shape[1] % GROUP == 0

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self, rows: slice = slice(None), out: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight rows this layer stands for: (rows, K), written into `out` when given (a
        buffer reused from call to call: csrc/dequantize.cpp)."""
        start, stop, _ = rows.indices(self.out_features)
        if out is None:
            out = torch.empty(stop - start, self.in_features)
        self._dequantize_into(start, stop, out)
        return out

    def _dequantize_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        raise NotImplementedError

    def dequantized_product(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d (M, K) -> (M, N) by fp32 BLAS on the dequantized weights: a pass over them, then the
        processor's peak. A tile of weight rows at a time, so the fp32 copy stays in cache: the whole
        head at once would write 671 MB (~0.5 s) for every call."""
        tile = max(1, DEQUANTIZED_TILE_VALUES // self.in_features)
        if tile >= self.out_features:
            return x2d @ self.dequantized().T
        y_t = x2d.new_empty(self.out_features, x2d.shape[0])  # (N, M): each tile fills whole rows
        weights = x2d.new_empty(tile, self.in_features)  # one tile's buffer, refilled
        for start in range(0, self.out_features, tile):
            stop = min(start + tile, self.out_features)
            tile_weights = self.dequantized(slice(start, stop), out=weights[: stop - start])
            torch.mm(tile_weights, x2d.T, out=y_t[start:stop])
        return y_t.T.contiguous()

    def kernel_takes_prefill(self) -> bool:
        """Whether the kernel runs any number of rows (in chunks), or only up to KERNEL_MAX_ROWS
        with BLAS on dequantized weights beyond."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).float().contiguous()
        rows = x2d.shape[0]
        if rows > KERNEL_MAX_ROWS and not self.kernel_takes_prefill():  # a prefill on a row-by-row kernel
            y = self.dequantized_product(x2d)
        elif rows <= KERNEL_CHUNK_ROWS:
            y = self._kernel(x2d)
        else:
            y = torch.cat([self._kernel(chunk) for chunk in x2d.split(KERNEL_CHUNK_ROWS)])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8GroupLinear(_GroupLinear):
    """Symmetric int8: W ~= q * scale[:, k // 32]. q (N, K) int8, scale (N, K/32) fp32, as stored
    (and cached). Where the kernels have an AVX512-VNNI path (`int8_block_rows()` is 16) and N is a
    multiple of 16, the layer keeps them reordered in blocks of 16 weight rows, which that path
    reads at about twice the speed (a vector holds 16 outputs; csrc/group_matmul.cpp):
    q (N/16, 16 K) as (K/4, 16, 4) a block, scale (N/16, 16 K/32) as (K/32, 16)."""

    streamed = ("q", "scale")

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__(bias, *tensors["q"].shape)
        n, k = tensors["q"].shape
        from instructkit.decode import native

        rows = native.int8_block_rows()
        self.block_rows = rows if rows and n % rows == 0 else 0  # 0: plain row order
        self.q, self.scale = tensors["q"], tensors["scale"]
        if self.block_rows:
            blocks, groups = n // rows, k // GROUP
            self.q = self.q.view(blocks, rows, k // 4, 4).transpose(1, 2).reshape(blocks, rows * k).contiguous()
            self.scale = self.scale.view(blocks, rows, groups).transpose(1, 2).reshape(blocks, rows * groups).contiguous()

    @staticmethod
    def _grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weight (N, K) -> q (N, K/32, 32) int8 values as fp32, scale (N, K/32)."""
        n, k = weight.shape
        grouped = weight.float().reshape(n, k // GROUP, GROUP)
        scale = grouped.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
        return torch.round(grouped / scale[..., None]).clamp(-127, 127), scale

    @staticmethod
    def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = Int8GroupLinear._grid(weight)
        return {"q": q.to(torch.int8).reshape(weight.shape).contiguous(), "scale": scale.contiguous()}

    @staticmethod
    def reference(weight: torch.Tensor) -> torch.Tensor:
        q, scale = Int8GroupLinear._grid(weight)
        return (q * scale[..., None]).reshape(weight.shape)

    def kernel_takes_prefill(self) -> bool:
        return bool(self.block_rows)

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.block_rows:
            return torch.ops.instructkit_native.int8_block_mm(x2d, self.q, self.scale)
        return torch.ops.instructkit_native.int8_group_mm(x2d, self.q, self.scale)

    def _dequantize_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        # csrc/dequantize.cpp: one pass, the reference's values. Row order is the block layout with
        # blocks of one row.
        torch.ops.instructkit_native.int8_dequantize(self.q, self.scale, self.block_rows or 1, start, stop, out)


class Int4GroupLinear(_GroupLinear):
    """Asymmetric int4: W ~= u * scale + low per group of 32, u in 0..15 (16 levels spanning the
    group's min..max), scale and low in fp16. packed (N, K/2) uint8 (byte j of a group: weight j in
    the low nibble, weight j + 16 in the high one), scale and low (N, K/32) fp16."""

    streamed = ("packed", "scale", "low")

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        packed = tensors["packed"]
        super().__init__(bias, packed.shape[0], packed.shape[1] * 2)
        self.packed, self.scale, self.low = packed, tensors["scale"], tensors["low"]

    grid = 2  # _int4_grid's weighted least-squares search (1: min/max)

    @staticmethod
    def _grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """weight (N, K) -> u (N, K/32, 32) in 0..15 as fp32, low and scale (N, K/32), fp16-rounded
        (1e-6: a smaller step would underflow in fp16)."""
        return _int4_grid(weight, stored=torch.float16, min_scale=1e-6)

    @staticmethod
    def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        u, low, scale = Int4GroupLinear._grid(weight)
        u = u.to(torch.uint8)
        packed = u[..., : GROUP // 2] | (u[..., GROUP // 2 :] << 4)  # (N, K/32, 16)
        return {"packed": packed.reshape(weight.shape[0], -1).contiguous(), "scale": scale.half().contiguous(),
                "low": low.half().contiguous()}

    @staticmethod
    def reference(weight: torch.Tensor) -> torch.Tensor:
        u, low, scale = Int4GroupLinear._grid(weight)
        return (u * scale[..., None] + low[..., None]).reshape(weight.shape)

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch.ops.instructkit_native.int4_group_mm(x2d, self.packed, self.scale, self.low, self.round_input)

    def _dequantize_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        # csrc/dequantize.cpp: u * scale + low, as `reference`
        torch.ops.instructkit_native.int4_group_dequantize(self.packed, self.scale, self.low, start, stop, out)


def _int4_grid(weight: torch.Tensor, *, stored: torch.dtype = torch.float32,
               min_scale: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of 32 along K: weight (N, K) -> u (N, K/32, 32) in 0..15 (as fp32),
    low and scale (N, K/32), rounded to the dtype they are `stored` in so u is chosen on that grid.

    Each group's (scale, low) minimizes the weighted squared error sum w (u scale + low - x)^2,
    w = rms(group) + |x| (llama.cpp's weighting for its k-quants: large weights matter more), over
    candidates: the group's min..max span, and 11 others found as llama.cpp's make_qkx2_quants
    finds them (round the group on the span stretched to 14..16 steps, then solve the least-squares
    scale and low for those levels). Min/max alone leaves levels unused whenever one value sits
    far out, and misses a grid the weights already lie on (a Q4_K GGUF's, whose search often
    leaves level 0 or 15 empty): LoRA on Gemma 3 270M's int4 base ended 10.2% above the fp32
    base's validation loss with min/max, 2.7% with this (docs/BENCHMARKS.md)."""
    n, k = weight.shape
    groups = weight.float().reshape(-1, INT4_GROUP)  # (G, 32), G = N K / 32
    u_all = torch.empty_like(groups)
    low_all, scale_all = groups.new_empty(groups.shape[0], 1), groups.new_empty(groups.shape[0], 1)
    for start in range(0, groups.shape[0], 4096):  # chunks that stay in cache: ~2x faster than all at once
        x = groups[start:start + 4096]
        u, low, scale = _fit_int4_groups(x, stored, min_scale)
        u_all[start:start + 4096], low_all[start:start + 4096], scale_all[start:start + 4096] = u, low, scale
    return u_all.reshape(n, k // INT4_GROUP, INT4_GROUP), low_all.reshape(n, -1), scale_all.reshape(n, -1)


def _fit_int4_groups(x: torch.Tensor, stored: torch.dtype, min_scale: float):
    """x (G, 32) -> the best u (G, 32), low (G, 1), scale (G, 1) of _int4_grid's candidates."""
    lowest = x.amin(dim=-1, keepdim=True)
    span = (x.amax(dim=-1, keepdim=True) - lowest).clamp(min=min_scale)
    w = x.square().mean(dim=-1, keepdim=True).sqrt() + x.abs()
    sum_w, sum_wx = w.sum(dim=-1, keepdim=True), (w * x).sum(dim=-1, keepdim=True)

    def on_stored_grid(scale, low):  # rounded as stored, u re-chosen on that grid, its weighted error
        scale = scale.clamp(min=min_scale).to(stored).float()
        low = low.to(stored).float()
        u = torch.round((x - low) / scale).clamp(0, 15)
        return u, low, scale, (w * (u * scale + low - x).square()).sum(dim=-1, keepdim=True)

    best = on_stored_grid(span / 15.0, lowest)
    for steps in torch.arange(14.0, 16.01, 0.2).tolist():
        levels = torch.round((x - lowest) * (steps / span)).clamp(0, 15)
        sum_wl, sum_wll = (w * levels).sum(dim=-1, keepdim=True), (w * levels.square()).sum(dim=-1, keepdim=True)
        sum_wxl = (w * x * levels).sum(dim=-1, keepdim=True)
        det = sum_w * sum_wll - sum_wl.square()
        solvable = det > 0  # not all at one level
        det = torch.where(solvable, det, torch.ones_like(det))
        scale = torch.where(solvable, (sum_w * sum_wxl - sum_wl * sum_wx) / det, span / 15.0)
        low = torch.where(solvable, (sum_wll * sum_wx - sum_wl * sum_wxl) / det, lowest)
        candidate = on_stored_grid(scale, low)
        better = candidate[3] < best[3]
        best = tuple(torch.where(better, new, old) for new, old in zip(candidate, best))
    return best[:3]


class Int4Linear(nn.Module):
    """Asymmetric int4 in groups of 32 along K: W ~= (q - 8) * scale + zero, q in 0..15, on aten's
    `_weight_int4pack_mm_for_cpu`. packed (N, K/2) uint8, scales_and_zeros (K/32, N, 2)."""

    kernel = "aten"
    stacks_rows = False  # aten's packing tiles rows, and scales_and_zeros is (K/32, N, 2)
    grid = 2  # as Int4GroupLinear's

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
    def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, low, scale = _int4_grid(weight)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(weight.shape), INT4_INNER_TILES)
        zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        return {"packed": packed, "scales_and_zeros": torch.stack([scale.T, zero.T], dim=-1).contiguous()}

    @staticmethod
    def reference(weight: torch.Tensor) -> torch.Tensor:
        q, low, scale = _int4_grid(weight)
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
    "int8": (Int8GroupLinear, Int8GroupLinear),
    "int4": (Int4GroupLinear, Int4GroupLinear),
}
# Where ours are built but have no AVX512-VNNI path (int8 then widens to fp32, row by row): FBGEMM's
# int8 head, faster there for one row (~6 against ~8.5 ms) and for the server's batches.
WITHOUT_VNNI: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "int8": (Int8GroupLinear, Int8RowLinear),
}
# Where our C++ kernels cannot be built (no compiler): PyTorch's own kernels, as before them.
FALLBACKS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "int8": (Fp16Linear, Int8RowLinear),
    "int4": (Int4Linear, Int4Linear),
}


def _kinds_ready(kinds: tuple[type[nn.Module], ...]) -> bool:
    needs = {kind.kernel for kind in kinds}
    if "fbgemm" in needs and "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    if "aten" in needs and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    if "native" in needs:
        from instructkit.decode import native

        return native.load() is None
    return True


def kernels_available(mode: str) -> bool:
    """Whether this torch, on this processor, has the kernels a mode needs (ours or the fallback's)."""
    if mode == "none":
        return True
    return _kinds_ready(SCHEMES[mode]) or (mode in FALLBACKS and _kinds_ready(FALLBACKS[mode]))


def scheme(mode: str) -> tuple[type[nn.Module], type[nn.Module]]:
    """The (body, head) layer kinds `mode` uses here: ours, or the fallback's after one line on
    stderr saying why."""
    from instructkit.decode import native

    if _kinds_ready(SCHEMES[mode]):
        if mode in WITHOUT_VNNI and not native.int8_block_rows() and _kinds_ready(WITHOUT_VNNI[mode]):
            return WITHOUT_VNNI[mode]
        return SCHEMES[mode]
    if mode not in FALLBACKS:
        return SCHEMES[mode]

    body, head = FALLBACKS[mode]
    if mode not in _said_fallback:
        print(f"instructkit: our int8/int4 kernels are unavailable ({native.load()}); --quantize {mode} uses "
              f"PyTorch's ({body.__name__} body, {head.__name__} head)", file=sys.stderr, flush=True)
        _said_fallback.add(mode)
    return body, head


_said_fallback: set[str] = set()


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
        if hasattr(rough, "round_input"):
            rough.round_input = True  # it only proposes: our int4 kernel then skips half its multiplies

    @property
    def weight(self) -> torch.Tensor:
        return self.exact_weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden (..., C) -> logits (..., V)
        rough = self.rough(hidden)
        candidates = top_candidates(rough, self.k)  # (..., k)
        exact = torch.einsum("...c,...kc->...k", hidden.float(), self.exact_weight[candidates])
        return torch.full_like(rough, float("-inf")).scatter_(-1, candidates, exact)


def _linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _layer_kind(kinds: tuple[type[nn.Module], type[nn.Module]], name: str, weight: torch.Tensor) -> type[nn.Module] | None:
    body, head = kinds
    kind = head if name == "lm_head" else body
    if not kind.fits(weight):
        return Fp16Linear if _kinds_ready((Fp16Linear,)) else None  # documented fallback: that layer stays wider
    return kind


STACK_ROWS_MULTIPLE = 16  # int8's 16-row VNNI blocks: each member's rows keep the block layout they have alone


def _fusible_groups(model: nn.Module, body: type[nn.Module]) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Layers decoding multiplies as one (models/transformer.py `project`): member name ->
    (owner's name, the group's name, every member's name in the owner's FUSIBLE order). A group is
    stacked only where every member is a plain linear layer of one input width that the body kind
    takes as it is (`fits`, `stacks_rows`: the stack is then that kind, row for row the members)
    and has a multiple of 16 rows (so a member's rows keep the layout they would have alone:
    int8's 16-row blocks on VNNI processors). Any other group stays separate layers."""
    if not getattr(body, "stacks_rows", False):
        return {}
    groups = {}
    for owner, module in model.named_modules():
        for group, names in getattr(module, "FUSIBLE", {}).items():
            members = [getattr(module, name, None) for name in names]
            if (all(isinstance(m, nn.Linear) and body.fits(m.weight) and m.out_features % STACK_ROWS_MULTIPLE == 0
                    for m in members) and len({m.in_features for m in members}) == 1):
                full = tuple(f"{owner}.{name}" if owner else name for name in names)
                groups.update({name: (owner, group, full) for name in full})
    return groups


def _stacked(kind: type[nn.Module], parts: list[tuple[dict[str, torch.Tensor], torch.Tensor | None, int]]) -> nn.Module:
    """One layer of `kind` standing for several, their output rows stacked: each stacking kind's
    stored tensors hold output rows along dim 0 (`stacks_rows`) and every row is quantized and
    multiplied on its own, so the stack computes what the layers compute one by one (tested bit
    for bit). parts: (stored tensors, bias, out_features) per member, in order."""
    tensors = {key: torch.cat([part[0][key] for part in parts]) for key in parts[0][0]}
    biases = [part[1] for part in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [torch.zeros(n) if b is None else b for b, (_, _, n) in zip(biases, parts)])
    return kind(tensors, bias)


def quantize_model(model: nn.Module, mode: str, *, cache: Path | None = None, source: Path | None = None,
                   shortlist: int | None = SHORTLIST, fuse: bool = True) -> nn.Module:
    """Replace the linear layers and the head of an inference model by low-precision ones, in
    place; "none" returns the model unchanged. `cache`: a safetensors file for the quantized
    weights, reused while it records the same `source` file (size and modification time).
    `fuse`: projections that read the same input (q/k/v, gate/up) become one layer of the same
    weights (`_stacked`), one product a step instead of three or two: at batch 1 each product
    streams its weights from memory, and short streams waste bandwidth (SmolLM2-135M's int8
    products, 2 cores, `python -m bench kernels`: 6.6 against 7.4 ms a token). Afterwards the streamed
    weights are moved into 2 MB pages (decode/huge_pages.py).
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
    kinds = scheme(mode)
    # A cache of another scheme, or of an earlier grid search of the same one, is remade.
    identity = {"mode": mode, "layers": ",".join(f"{kind.__name__}/{getattr(kind, 'grid', 1)}" for kind in kinds)}
    if source is not None and source.exists():
        stat = source.stat()
        identity |= {"source_size": str(stat.st_size), "source_mtime_ns": str(stat.st_mtime_ns)}
    _replace_layers(model, kinds, cache, identity, shortlist, fuse)
    from instructkit.decode import huge_pages

    huge_pages.gather(model)  # after _replace_layers has returned: nothing else holds the tensors it moves
    model.quantized = mode
    return model


def _replace_layers(model: nn.Module, kinds: tuple[type[nn.Module], type[nn.Module]], cache: Path | None,
                    identity: dict, shortlist: int | None, fuse: bool) -> None:
    """quantize_model's work: each linear layer's quantized tensors (from the cache where it holds
    them) and the layer that replaces it, the cache written where it was missing."""
    saved = _read_cache(cache, identity)
    made: dict[str, torch.Tensor] = {}
    groups = _fusible_groups(model, kinds[0]) if fuse else {}
    waiting: dict[tuple[str, str], dict] = {}  # a group's members quantized so far: name -> (tensors, bias, N)
    keep = cache is not None and saved is None and len(identity) > 1  # `made` is only for writing the cache
    with torch.no_grad():
        # Names only, each layer fetched when its turn comes: a list of the layers themselves kept every
        # replaced fp32 layer alive to the end, the fp32 and the quantized model together (a 1B model
        # peaked at 9.8 GB, its fp32 weights being 4.9 GB).
        for name in _linear_layer_names(model):
            linear = model.get_submodule(name)
            kind = _layer_kind(kinds, name, linear.weight)
            if kind is None:
                continue
            prefix = f"{name}.{kind.__name__}."
            tensors = ({key[len(prefix):]: value for key, value in saved.items() if key.startswith(prefix)}
                       if saved is not None else {})
            if not tensors:
                tensors = kind.quantize(linear.weight.detach().float())
            if keep:
                made.update({prefix + key: value for key, value in tensors.items()})
            bias = None if linear.bias is None else linear.bias.detach().float().clone()
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            if name in groups:  # the fp32 layer goes now; the group's layer comes with its last member
                delattr(owner, child)
                owner_name, group, members = groups[name]
                parts = waiting.setdefault((owner_name, group), {})
                parts[name] = (tensors, bias, linear.out_features)
                if len(parts) == len(members):
                    owner.add_module(group, _stacked(kind, [parts[member] for member in members]))
                    owner.fused_sizes[group] = [parts[member][2] for member in members]
                    del waiting[(owner_name, group)]
                continue
            replacement = kind(tensors, bias)
            if name == "lm_head" and shortlist and kind is not Fp16Linear:
                replacement = ShortlistHead(replacement, linear.weight.detach(), shortlist)
            setattr(owner, child, replacement)
    if keep:
        from safetensors.torch import save_file

        from instructkit.fileio import atomic_write_with

        # A unique temporary name, fsynced, then renamed: two processes starting at once never
        # write into one file, and a kill or crash leaves the old cache or the new one, whole.
        atomic_write_with(cache, lambda tmp: save_file(made, str(tmp), metadata=identity))


def _read_cache(cache: Path | None, identity: dict) -> dict | None:
    """The cached tensors, or None to remake them: no cache, one made from other weights or by
    another scheme, or a damaged one (truncated by a full disk or a copy cut short), which the
    caller then overwrites."""
    if cache is None or len(identity) == 1 or not cache.exists():
        return None
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(cache), framework="pt") as handle:
            if handle.metadata() != identity:
                return None  # made from another version of the weights
        return load_file(str(cache))
    except (SafetensorError, OSError, ValueError) as exc:
        print(f"instructkit: {cache} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
              "quantizing again", file=sys.stderr)
        return None
