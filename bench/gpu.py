"""Gemma 3 270M fine-tuning steps on a CUDA GPU: tokens/s, MFU against the GPU's measured matmul
peak (bf16 and fp32, an 8192^3 product, in the same run) and peak GPU memory.

    python -m bench.gpu --tokenizer PATH/tokenizer.json --data instruction-data.json

The weights are random (the GPU machine has no network to fetch the real ones; the arithmetic,
hence the speed, is the same): an HF-format Gemma 3 270M folder is written from our preset and
loaded like any other, with the real tokenizer, so the batches have the real lengths."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def matmul_peak(dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, device="cuda", dtype=dtype), torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def random_gemma_folder(tokenizer: Path, folder: Path) -> Path:
    from safetensors.torch import save_file

    from instructkit.models.checkpoints import gemma3_hf_config, gemma3_to_hf
    from instructkit.models.families import GEMMA3_PRESETS
    from instructkit.models.transformer import Transformer as Gemma3

    torch.manual_seed(0)
    config = GEMMA3_PRESETS["gemma-3-270m"]
    model = Gemma3(config)
    save_file(gemma3_to_hf(model.state_dict()), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(gemma3_hf_config(config)))
    shutil.copy(tokenizer, folder / "tokenizer.json")
    return folder


def main(argv: list[str] | None = None) -> int:
    from bench.common import run_worker

    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device", file=sys.stderr)
        return 2
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_gflops": peaks, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_gemma_folder(Path(args.tokenizer), Path(tmp))
        for name, extra in (("fp32, frozen embedding", {"precision": "fp32", "freeze_embedding": True}),
                            ("bf16 autocast, frozen embedding", {"precision": "bf16", "freeze_embedding": True}),
                            ("bf16 autocast, full", {"precision": "bf16"}),
                            ("bf16 autocast, batch 32, frozen embedding", {"precision": "bf16", "freeze_embedding": True,
                                                                           "batch": 32})):
            spec = {"impl": "ours", "model": str(folder), "data": args.data, "batch": 8, "steps": args.steps, "warmup": 3,
                    "eval_every": 0, "mask_instructions": True, "device": "cuda", **extra}
            row = run_worker("bench.train_worker", spec)
            if "error" not in row:
                row["mfu"] = row["model_gflops"] / peaks[extra["precision"]]
            results["rows"][name] = row
            print(f"{name}: " + (row.get("error") or f"{row['real_tok_s']:.0f} real tok/s, MFU {row['mfu']:.1%} of the "
                                 f"measured {extra['precision']} peak ({peaks[extra['precision']] / 1e3:.0f} TFLOP/s), "
                                 f"peak GPU memory {row['cuda_peak_gb']:.2f} GB"), flush=True)
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
