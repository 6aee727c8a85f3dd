"""Quality of the main job and time to quality against the chapter's own recipe.

1. Our main job on the chapter's data (`instructkit run`, default model, the book's responses as
   the baseline) with three seeds: each metric against the references, median and min-max, beside
   the book's gpt2-medium responses, and the main job's wall time.
2. The chapter's recipe on this machine: gpt2-medium (random weights: the same arithmetic as the
   real ones), its training loop for 2 epochs of 116 steps with its evaluation every 5 steps, and
   its cacheless generation of the 110 test responses. Both are timed on a sample (steps, responses)
   and scaled to the whole, in the same run.
Time to quality = the chapter recipe's time / our main job's time (ours reaches the book's quality
in that time; the ratio is only claimed when our responses beat the book's on every metric).

`--run DIR` (without --quick) reads one finished main-job folder instead of running three.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BOOK, CHAPTER, fmt_spread, print_table, run_worker, spread

SEEDS = (123, 7, 2026)
KEPT = Path(__file__).resolve().parents[1] / "runs" / "bench-quality"


def _main_job(seed: int, out: Path, quick: bool) -> dict:
    args = [sys.executable, "-m", "instructkit", "run", "--data", str(CHAPTER), "--out", str(out), "--seed", str(seed),
            "--baseline", str(BOOK), "--baseline-label", "the book's gpt2-medium"]
    if quick:
        args += ["--model", "tiny-gemma3", "--max-steps", "3", "--max-new-tokens", "8", "--base-max-new-tokens", "4"]
    shutil.rmtree(out, ignore_errors=True)  # a fresh job each time: a finished folder would only be reread
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        return {"seed": seed, "error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    evaluation = json.loads((out / "evaluation.json").read_text())
    return {"seed": seed, "wall_s": time.perf_counter() - started, "metrics": evaluation["metrics"],
            "against": evaluation.get("against", {}).get("metrics", {})}


def chapter_recipe_seconds(quick: bool) -> dict:
    """The chapter's training loop and cacheless responses on gpt2-medium, sampled and scaled."""
    model = "tiny-gpt2" if quick else "random:gpt2-medium"
    steps = 2 if quick else 6
    trained = run_worker("bench.train_worker", {"data": str(CHAPTER), "batch": 8, "steps": steps, "warmup": 1,
                                                 "eval_every": 5, "impl": "naive", "model": model})
    if "error" in trained:
        return {"error": trained["error"]}
    per_step = sum(trained["step_seconds"]) / len(trained["step_seconds"])
    training = 2 * 116 * per_step + (2 * 116 / 5) * trained["one_eval_seconds"]
    responses = run_worker("bench.quality_worker", {"model": model, "data": str(CHAPTER), "prompts": 1 if quick else 3})
    if "error" in responses:
        return {"error": responses["error"]}
    generation = 110 * responses["seconds_per_response"]
    return {"model": model, "train_s": training, "respond_s": generation, "total_s": training + generation,
            "sampled_steps": steps, "seconds_per_step": per_step, "one_eval_s": trained["one_eval_seconds"],
            "seconds_per_response": responses["seconds_per_response"]}


def run(run_dir: Path | None = None, quick: bool = False) -> dict:
    if not CHAPTER.exists():
        print(f"\nquality: {CHAPTER} not found (the chapter's data sits in ../shared/data); skipped")
        return {"skipped": str(CHAPTER)}
    if run_dir is not None and not quick and (run_dir / "evaluation.json").exists():
        evaluation = json.loads((run_dir / "evaluation.json").read_text())
        runs = [{"seed": "?", "wall_s": float("nan"), "metrics": evaluation["metrics"],
                 "against": evaluation.get("against", {}).get("metrics", {})}]
    elif quick:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [_main_job(SEEDS[0], Path(tmp) / f"seed-{SEEDS[0]}", quick)]
    else:  # kept: `python -m bench dpo --run runs/bench-quality/seed-123` starts from one
        runs = [_main_job(seed, KEPT / f"seed-{seed}", quick) for seed in SEEDS]
    good = [r for r in runs if "error" not in r]
    if not good:
        print(f"\nquality: every main job failed ({runs[0]['error']})")
        return {"runs": runs}
    rows, summary = [], {}
    for name in ("rouge_l", "chrf", "bleu"):
        ours = spread([r["metrics"][name] for r in good])
        book = good[0]["against"].get(name, {}).get("other", float("nan"))
        lows = spread([r["against"][name]["ci95"][0] for r in good if name in r["against"]])
        summary[name] = {"ours": ours, "book": book, "ci_low": lows}
        rows.append([name, fmt_spread(ours, "{:.3f}"), f"{book:.3f}", fmt_spread(lows, "{:+.3f}"),
                     "yes" if ours["min"] > book else "no"])
    print_table(f"Main job on the chapter's data, {len(good)} seeds (median, min-max)",
                ["metric", "ours", "the book's gpt2-medium", "paired-bootstrap 95% low of (ours - book)", "beats in every seed"],
                rows)
    wall = spread([r["wall_s"] for r in good])
    chapter = chapter_recipe_seconds(quick)
    beats = all(row[-1] == "yes" for row in rows)
    ratio = chapter["total_s"] / wall["median"] if "total_s" in chapter and wall["n"] else float("nan")
    print_table("Time to quality", ["", "seconds"], [
        ["our main job (median of seeds)", fmt_spread(wall, "{:.0f}")],
        ["the chapter's recipe: training 2 epochs", f"{chapter.get('train_s', float('nan')):.0f}"],
        ["the chapter's recipe: 110 cacheless responses", f"{chapter.get('respond_s', float('nan')):.0f}"],
        ["ratio", f"{ratio:.1f}x" + ("" if beats else " (not claimed: ours does not beat the book on every metric)")]])
    return {"runs": runs, "summary": summary, "wall_s": wall, "chapter_recipe": chapter, "ratio": ratio, "beats": beats}
