"""Quantized decoding weights moved into memory backed by 2 MB pages.

Batch-1 decoding reads every weight once a token, ~200 products of 0.1-2 MB each, so its speed
is how fast short streams come from memory. On 4 KB pages a new stream starts on a cold page
every 4 KB (a TLB miss and a restarted prefetch); on 2 MB pages (Linux's transparent huge pages)
it does not. Measured on SmolLM2-135M's int8 layer shapes, 2 cores of an AMD EPYC (Zen 4),
30 layers' weights streamed one product at a time (`python -m bench kernels`, 2026-12-07): 7.4
ms a token on the allocator's 4 KB pages, 6.0 ms on 2 MB pages; with q/k/v and gate/up each one
product, 6.6 and 4.5 ms (docs/BENCHMARKS.md).

PyTorch's allocator asks for huge pages only for single tensors of 2 MB and more, and only when
THP_MEM_ALLOC_ENABLE is set before it starts, so this module maps one private anonymous region,
advises the kernel to back it with huge pages (`madvise(MADV_HUGEPAGE)`, which works where THP is
"always" or "madvise", the common defaults) and moves each quantized layer's streamed tensors
(`streamed`, decode/quantize.py) into it as views, in model order. Where huge pages cannot come
(THP "never", which Linux does not report by refusing the advice but which
/sys/kernel/mm/transparent_hugepage/enabled says; a system without the advice; a mapping refused)
the tensors stay where they are: the same values, the old speed.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
import torch.nn as nn

HUGE_PAGE = 2 << 20
SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ALIGN = 64  # a cache line: each tensor starts on one, as the allocator's do


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def _region(size: int) -> torch.Tensor | None:
    """A uint8 tensor of `size` bytes starting on a 2 MB boundary, backed by an anonymous private
    mapping advised to use huge pages; None where that advice is unavailable or refused. The
    mapping holds whole huge pages from that boundary on (a page only partly mapped stays small),
    plus one for the alignment; pages are only taken as they are written."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not hasattr(mmap, "MAP_PRIVATE") or not available():
        return None
    try:
        mapping = mmap.mmap(-1, (-(-size // HUGE_PAGE) + 1) * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # e.g. strict overcommit accounting: the tensors stay where they are
        return None
    try:
        mapping.madvise(advice)
    except OSError:
        mapping.close()
        return None
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive while any view lives
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start: start + size]


def available() -> bool:
    """Whether advised memory can get huge pages here: THP "always" or "madvise" (Linux)."""
    try:
        return "[never]" not in SETTING.read_text()
    except OSError:
        return False


def gather(model: nn.Module) -> int:
    """Move every streamed tensor of the model's quantized layers into one huge-page region.
    Returns the bytes moved (0 where huge pages are unavailable or nothing is streamed)."""
    tensors = [(module, name) for module in model.modules() for name in getattr(module, "streamed", ())]
    size = sum(_aligned(getattr(module, name).nbytes) for module, name in tensors)
    region = _region(size) if size else None
    if region is None:
        return 0
    offset = 0
    for module, name in tensors:
        tensor = getattr(module, name)
        view = region[offset: offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        # The old tensor is freed here, and the region's pages are only taken as the copies write
        # them: the move holds one tensor twice at a time, never the model.
        setattr(module, name, view)
        offset += _aligned(tensor.nbytes)
    return size
