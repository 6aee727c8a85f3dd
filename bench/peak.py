"""fp32 matmul peak: the physical limit that model FLOPs utilisation is measured against."""

from __future__ import annotations

import time

import torch


def matmul_gflops(n: int = 2048, repeats: int = 5) -> list[float]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up, excluded
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        results.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return results


def run(quick: bool = False) -> dict:
    from bench.common import median_spread, print_table

    values = matmul_gflops(1024 if quick else 2048, 3 if quick else 7)
    median, spread = median_spread(values)
    print_table("fp32 matmul peak", ["shape", "GFLOP/s (median)", "+/-"], [[f"{1024 if quick else 2048}^3", median, spread]])
    return {"gflops": median, "spread": spread, "raw": values}
