"""The main job's quality numbers, read from its run folder (run `make run` first)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import print_table


def run(run_dir: Path) -> dict:
    evaluation = run_dir / "evaluation.json"
    metrics = run_dir / "metrics.jsonl"
    if not evaluation.exists() or not metrics.exists():
        print(f"\nquality: {run_dir} has no finished main job (run `make run` first); skipped")
        return {"skipped": str(run_dir)}
    result = json.loads(evaluation.read_text())
    evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval"' in line]
    rows = [["validation loss", evals[0]["val_loss"], evals[-1]["val_loss"]]]
    base = result.get("baseline", {}).get("metrics", {})
    for key in ("rouge_l", "chrf", "bleu", "exact_match"):
        rows.append([key, base.get(key, float("nan")), result["metrics"][key]])
    if "checks" in result:
        rows.append(["exact-check accuracy", result.get("baseline", {}).get("checks", {}).get("accuracy", float("nan")),
                     result["checks"]["accuracy"]])
    print_table(f"Quality of the main job ({run_dir})", ["measure", "before (base)", "after (fine-tuned)"],
                [[name, f"{a:.3f}", f"{b:.3f}"] for name, a, b in rows])
    return {"rows": rows}
