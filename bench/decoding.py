"""Choosing how the main job decodes its test responses, on the validation split alone.

A finished main-job folder on the chapter's data (`--run`, e.g. runs/bench-quality/seed-123; with
--quick a 3-step tiny model made here on the chapter's first 200 records) answers the validation
split with each decoding candidate through `instructkit respond`, the path the main job takes:
greedy, and beam search with 4 or 8 beams at length penalty 0.5 or 1.0, all with the main job's
token budget and repeat stop. The choice is the best mean rank over validation ROUGE-L, chrF and
BLEU among candidates whose test responses keep the whole job 30 s under its 15 minutes (the
folder's fine-tuning wall time + the candidate's test responses + ~75 s for the base-model row and
the report). The test split is answered by every candidate for its time; its scores are printed
once, after the choice.

    python -m bench decoding --run runs/bench-quality/seed-123 [--quick]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import print_table
from bench.common import BOOK, CHAPTER, chapter_response_budget, cli_seconds, quick_data_file, score_responses
from instructkit.main_job import REPEAT_STOP

CANDIDATES = {"greedy": (1, 1.0), "4 beams, length penalty 0.5": (4, 0.5), "4 beams, length penalty 1.0": (4, 1.0),
              "8 beams, length penalty 0.5": (8, 0.5), "8 beams, length penalty 1.0": (8, 1.0)}
# A candidate fits when fine-tuning + its test responses + the rest of the job stay 30 s under 15
# minutes (the three seeds' jobs spread over 23 s on 2026-11-30).
JOB_SECONDS = 15 * 60 - 30
REST_SECONDS = 75  # loading the model twice, the base-model responses (66 s) and the report


def _training_seconds(run: Path) -> float:
    """Wall time of the job's fine-tuning stage (loading, steps, evaluations, checkpoints): from the
    run's config, written first, to its weights, written last. (The steps alone leave out ~200 s.)"""
    return (run / "model.safetensors").stat().st_mtime - (run / "config.json").stat().st_mtime


def run(run_dir: Path | None, quick: bool = False) -> dict:
    if not CHAPTER.exists():
        print(f"\ndecoding: {CHAPTER} not found (the chapter's data sits in ../shared/data); skipped")
        return {"skipped": str(CHAPTER)}
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            run_dir = Path(tmp) / "run"
            data = quick_data_file(CHAPTER, Path(tmp))
            cli_seconds("finetune", "--model", "tiny-gemma3", "--data", str(data), "--out", str(run_dir), "--max-steps", "3",
                 "--eval-batches", "1", "--no-sample")
        elif run_dir is None or not (run_dir / "metrics.jsonl").exists():
            print("\ndecoding: needs --run, a finished main-job folder on the chapter's data (python -m bench quality "
                  "keeps runs/bench-quality/seed-123)")
            return {"skipped": "no --run"}
        tokens = ["--max-new-tokens", "6" if quick else str(chapter_response_budget()), "--stop-on-repeat", str(REPEAT_STOP)]
        training_s = _training_seconds(run_dir)
        results = []
        for name, (beams, length_penalty) in CANDIDATES.items():
            scored = {}
            for split in ("val", "test"):
                out = Path(tmp) / f"{split}-{beams}-{length_penalty}.json"
                seconds = cli_seconds("respond", "--run", str(run_dir), "--split", split, "--out", str(out), "--beams", str(beams),
                               "--length-penalty", str(length_penalty), *tokens)
                scored[split] = {**score_responses(out), "respond_s": seconds}
            results.append({"name": name, "beams": beams, "length_penalty": length_penalty, **scored,
                            "job_s": training_s + scored["test"]["respond_s"] + REST_SECONDS})
            print(f"decoding: {name} done", flush=True)
    fitting = [r for r in results if r["job_s"] <= JOB_SECONDS]
    for metric in ("rouge_l", "chrf", "bleu"):
        for rank, r in enumerate(sorted(fitting, key=lambda r: -r["val"][metric])):
            r.setdefault("ranks", []).append(rank + 1)
    chosen = min(fitting, key=lambda r: (sum(r["ranks"]), r["test"]["respond_s"])) if fitting else None
    print_table(f"Decoding candidates on the validation split (the choice; fine-tuning took {training_s:.0f} s, budget {JOB_SECONDS} s)",
                ["decoding", "val respond s", "test respond s", "projected job s", "val ROUGE-L", "val chrF", "val BLEU", ""],
                [[r["name"], f"{r['val']['respond_s']:.0f}", f"{r['test']['respond_s']:.0f}", f"{r['job_s']:.0f}",
                  f"{r['val']['rouge_l']:.3f}", f"{r['val']['chrf']:.1f}", f"{r['val']['bleu']:.1f}",
                  "<- chosen" if r is chosen else ("over budget" if r["job_s"] > JOB_SECONDS else "")] for r in results])
    book = score_responses(BOOK) if BOOK.exists() else {}
    print_table("The same candidates on the test split (looked at once, after the choice)",
                ["decoding", "test ROUGE-L", "test chrF", "test BLEU"],
                [[r["name"], *(f"{r['test'][m]:.3f}" for m in ("rouge_l", "chrf", "bleu"))] for r in results]
                + [["the book's gpt2-medium", *(f"{book.get(m, float('nan')):.3f}" for m in ("rouge_l", "chrf", "bleu"))]])
    return {"run": None if quick else str(run_dir), "training_s": training_s, "candidates": results,
            "chosen": chosen["name"] if chosen else None, "book_test": book}
