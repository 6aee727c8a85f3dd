"""fp32 matmul peak: the physical limit that model FLOPs utilisation is measured against.

The peak is the best rate seen, not a median: a clock that has not ramped up or a moment of
interference only lowers a sample, never raises it. Two shapes: a square 2048^3 product and a
GPT-2 MLP product (1,024 tokens x 768 -> 3,072). The train suite samples the peak again between
its rounds, so MFU is taken against the best rate of the same run.
"""

from __future__ import annotations

import time

import torch

SHAPES = {"2048^3": (2048, 2048, 2048), "1024x768x3072 (GPT-2 MLP)": (1024, 768, 3072)}


def matmul_gflops(m: int, k: int, n: int, seconds: float = 2.0) -> list[float]:
    """GFLOP/s of repeated (m, k) @ (k, n) products for about `seconds` (after one warm-up)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    results, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(results) < 3:
        start = time.perf_counter()
        torch.mm(a, b)
        results.append(2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return results


def sample(quick: bool = False) -> dict[str, list[float]]:
    seconds = 0.5 if quick else 2.0
    return {name: matmul_gflops(*shape, seconds=seconds) for name, shape in SHAPES.items()}


def summarize(samples: dict[str, list[float]]) -> dict:
    best = {name: max(values) for name, values in samples.items()}
    return {"gflops": max(best.values()), "best": best,
            "median": {name: sorted(values)[len(values) // 2] for name, values in samples.items()}, "raw": samples}


def run(quick: bool = False) -> dict:
    from bench.common import print_table

    result = summarize(sample(quick))
    print_table("fp32 matmul peak (2 threads)", ["shape", "best GFLOP/s", "median GFLOP/s"],
                [[name, result["best"][name], result["median"][name]] for name in SHAPES])
    return result
