"""Dedup at scale (`instructkit dedup`'s engine), each size in a process of its own: 52k
Alpaca-sized records with the chunked TF-IDF product (target: < 2 minutes, < 2 GB), and
MinHash-LSH at growing sizes to show how time and memory grow towards 1M records. The chapter's
dense n x n similarity matrix would need 4 bytes x 52,002^2 = 10.8 GB in fp32 (21.6 GB in the
float64 it computes in), so it is not run at this size."""

from __future__ import annotations

from bench.common import fmt_spread, print_table, run_worker, spread


def run(quick: bool = False, repeats: int | None = None) -> dict:
    repeats = repeats or (1 if quick else 3)
    plan = [(2000, "chunked")] if quick else [(52_002, "chunked"), (100_000, "minhash"), (200_000, "minhash")]
    results = {}
    for records, method in plan:
        rounds = repeats if records <= 60_000 else 1  # the MinHash sizes take minutes each
        runs = [run_worker("bench.dedup_worker", {"records": records, "method": method, "seed": 0}, timeout=7200)
                for _ in range(rounds)]
        good = [r for r in runs if "error" not in r]
        results[f"{records} {method}"] = {"runs": runs, "seconds": spread([r["seconds"] for r in good]),
                                          "peak_rss_gb": spread([r["peak_rss_bytes"] / 1e9 for r in good])}
    rows = []
    for name, result in results.items():
        first = next((r for r in result["runs"] if "error" not in r), result["runs"][0])
        rows.append([name, fmt_spread(result["seconds"], "{:.0f}"), fmt_spread(result["peak_rss_gb"], "{:.2f}"),
                     first.get("pairs", first.get("error", "")), f"{first.get('planted_recall', float('nan')):.3f}"])
    print_table("Dedup of synthetic Alpaca-like records (instruction, input, output; 2% planted near-duplicates: one word of a 20+ word output changed)",
                ["records, method", "seconds", "peak RSS GB", "pairs", "planted found"], rows)
    return results
