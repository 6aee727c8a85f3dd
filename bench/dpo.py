"""DPO on Gemma 3 270M after the chapter-data main job (the book's beta 0.1, lr 5e-6, batch 8 and
mean log-probs; with the main job's CPU choices: the tied embedding frozen, length-grouped pairs;
40 steps instead of the book's full epoch of 116, chosen on the validation split: see
STEPS): held-out preference accuracy before and after (target: >= 80% of the test pairs), the
responses' quality against the chosen ones, the wall time of the DPO run (target <= 10 minutes
on 2 cores), and step time and peak RSS with and without --precompute-ref (short runs, median of
the steps).

    python -m bench dpo --run runs/instruction-data     # the chapter-data main job's folder
Without --run, the chapter-data main job runs first (`instructkit run`, ~13 minutes)."""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
from pathlib import Path

from bench.common import CHAPTER, cli_seconds, print_table, quick_data_file

PREFERENCES = CHAPTER.with_name("instruction-data-with-preference.json")
TARGET_ACCURACY, TARGET_SECONDS = 0.8, 600
# What the DPO runs add to the book's defaults: the main job's CPU choices (README, "DPO").
RECIPE = ("--freeze-embedding",)
# The run's length, chosen on the validation split (all 110 pairs, evaluated every 10 steps):
# validation accuracy 18% at step 0, 71% at 10, 76% at 20, 82% at 30, 84% at 40 and 50, while
# the chosen responses' mean log-prob rose from -1.82 to -1.65 at step 30 and fell back after
# it (-1.68 at 40, -1.75 at 50). Past that point both responses lose likelihood and the model
# stops ending its answers: a full epoch (116 steps) also scores 80% on the test pairs, but its
# responses run to the token limit (56.6 words on average against 8.5; ROUGE-L against the
# chosen responses 0.16 against 0.53).
STEPS = ("--max-steps", "40", "--eval-every", "40")


def _short_run(sft: Path, preferences: Path, out: Path, precompute: bool, quick: bool) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cli_seconds("dpo", "--run", str(sft), "--data", str(preferences), "--out", str(out), "--max-steps", "2" if quick else "6",
         *RECIPE, *(["--precompute-ref"] if precompute else []))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far, in KiB
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [row for row in rows if row["kind"] == "step"][1:]  # the first step warms up
    return {"step_seconds": statistics.median(s["seconds"] for s in steps),
            "peak_rss_gb": peak * 1024 / 1e9 if peak > before else float("nan")}


def run(run_dir: str | None = None, quick: bool = False) -> dict:
    if not PREFERENCES.exists():
        print(f"\ndpo: {PREFERENCES} not found; skipped")
        return {"skipped": str(PREFERENCES)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sft = Path(run_dir) if run_dir else tmp / "sft"
        # --quick: the first 200 records of each file (test splits of 20), on a tiny model
        preferences = quick_data_file(PREFERENCES, tmp) if quick else PREFERENCES
        if not run_dir:
            model = ["--model", "tiny-gemma3", "--max-steps", "3", "--max-new-tokens", "8", "--base-max-new-tokens", "4"] if quick else []
            cli_seconds("run", *model, "--data", str(quick_data_file(CHAPTER, tmp) if quick else CHAPTER), "--out", str(sft))
        # Short runs first (with and without the reference model in memory), each its own process.
        # The smaller run first: peak RSS is read as the largest child so far.
        with_pre = _short_run(sft, preferences, tmp / "precomputed", True, quick)
        without = _short_run(sft, preferences, tmp / "two-models", False, quick)
        out = tmp / "dpo"
        seconds = cli_seconds("dpo", "--run", str(sft), "--data", str(preferences), "--out", str(out), "--precompute-ref",
                       *RECIPE, *(["--max-steps", "3"] if quick else STEPS))
        cli_seconds("evaluate", "--preferences", str(out), "--max-new-tokens", "8" if quick else "96")
        evaluation = json.loads((out / "evaluation-preferences.json").read_text())
    reward, likelihood = evaluation["implicit_reward"], evaluation["likelihood_preference"]
    accuracy = reward["dpo"]["accuracy"]
    print_table(f"DPO after the chapter-data fine-tune ({evaluation['pairs']} held-out test pairs)", ["measure", "value"], [
        ["SFT model: likelihood prefers the chosen response", f"{likelihood['sft']:.1%}"],
        ["DPO model: likelihood prefers the chosen response", f"{likelihood['dpo']:.1%}"],
        [f"DPO model: implicit-reward accuracy (target >= {TARGET_ACCURACY:.0%})",
         f"{accuracy:.1%} ({'met' if accuracy >= TARGET_ACCURACY else 'not met'})"],
        ["DPO model: mean reward margin", f"{reward['dpo']['mean_margin']:.3f}"],
        *([f"{name.upper()} responses: ROUGE-L / chrF / BLEU against the chosen, mean words",
           f"{r['vs_chosen']['rouge_l']:.3f} / {r['vs_chosen']['chrf']:.1f} / {r['vs_chosen']['bleu']:.1f}, "
           f"{r['words_mean']:.1f}"] for name, r in evaluation["responses"].items()),
        [f"DPO wall time, --precompute-ref {' '.join(RECIPE + STEPS)} (target <= {TARGET_SECONDS // 60} min)",
         f"{seconds:.0f} s ({'met' if seconds <= TARGET_SECONDS else 'not met'})"],
        ["step time, reference model in memory", f"{without['step_seconds']:.2f} s"],
        ["step time, --precompute-ref", f"{with_pre['step_seconds']:.2f} s"],
        ["peak RSS, reference model in memory", f"{without['peak_rss_gb']:.2f} GB"],
        ["peak RSS, --precompute-ref", f"{with_pre['peak_rss_gb']:.2f} GB"]])
    return {"evaluation": {k: v for k, v in evaluation.items() if k != "samples"}, "dpo_seconds": seconds,
            "two_models": without, "precomputed": with_pre, "accuracy_met": accuracy >= TARGET_ACCURACY,
            "time_met": seconds <= TARGET_SECONDS}
