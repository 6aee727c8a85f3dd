"""Where compiled decode steps are kept between starts, so that only a machine's first start pays
for compiling.

torch.compile already keeps what it made on disk (inductor's FX-graph cache and AOTAutograd's
cache: the generated C++ and the built libraries, keyed by the graph, the input shapes and
dtypes, torch's version and inductor's settings), but by default under /tmp/torchinductor_USER,
which a reboot or a tmp cleaner empties, so the 60-100 s compile came back. Here it goes under
instructkit's own cache folder (fileio.cache_dir(), beside the converted weights and the built
kernels), one folder per torch version. A start that finds its graph there still traces the
step (dynamo; seconds) but compiles nothing: the counters `cache_counts` reads say which.

`torch.compiler.save_cache_artifacts()` / `load_cache_artifacts()` (torch >= 2.7) would pack the
same artefacts into one blob to be loaded up front; the folder is read lazily and needs neither
a save at exit nor a load at start, so it is what is used.

A TORCHINDUCTOR_CACHE_DIR set before instructkit was imported is the user's and wins (the
benchmarks use it for a cold cache).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from instructkit.fileio import cache_dir

ENV = "TORCHINDUCTOR_CACHE_DIR"
_USER_CHOICE = os.environ.get(ENV)  # read before inductor, which writes its default into the variable
_lock = threading.Lock()


def compile_cache_dir() -> Path:
    """The folder torch.compile's artefacts go to (the user's TORCHINDUCTOR_CACHE_DIR if given)."""
    import torch

    if _USER_CHOICE:
        return Path(_USER_CHOICE)
    return cache_dir() / "compiled" / f"torch-{torch.__version__}"


def use_compile_cache() -> Path:
    """Point inductor's on-disk caches at `compile_cache_dir()` (idempotent; call before compiling).
    Returns the folder."""
    folder = compile_cache_dir()
    with _lock:
        if os.environ.get(ENV) != str(folder):
            folder.mkdir(parents=True, exist_ok=True)
            os.environ[ENV] = str(folder)
            from torch._inductor.utils import clear_caches

            clear_caches()  # inductor memoizes paths under the old folder
    return folder


def cache_counts() -> dict[str, int]:
    """This process's compile-cache lookups so far: {"hits": ..., "misses": ...} over inductor's
    FX-graph cache and AOTAutograd's cache (a step compiled from the cache shows hits only)."""
    from torch._dynamo.utils import counters

    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return {"hits": inductor["fxgraph_cache_hit"] + aot["autograd_cache_hit"],
            "misses": inductor["fxgraph_cache_miss"] + aot["autograd_cache_miss"]}
