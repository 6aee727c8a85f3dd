"""Choosing the main job's recipe on the chapter's data by the validation split alone.

Each candidate fine-tunes the default model (a subprocess, a run folder of its own), answers the
validation split and the test split, and is scored on both. The choice is the candidate with the
best mean rank over validation ROUGE-L, chrF and BLEU among those whose whole main job fits the
15-minute budget (training + test responses here; the base-model row adds about a minute). The
test scores are printed for every candidate once, at the end, and never enter the choice.

    python -m bench recipes [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import print_table
from instructkit.main_job import REPEAT_STOP, response_budget
from bench.quality import BOOK, CHAPTER

# The main job's recipe (main_job.main_recipe) as flags, and the changes tried against it.
BASE_FLAGS = ["--lr", "1e-4", "--warmup", "10", "--schedule", "cosine", "--clip", "1.0", "--mask-instructions",
              "--freeze-embedding", "--eval-every", "40", "--eval-batches", "7", "--save-every", "50", "--no-sample"]
# name -> (flags added, flags dropped from BASE_FLAGS); later flags win in argparse.
CANDIDATES = {
    "1 epoch (the built-in data's recipe)": (["--epochs", "1"], []),
    "2 epochs": (["--epochs", "2"], []),
    "2 epochs, lr 2e-4": (["--epochs", "2", "--lr", "2e-4"], []),
}
# Not in the hour (measure them by adding rows): the alpaca prompt style, and training the tied
# 262k x 640 embedding, whose weight gradient and AdamW state (168M more trainable parameters)
# make every step slower, so two epochs of it would likely not fit the budget.
BUDGET_SECONDS = 15 * 60 - 90  # the base-model responses and the report take the rest


def _cli(*args: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "instructkit", *args], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise RuntimeError((result.stderr.strip().splitlines() or ["failed"])[-1])
    return time.perf_counter() - started


def _budget() -> int:
    """The main job's response budget on the chapter's data (twice its longest training response)."""
    from instructkit.data.pipeline import prepare_data
    from instructkit.models.registry import load_model

    return response_budget(prepare_data(str(CHAPTER)).splits.train, load_model("tiny-gemma3").tokenizer)


def _scores(path: Path) -> dict:
    from instructkit.evaluate.metrics import summarize

    entries = json.loads(path.read_text())
    summary, _ = summarize([e["model_response"] for e in entries], [e["output"] for e in entries])
    return {name: summary[name] for name in ("rouge_l", "chrf", "bleu", "response_words_mean")}


def _candidate(name: str, added: list[str], dropped: list[str], folder: Path, quick: bool) -> dict:
    out = folder / "run"
    model = ["--model", "tiny-gemma3", "--max-steps", "3"] if quick else ["--model", "gemma-3-270m"]
    flags = [f for f in BASE_FLAGS if f not in dropped] + added
    tokens = ["--max-new-tokens", "8"] if quick else ["--max-new-tokens", str(_budget()), "--stop-on-repeat", str(REPEAT_STOP)]
    train_s = _cli("finetune", *model, "--data", str(CHAPTER), "--out", str(out), *flags)
    val_s = _cli("respond", "--run", str(out), "--split", "val", *tokens)
    test_s = _cli("respond", "--run", str(out), "--split", "test", *tokens)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().split("\n") if '"eval"' in line]
    return {"name": name, "flags": flags, "train_s": train_s, "val_respond_s": val_s, "test_respond_s": test_s,
            "job_s": train_s + test_s, "val_loss": evals[-1]["val_loss"],
            "val": _scores(out / "val-responses.json"), "test": _scores(out / "test-responses.json")}


def run(quick: bool = False) -> dict:
    results = []
    for name, (added, dropped) in CANDIDATES.items():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results.append(_candidate(name, added, dropped, Path(tmp), quick))
            except RuntimeError as exc:
                results.append({"name": name, "error": str(exc)})
            print(f"recipes: {name} done", flush=True)
    good = [r for r in results if "error" not in r and r["job_s"] <= BUDGET_SECONDS]
    for metric in ("rouge_l", "chrf", "bleu"):
        for rank, r in enumerate(sorted(good, key=lambda r: -r["val"][metric])):
            r.setdefault("ranks", []).append(rank + 1)
    chosen = min(good, key=lambda r: sum(r["ranks"]) / 3) if good else None
    rows = [[r["name"], f"{r.get('job_s', float('nan')):.0f}", f"{r.get('val_loss', float('nan')):.3f}",
             *(f"{r['val'][m]:.3f}" if "val" in r else "-" for m in ("rouge_l", "chrf", "bleu")),
             "<- chosen" if r is chosen else ("over budget" if r.get("job_s", 0) > BUDGET_SECONDS else r.get("error", ""))]
            for r in results]
    print_table("Candidates, scored on the validation split (the choice)",
                ["recipe", "train + test responses s", "val loss", "val ROUGE-L", "val chrF", "val BLEU", ""], rows)
    book = _scores(BOOK) if BOOK.exists() else {}
    print_table("The same candidates on the test split (looked at once, after the choice)",
                ["recipe", "test ROUGE-L", "test chrF", "test BLEU"],
                [[r["name"], *(f"{r['test'][m]:.3f}" if "test" in r else "-" for m in ("rouge_l", "chrf", "bleu"))]
                 for r in results] + [["the book's gpt2-medium", *(f"{book.get(m, float('nan')):.3f}"
                                                                    for m in ("rouge_l", "chrf", "bleu"))]])
    return {"candidates": results, "chosen": chosen["name"] if chosen else None, "book_test": book,
            "budget_s": BUDGET_SECONDS}
