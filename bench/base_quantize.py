"""LoRA on a frozen int8 / int4 base (`--base-quantize`), against the fp32 base and HF + PEFT.

Two tables:

- speed and memory on a 1.5B shape (Qwen2.5-1.5B's config, random weights: speed and memory do
  not depend on the values, and the table says so), loaded from a Hugging Face folder written as
  the Hub ships such models (bf16, two shards), so loading is measured as a user meets it: LoRA
  r16 on the seven projections, ours with an fp32 / int8 / int4 base, and HF + TRL + PEFT (fp32
  base, the same trainable parameters). Real tokens/s, peak RSS of training (VmHWM reset after the
  model is loaded) and of loading; every configuration in its own process, rounds interleaved,
  ratios per round (median, min-max);
- quality on the two real models (SmolLM2-135M-Instruct, Gemma 3 270M) and the chapter's data:
  `instructkit finetune --lora-rank 16` for a fixed number of steps with each base, final
  validation loss (the whole validation split); deterministic, so one run each.

    python -m bench base [--quick] [--repeats N] [--only speed|quality]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import CHAPTER, DATA, fmt_spread, print_table, quick_data_file, run_worker, spread, write_hf_folder

SHAPE = "qwen2.5-1.5b"  # written as a bf16 folder (random weights) for the speed table
PEER = "HF + TRL + PEFT, LoRA r16, fp32 base"


def speed_configs(quick: bool, folder: str | None = None) -> dict[str, dict]:
    model = "tiny-gemma3" if quick else folder
    common = {"model": model, "data": DATA, "batch": 2, "steps": 1 if quick else 2, "warmup": 1, "eval_every": 0,
              "mask_instructions": True, "lora_rank": 16, "prompt_style": "chatml"}
    configs = {f"ours, LoRA r16, {base} base": {**common, "impl": "ours", "base_quantize": base}
               for base in ("none", "int8", "int4")}
    configs = {name.replace("none base", "fp32 base"): spec for name, spec in configs.items()}
    configs[PEER] = {**common, "impl": "hf_trl"}
    return configs


def quality_configs(quick: bool, data: str = DATA) -> dict[str, dict]:
    models = {"SmolLM2-135M-Instruct": "smollm2-135m-instruct", "Gemma 3 270M": "gemma-3-270m"}
    if quick:
        models = {"tiny-gemma3": "tiny-gemma3"}
    return {f"{label}, {base} base": {"model": model, "data": data, "base_quantize": base, "steps": 4 if quick else 40}
            for label, model in models.items() for base in ("none", "int8", "int4")}


def run(quick: bool = False, repeats: int | None = None, only: str | None = None) -> dict:
    repeats = repeats or (1 if quick else 3)
    results: dict = {"repeats": repeats, "shape": f"{SHAPE}, random bf16 weights in a Hugging Face folder"}
    if only in (None, "speed"):
        raw: dict[str, list[dict]] = {}
        with tempfile.TemporaryDirectory() as folder:
            configs = speed_configs(quick, None if quick else str(write_hf_folder(folder, SHAPE)))
            for _ in range(repeats):
                for name, spec in configs.items():
                    raw.setdefault(name, []).append(run_worker("bench.train_worker", spec, timeout=3600))

        def values(name, key):
            return [r.get(key, float("nan")) for r in raw[name]]

        rows, summary = [], {}
        for name in configs:
            errors = [r["error"] for r in raw[name] if "error" in r]
            summary[name] = {key: spread(values(name, key)) for key in
                             ("real_tok_s", "train_peak_rss_gb", "setup_peak_rss_gb", "peak_rss_gb")}
            rows.append([name, fmt_spread(summary[name]["real_tok_s"], "{:.1f}"),
                         fmt_spread(summary[name]["train_peak_rss_gb"], "{:.2f}"),
                         fmt_spread(summary[name]["setup_peak_rss_gb"], "{:.2f}"), errors[0][:60] if errors else ""])
        ratios = {}
        for name in configs:
            if name == PEER or not raw[PEER]:
                continue
            ratios[name] = {"tok_s": spread([a / b for a, b in zip(values(name, "real_tok_s"), values(PEER, "real_tok_s"))]),
                            "train_rss": spread([a / b for a, b in zip(values(name, "train_peak_rss_gb"),
                                                                      values(PEER, "train_peak_rss_gb"))])}
        source = "test model" if quick else f"the {SHAPE} shape, random weights, a bf16 folder"
        print_table(f"LoRA r16 on {source}, batch 2, median (min-max) of {repeats} interleaved rounds",
                    ["configuration", "real tok/s", "training peak RSS GB", "loading peak RSS GB", ""], rows)
        print_table(f"Ours against {PEER} (per round; target: >= 2x tokens/s at <= 0.5x training RSS)",
                    ["ours", "tokens/s ratio", "training RSS ratio"],
                    [[name, fmt_spread(r["tok_s"], "{:.2f}", "x"), fmt_spread(r["train_rss"], "{:.2f}", "x")]
                     for name, r in ratios.items()])
        results["speed"] = {"summary": summary, "ratios": ratios, "raw": raw}
    if only in (None, "quality"):
        with tempfile.TemporaryDirectory() as folder:  # --quick: the first 200 chapter records
            data = str(quick_data_file(CHAPTER, Path(folder))) if quick and CHAPTER.exists() else DATA
            quality = {name: run_worker("bench.base_quantize_worker", spec, timeout=3600)
                       for name, spec in quality_configs(quick, data).items()}
        rows = []
        for name, result in quality.items():
            base_name = name.rsplit(", ", 1)[0] + ", none base"
            reference = quality[base_name].get("val_loss")
            loss = result.get("val_loss")
            change = "" if loss is None or reference is None else f"{loss / reference - 1:+.2%}"
            rows.append([name.replace("none base", "fp32 base"), "-" if loss is None else f"{loss:.4f}", change,
                         f"{result.get('seconds', float('nan')):.0f}", result.get("error", "")[:60]])
        print_table("LoRA r16 on the chapter's data, final validation loss by base (target: int8 within 1%, int4 within 3%)",
                    ["model, base", "val loss", "vs fp32 base", "training s", ""], rows)
        results["quality"] = quality
    return results
