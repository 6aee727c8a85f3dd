"""Training throughput: ours, ours with each speed feature off, the chapter's loop, HF + TRL.

Each configuration runs in its own process (peak RSS is its own); repetitions are interleaved,
so drift on a shared machine hits every configuration alike. Reported: real (non-padding) and
supervised tokens per second of training steps, the same including the evaluation schedule,
model FLOPs utilisation against the fp32 peak measured in the same run, and peak RSS.
"""

from __future__ import annotations

import statistics

from bench import peak
from bench.common import DATA, print_table, run_worker


def configurations(quick: bool) -> list[tuple[str, dict]]:
    gpt2 = "tiny-gpt2" if quick else "random:gpt2-small"
    gemma = "tiny-gemma3" if quick else "gemma-3-270m"
    steps = 3 if quick else 8
    base = {"data": DATA, "batch": 8, "steps": steps, "warmup": 1, "eval_every": 5}
    configs = [
        ("gpt2: ours", {**base, "impl": "ours", "model": gpt2}),
        ("gpt2: ours, chapter batching", {**base, "impl": "ours", "model": gpt2, "batching": "chapter"}),
        ("gpt2: ours, head everywhere", {**base, "impl": "ours", "model": gpt2, "head": "full"}),
        ("gpt2: ours, masked instructions", {**base, "impl": "ours", "model": gpt2, "mask_instructions": True}),
        # What `instructkit run` does: loss on responses, tied embedding frozen, evaluation every
        # 40 steps on the whole validation set (55 examples = 7 batches).
        ("gpt2: ours, run recipe", {**base, "impl": "ours", "model": gpt2, "mask_instructions": True,
                                    "freeze_embedding": True, "eval_every": 40, "eval_batches": 7}),
        ("gpt2: chapter loop (naive)", {**base, "impl": "naive", "model": gpt2}),
        ("gemma: ours, full, frozen embedding", {**base, "impl": "ours", "model": gemma, "mask_instructions": True, "freeze_embedding": True}),
        ("gemma: ours, full", {**base, "impl": "ours", "model": gemma, "mask_instructions": True}),
        ("gemma: ours, LoRA r16", {**base, "impl": "ours", "model": gemma, "mask_instructions": True, "lora_rank": 16}),
        ("gemma: ours, head everywhere", {**base, "impl": "ours", "model": gemma, "mask_instructions": True, "freeze_embedding": True, "head": "full"}),
        ("gemma: HF + TRL SFTTrainer", {**base, "impl": "hf_trl", "model": gemma, "mask_instructions": True}),
    ]
    return configs


def run(quick: bool = False, peak_gflops: float | None = None, repeats: int | None = None) -> dict:
    repeats = repeats or (1 if quick else 2)
    configs = configurations(quick)
    raw: dict[str, list[dict]] = {name: [] for name, _ in configs}
    peaks = [peak_gflops] if peak_gflops else []
    for _ in range(repeats):  # interleaved: every configuration once per round
        for name, spec in configs:
            raw[name].append(run_worker("bench.train_worker", spec))
        if peak_gflops:  # the peak again, so MFU is against the best rate of this run
            peaks.append(peak.summarize(peak.sample(quick))["gflops"])
    peak_gflops = max(peaks) if peaks else None
    if peak_gflops:
        print(f"fp32 matmul peak, best of {len(peaks)} samplings in this run: {peak_gflops:.1f} GFLOP/s")
    rows, summary = [], {}
    for name, _ in configs:
        runs = [r for r in raw[name] if "error" not in r]
        if not runs:
            rows.append([name, "failed: " + raw[name][0]["error"][:60], "", "", "", "", "", ""])
            continue
        real = statistics.median(r["real_tok_s"] for r in runs)
        run_real = statistics.median(r["run_real_tok_s"] for r in runs)
        sup = statistics.median(r.get("supervised_tok_s", float("nan")) for r in runs)
        gflops = statistics.median(r.get("model_gflops", float("nan")) for r in runs)
        rss = max(r["peak_rss_gb"] for r in runs)
        mfu = gflops / peak_gflops if peak_gflops else float("nan")
        share = statistics.median(r.get("eval_share", 0.0) for r in runs)
        summary[name] = {"real_tok_s": real, "run_real_tok_s": run_real, "supervised_tok_s": sup,
                         "model_gflops": gflops, "mfu": mfu, "peak_rss_gb": rss, "eval_share": share}
        rows.append([name, real, run_real, f"{share:.0%}", sup, gflops, f"{mfu:.0%}" if mfu == mfu else "-", f"{rss:.2f}"])
    print_table("Training throughput (median of interleaved repeats)",
                ["configuration", "real tok/s", "incl. eval", "eval share", "supervised tok/s", "model GFLOP/s", "MFU", "peak RSS GB"], rows)
    ratios = {}
    gpt2_ours, gpt2_naive = summary.get("gpt2: ours"), summary.get("gpt2: chapter loop (naive)")
    if gpt2_ours and gpt2_naive:
        ratios["gpt2 ours / chapter loop (steps)"] = gpt2_ours["real_tok_s"] / gpt2_naive["real_tok_s"]
        ratios["gpt2 ours / chapter loop (incl. eval)"] = gpt2_ours["run_real_tok_s"] / gpt2_naive["run_real_tok_s"]
    gpt2_recipe = summary.get("gpt2: ours, run recipe")
    if gpt2_recipe and gpt2_naive:
        ratios["gpt2 ours, run recipe / chapter loop (steps)"] = gpt2_recipe["real_tok_s"] / gpt2_naive["real_tok_s"]
        ratios["gpt2 ours, run recipe / chapter loop (whole run incl. eval)"] = gpt2_recipe["run_real_tok_s"] / gpt2_naive["run_real_tok_s"]
    gemma_ours, gemma_hf = summary.get("gemma: ours, full, frozen embedding"), summary.get("gemma: HF + TRL SFTTrainer")
    if gemma_ours and gemma_hf:
        ratios["gemma ours / HF+TRL (real tok/s)"] = gemma_ours["real_tok_s"] / gemma_hf["real_tok_s"]
    if ratios:
        print_table("Ratios", ["comparison", "ratio"], [[k, f"{v:.2f}x"] for k, v in ratios.items()])
    return {"summary": summary, "ratios": ratios, "raw": raw, "peak_gflops": peak_gflops, "peak_samplings": peaks}
