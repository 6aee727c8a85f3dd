"""One LoRA fine-tune for bench.base_quantize's quality table, in its own process:
`python -m bench.base_quantize_worker SPEC_JSON` -> the final validation loss."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from instructkit.train.config import TrainConfig
    from instructkit.train.finetune import finetune

    spec = json.loads(sys.argv[1])
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        # The main job's chapter recipe at rank 16 (loss on responses, frozen embedding), cut to a
        # fixed number of steps; evaluated at the end on 7 batches of 8: the whole validation split
        # of the chapter's data (55 records), as the main job evaluates.
        config = TrainConfig(model=spec["model"], data=spec["data"], out=str(out), max_steps=spec["steps"],
                             lora_rank=16, lora_alpha=32.0, lr=5e-4, warmup=5, schedule="cosine", clip=1.0,
                             mask_instructions=True, freeze_embedding=True, eval_every=spec["steps"], eval_batches=7,
                             save_every=10_000, sample_prompt=False, base_quantize=spec["base_quantize"])
        started = time.perf_counter()
        finetune(config)
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [row for row in rows if row["kind"] == "eval"][-1]
    print(json.dumps({**spec, "val_loss": final["val_loss"], "train_loss": final["train_loss"], "seconds": seconds}))


if __name__ == "__main__":
    main()
