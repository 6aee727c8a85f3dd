"""The project's C++ kernels for decoding, built for this processor on first use and loaded as
operators in `torch.ops.instructkit_native`: csrc/group_matmul.cpp's weight-only int8 and int4
products (`int8_group_mm`, `int8_block_mm`, `int4_group_mm`), csrc/one_query_attention.cpp's
attention of one new token over a static KV cache (`one_query_attention`) and csrc/dequantize.cpp's
fp32 rows of those formats (`int8_dequantize`, `int4_group_dequantize`:
prefill and training on a quantized base multiply them with BLAS).

It is built with PyTorch's own extension builder (a C++ compiler and ninja), once per machine,
source and torch version, into the instructkit cache (~/.cache/instructkit/kernels); later
processes load the built library in milliseconds. Where it cannot be built (no compiler, say),
`load()` says why and `--quantize` falls back to PyTorch's own kernels (decode/quantize.py), after
one line on stderr."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

from instructkit.fileio import cache_dir

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("group_matmul.cpp", "one_query_attention.cpp", "dequantize.cpp")]


def _processor_flags() -> str:
    """The CPU's feature flags: -march=native code built on one processor may not run on another
    that shares the cache folder."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_name() -> str:
    identity = b"".join(source.read_bytes() for source in SOURCES) + Path(__file__).read_bytes() + torch.__version__.encode() + _processor_flags().encode()
    return f"group_matmul_{hashlib.sha256(identity).hexdigest()[:16]}"


@cache
def load() -> str | None:
    """Build (first time) and load the kernel; None when loaded, else why it is unavailable (one line)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64, not {platform.machine()}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    _put_ninja_on_path()
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja, which PyTorch builds extensions with, is not installed (pip install ninja)"
    name = _build_name()
    folder = cache_dir() / "kernels" / name
    library = folder / f"{name}.so"
    builder_log = logging.getLogger(cpp_extension.__name__)
    level = builder_log.level
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not _load_built(library):
            with _build_lock(folder):
                if not _load_built(library):  # another process may have built it while we waited
                    print("instructkit: building the decoding kernels for this processor (once, ~20 s)", file=sys.stderr,
                          flush=True)
                    # PyTorch's builder guards the folder with a lock *file* ("lock") that a killed build
                    # leaves behind, after which every later build waits on it forever. We hold the only
                    # real lock (flock, released by the OS when a process dies), so any such file is stale.
                    (folder / "lock").unlink(missing_ok=True)
                    builder_log.setLevel(logging.ERROR)  # its compiler-version warnings are not the user's concern
                    cpp_extension.load(name=name, sources=[str(source) for source in SOURCES], build_directory=str(folder),
                                       is_python_module=False,
                                       # -fopenmp: at::parallel_for is inlined into our code, and without it runs on one thread
                                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        torch.library.register_fake("instructkit_native::int8_group_mm", _product_shape)
        torch.library.register_fake("instructkit_native::int4_group_mm", _product_shape)
        torch.library.register_fake("instructkit_native::int8_block_mm", _block_product_shape)
        torch.library.register_fake("instructkit_native::one_query_attention", _attention_shape)
    except Exception as error:  # a compile or link error: the caller falls back
        lines = [line.strip() for line in str(error).splitlines() if "error" in line.lower()]
        return f"building {' and '.join(source.name for source in SOURCES)} failed: {(lines[-1] if lines else type(error).__name__)[:200]}"
    finally:
        builder_log.setLevel(level)
    return None


def _load_built(library: Path) -> bool:
    """Load an already built library directly (no builder, no lock: milliseconds). A library a
    killed link left truncated does not load; it is removed and built again."""
    if not library.exists():
        return False
    try:
        torch.ops.load_library(str(library))
        return True
    except OSError:
        library.unlink(missing_ok=True)
        return False


@contextmanager
def _build_lock(folder: Path):
    """One builder per folder across processes: an advisory lock the OS drops when its holder dies,
    so a build killed half-way never blocks the next one."""
    import fcntl

    with open(folder / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _put_ninja_on_path() -> None:
    """PyPI's ninja installs its binary beside the package, not always on PATH (a venv run without
    activating it): PyTorch's builder looks for it on PATH."""
    try:
        import ninja
    except ImportError:
        return
    folder = getattr(ninja, "BIN_DIR", None)
    if folder and folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")


def _product_shape(x: torch.Tensor, weights: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weights.shape[0])  # (M, N)


def _block_product_shape(x: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], blocks.shape[0] * blocks.shape[1] // x.shape[1])  # (M, N): blocks (N/B, B K)


def _attention_shape(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> torch.Tensor:
    return torch.empty_like(q)  # (B, H, 1, D)


def int8_block_rows() -> int:
    """The weight-row block of int8's AVX512-VNNI path (16), or 0 where the kernels have none or
    are not loaded."""
    return int(torch.ops.instructkit_native.int8_block_rows()) if load() is None else 0


def available() -> bool:
    return load() is None
