"""Data parallel on this machine: Gemma 3 270M, the main job's recipe, 2 processes x 1 thread
(gloo) against 1 process x 2 threads, the same global batch of 8 and the same steps: tokens/s and
the peak RSS of the largest process. On 2 cores this can only lose (the same arithmetic plus an
all-reduce per step); the point is exactness (tests/test_distributed.py) and the path to more
machines. Also: the bytes each rank sends per optimizer step, computed for Gemma 3 270M and 1B."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DATA, fmt_spread, print_table, spread

RECIPE = ["--mask-instructions", "--freeze-embedding", "--eval-every", "1000", "--eval-batches", "1", "--no-sample",
          "--save-every", "1000", "--lr", "1e-4"]


def _run(out: Path, model: str, steps: int, nproc: int) -> dict:
    threads = ["--threads", "1", "--nproc", str(nproc)] if nproc > 1 else ["--threads", "2"]
    batch = str(8 // nproc)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "instructkit", "finetune", "--model", model, "--data", DATA,
                             "--out", str(out), "--max-steps", str(steps), "--batch-size", batch, *threads, *RECIPE],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if r["kind"] == "step"][1:]  # the first step warms up
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"tok_s": sum(r["real_tokens"] for r in steps_rows) / sum(r["seconds"] for r in steps_rows),
            "wall_s": time.perf_counter() - started, "peak_rss_gb": peak * 1024 / 1e9 if peak > before else float("nan")}


def communication() -> list[list]:
    """Per rank and optimizer step, ring all-reduce (DDP) sends 2 (N-1)/N of the gradient bytes;
    FSDP all-gathers the weights twice (forward, backward) and reduce-scatters the gradients, each
    (N-1)/N of their bytes. fp32 gradients, 4 bytes a value."""
    from instructkit.models.families import GEMMA3_PRESETS
    from instructkit.models.transformer import Transformer as Gemma3

    rows = []
    for name in ("gemma-3-270m", "gemma-3-1b"):
        config = GEMMA3_PRESETS[name]
        embedding = config.vocab_size * config.emb_dim
        with __import__("torch").device("meta"):
            total = sum(p.numel() for p in Gemma3(config).parameters())
        for label, trainable in (("all but the embedding", total - embedding), ("everything", total)):
            for n in (2, 8):
                ddp = 2 * (n - 1) / n * trainable * 4
                fsdp = (2 * total + trainable) * (n - 1) / n * 4
                rows.append([name, label, n, f"{ddp / 1e9:.2f}", f"{fsdp / 1e9:.2f}"])
    return rows


def run(quick: bool = False, repeats: int | None = None) -> dict:
    repeats = repeats or (1 if quick else 3)
    model, steps = ("tiny-gemma3", 4) if quick else ("gemma-3-270m", 10)
    results: dict[str, list[dict]] = {"1 process x 2 threads": [], "2 processes x 1 thread": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(repeats):
            for name, nproc in (("1 process x 2 threads", 1), ("2 processes x 1 thread", 2)):
                results[name].append(_run(Path(tmp) / f"{nproc}-{round_index}", model, steps, nproc))
    summary = {name: {"tok_s": spread([r.get("tok_s", float("nan")) for r in runs]),
                      "peak_rss_gb": max((r.get("peak_rss_gb", float("nan")) for r in runs), default=float("nan"))}
               for name, runs in results.items()}
    ratio = spread([b.get("tok_s", float("nan")) / a.get("tok_s", float("nan"))
                    for a, b in zip(results["1 process x 2 threads"], results["2 processes x 1 thread"])])
    print_table(f"{model}, global batch 8, {steps} steps (median, min-max of {repeats})",
                ["layout", "real tok/s", "peak RSS of the largest process GB"],
                [[name, fmt_spread(value["tok_s"], "{:.1f}"), f"{value['peak_rss_gb']:.2f}"] for name, value in summary.items()]
                + [["2 processes / 1 process", fmt_spread(ratio, "{:.2f}", "x"), ""]])
    table = communication()
    print_table("Bytes each rank sends per optimizer step (fp32 gradients), GB",
                ["model", "trains", "ranks", "DDP all-reduce", "FSDP gather + reduce-scatter"], table)
    return {"model": model, "steps": steps, "summary": summary, "ratio": ratio, "raw": results, "communication": table}
