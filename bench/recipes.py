"""Choosing the main job's recipe on the chapter's data without looking at its test split.

Each candidate fine-tunes the default model twice (subprocesses, run folders of their own):
1. on the training split, then answers the validation split and the test split, as the main job
   would (beam search, 4 beams, length penalty 1.0, the repeat stop and the response budget);
2. on 85% of the training split (shuffled with seed 1), then answers the other 15% (141 records
   that are neither validation nor test items): a second, larger validation set, because the 55
   validation items alone put a standard error of ~0.03 on ROUGE-L, more than most differences
   between candidates.
The choice is the candidate with the best mean rank over ROUGE-L, chrF and BLEU of the 196 pooled
validation responses (the validation split + the training split's held-out fold), among those
whose training + test responses fit the budget (the base-model row and the report take the rest
of the 15 minutes). The test scores are printed for every candidate once, at the end, and never
enter the choice.

    python -m bench recipes [--quick]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.common import (BOOK, CHAPTER, chapter_response_budget, cli_seconds, print_table, quick_data_file,
                          score_responses)
from instructkit.main_job import EVAL_EVERY, REPEAT_STOP

# The main job's fixed settings (main_job.main_recipe) as flags; each candidate adds its own.
BASE_FLAGS = ["--epochs", "2", "--warmup", "10", "--schedule", "cosine", "--clip", "1.0", "--mask-instructions",
              "--freeze-embedding", "--eval-every", str(EVAL_EVERY), "--eval-batches", "7", "--save-every",
              str(EVAL_EVERY), "--no-sample"]
# name -> flags added to BASE_FLAGS. Measured before (docs/BENCHMARKS.md): 1 epoch, lr 2e-4, the
# alpaca prompt style, training the tied embedding, loss on every token; none beat these.
CANDIDATES = {
    "full (all but the embedding), lr 1e-4": ["--lr", "1e-4"],
    "full (all but the embedding), lr 5e-5": ["--lr", "5e-5"],
    "LoRA r16 alpha 32, lr 5e-4": ["--lr", "5e-4", "--lora-rank", "16", "--lora-alpha", "32"],
}
QUICK_CANDIDATES = ("full (all but the embedding), lr 1e-4", "LoRA r16 alpha 32, lr 5e-4")
FOLD_SHUFFLE_SEED = 1
BUDGET_SECONDS = 15 * 60 - 90  # the base-model responses and the report take the rest
DECODING = ["--beams", "4", "--length-penalty", "1.0"]  # the main job's on the chapter's data


def _candidate(name: str, added: list[str], folder: Path, data: Path, fold_data: Path, quick: bool) -> dict:
    model = ["--model", "tiny-gemma3", "--max-steps", "3"] if quick else ["--model", "gemma-3-270m"]
    flags = BASE_FLAGS + added
    tokens = ["--max-new-tokens", "8"] if quick else ["--max-new-tokens", str(chapter_response_budget()), "--stop-on-repeat", str(REPEAT_STOP)]
    out, fold = folder / "run", folder / "fold"
    train_s = cli_seconds("finetune", *model, "--data", str(data), "--out", str(out), *flags)
    val_s = cli_seconds("respond", "--run", str(out), "--split", "val", *tokens, *DECODING)
    test_s = cli_seconds("respond", "--run", str(out), "--split", "test", *tokens, *DECODING)
    cli_seconds("finetune", *model, "--data", str(fold_data), "--shuffle-seed", str(FOLD_SHUFFLE_SEED), "--out", str(fold), *flags)
    for split in ("val", "test"):  # both held-out parts of the fold's own split
        cli_seconds("respond", "--run", str(fold), "--split", split, *tokens, *DECODING)
    last_eval = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n") if '"eval"' in line][-1]  # noqa: E731
    pooled = [out / "val-responses.json", fold / "val-responses.json", fold / "test-responses.json"]
    return {"name": name, "flags": flags, "train_s": train_s, "val_respond_s": val_s, "test_respond_s": test_s,
            "job_s": train_s + test_s, "val_loss": last_eval(out)["val_loss"], "fold_loss": last_eval(fold)["val_loss"],
            "val": score_responses(out / "val-responses.json"), "pooled": score_responses(*pooled), "test": score_responses(out / "test-responses.json")}


def _training_split_file(folder: Path, data: Path) -> Path:
    """The training split of `data` (the chapter's) as a data file of its own, for the held-out fold."""
    from instructkit.data.pipeline import prepare_data

    records = prepare_data(str(data)).splits.train
    path = folder / "training-split.json"
    path.write_text(json.dumps(records))
    return path


def run(quick: bool = False) -> dict:
    results = []
    with tempfile.TemporaryDirectory() as shared:
        # --quick: the chapter's first 200 records (its fold: their 170 training records)
        data = quick_data_file(CHAPTER, Path(shared)) if quick else CHAPTER
        fold_data = _training_split_file(Path(shared), data)
        # --quick checks the harness: one full and one LoRA candidate (each code path once)
        chosen = {name: CANDIDATES[name] for name in QUICK_CANDIDATES} if quick else CANDIDATES
        for name, added in chosen.items():
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    results.append(_candidate(name, added, Path(tmp), data, fold_data, quick))
                except RuntimeError as exc:
                    results.append({"name": name, "error": str(exc)})
                print(f"recipes: {name} done", flush=True)
    good = [r for r in results if "error" not in r and r["job_s"] <= BUDGET_SECONDS]
    for metric in ("rouge_l", "chrf", "bleu"):
        for rank, r in enumerate(sorted(good, key=lambda r: -r["pooled"][metric])):
            r.setdefault("ranks", []).append(rank + 1)
    chosen = min(good, key=lambda r: sum(r["ranks"]) / 3) if good else None
    metrics = ("rouge_l", "chrf", "bleu")
    rows = [[r["name"], f"{r.get('job_s', float('nan')):.0f}", f"{r.get('val_loss', float('nan')):.3f}",
             f"{r.get('fold_loss', float('nan')):.3f}", *(f"{r['val'][m]:.3f}" if "val" in r else "-" for m in metrics),
             *(f"{r['pooled'][m]:.3f}" if "pooled" in r else "-" for m in metrics),
             "<- chosen" if r is chosen else ("over budget" if r.get("job_s", 0) > BUDGET_SECONDS else r.get("error", ""))]
            for r in results]
    print_table("Candidates on validation responses: the validation split, and pooled with the training split's "
                "held-out fold (the choice)",
                ["recipe", "train + test responses s", "val loss", "fold loss", "val ROUGE-L", "val chrF", "val BLEU",
                 "pooled ROUGE-L", "pooled chrF", "pooled BLEU", ""], rows)
    book = score_responses(BOOK) if BOOK.exists() else {}
    print_table("The same candidates on the test split (looked at once, after the choice)",
                ["recipe", "test ROUGE-L", "test chrF", "test BLEU"],
                [[r["name"], *(f"{r['test'][m]:.3f}" if "test" in r else "-" for m in metrics)]
                 for r in results] + [["the book's gpt2-medium", *(f"{book.get(m, float('nan')):.3f}" for m in metrics)]])
    return {"candidates": results, "chosen": chosen["name"] if chosen else None, "book_test": book,
            "budget_s": BUDGET_SECONDS, "fold_shuffle_seed": FOLD_SHUFFLE_SEED}
