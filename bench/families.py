"""Families beyond Gemma, side by side with their peers.

Two models: SmolLM2-135M-Instruct (real weights, llama family) and a 1B-class shape, Llama-3.2-1B's
config with random weights (`random:llama-3.2-1b`; speed and memory do not depend on the values,
and every table says "random weights"). For each:

- batch-1 decoding, exactly `budget` new tokens a prompt (stops ignored, so both engines do the
  same work): ours fp32, `--quantize int8` eager and `--quantize int8 --compile`, against llama.cpp
  (llama-cpp-python) on a Q8_0 GGUF of the same weights written by our exporter;
- LoRA training (r16, alpha 16, the seven projections, frozen fp32 base): tokens/s and peak RSS,
  our loop (bench.train_worker).

Training against HF + TRL / PEFT on the same trainable parameters is in the train suite (SmolLM2
rows); loading a 1.5B folder is in the load suite. Every configuration runs in its own process;
rounds are interleaved and ratios taken within a round (median, min-max).

    python -m bench families [--quick] [--repeats N]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.common import DATA, fmt_spread, print_table, run_worker, spread

QUESTIONS = ["Write a short poem about the sea.", "Explain what a noun is.", "Describe a sunny day in the city."]
MODELS = {"SmolLM2-135M-Instruct": "smollm2-135m-instruct",
          "Llama-3.2-1B shape, random weights": "random:llama-3.2-1b"}


def _q8_0_gguf(model: str, folder: Path) -> str:
    """`model`'s weights as a Q8_0 GGUF written by our exporter (llama.cpp's own Q8_0 layout)."""
    from instructkit.data.prompts import CHATML
    from instructkit.export.gguf import write_gguf
    from instructkit.models.registry import load_model

    path = folder / f"{model.replace(':', '-')}-q8_0.gguf"
    write_gguf(load_model(model, seed=0), CHATML, path, "q8_0")
    return str(path)


def _prompts(quick: bool) -> tuple[list[list[int]], list[int]]:
    """Chat prompts in SmolLM2's ChatML (both models use its tokenizer) and a long prompt for TTFT."""
    from instructkit.data.prompts import CHATML
    from instructkit.models.registry import load_model

    tokenizer = load_model("smollm2-135m-instruct").tokenizer
    prompts = [tokenizer.encode(CHATML.prompt({"instruction": q})) for q in QUESTIONS[: 1 if quick else 3]]
    long_prompt = tokenizer.encode(" ".join(QUESTIONS * 40))[: 64 if quick else 500]
    return prompts, long_prompt


def run(quick: bool = False, repeats: int | None = None, only: str | None = None) -> dict:
    repeats = repeats or (1 if quick else 3)
    models = {"SmolLM2-135M-Instruct": "smollm2-135m-instruct"} if quick else MODELS
    if only:  # --only: models whose label holds one of the words
        models = {label: spec for label, spec in models.items() if any(w.lower() in label.lower() for w in only.split(","))}
    prompts, long_prompt = _prompts(quick)
    budget = 8 if quick else 64
    threads = torch.get_num_threads()
    results: dict = {"repeats": repeats, "budget": budget}
    with tempfile.TemporaryDirectory() as folder:
        configs: dict[str, tuple[str, dict]] = {}
        for label, model in models.items():
            common = {"prompts": prompts, "budget": budget, "long_prompt": long_prompt, "threads": threads, "model": model}
            decode = {"ours, fp32": {"engine": "ours", "mode": "none"},
                      "ours, --quantize int8": {"engine": "ours", "mode": "int8"},
                      "ours, --quantize int8 --compile": {"engine": "ours", "mode": "int8", "compile": True}}
            if not quick:
                decode["llama.cpp Q8_0 (our export)"] = {"engine": "llama.cpp", "gguf": _q8_0_gguf(model, Path(folder))}
            for name, spec in decode.items():
                configs[f"{label}: decode, {name}"] = ("bench.decode_worker", {**common, **spec})
            configs[f"{label}: LoRA r16 training, ours"] = ("bench.train_worker", {
                "impl": "ours", "model": model, "data": DATA, "batch": 4 if "1B" in label else 8,
                "steps": 1 if quick else 3, "warmup": 1, "eval_every": 0, "mask_instructions": True, "lora_rank": 16,
                "prompt_style": "chatml", "threads": threads})
        raw: dict[str, list[dict]] = {name: [] for name in configs}
        for _ in range(repeats):  # interleaved: every configuration once per round
            for name, (module, spec) in configs.items():
                raw[name].append(run_worker(module, spec, timeout=3600))
    results["raw"] = raw

    def values(name: str, key: str) -> list[float]:
        return [r.get(key, float("nan")) for r in raw[name]]

    rows, summary = [], {}
    for name in configs:
        errors = [r["error"] for r in raw[name] if "error" in r]
        training = "training" in name
        key = "real_tok_s" if training else "tok_s"
        rss = [r.get("peak_rss_gb", r.get("peak_rss_bytes", float("nan")) / 1e9) for r in raw[name]]
        summary[name] = {"tok_s": spread(values(name, key)), "peak_rss_gb": spread(rss),
                         **({} if training else {"ttft_s": spread(values(name, "ttft_s")),
                                                 "compile_s": spread(values(name, "compile_s"))})}
        rows.append([name, fmt_spread(summary[name]["tok_s"], "{:.1f}"),
                     "" if training else fmt_spread(summary[name]["ttft_s"], "{:.2f}"),
                     fmt_spread(summary[name]["peak_rss_gb"], "{:.2f}"), errors[0][:70] if errors else ""])
    ratios = {}
    for label in models:
        ours, peer = f"{label}: decode, ours, --quantize int8 --compile", f"{label}: decode, llama.cpp Q8_0 (our export)"
        if peer in raw:
            ratios[f"{label}: int8 --compile / llama.cpp Q8_0"] = spread(
                [a / b for a, b in zip(values(ours, "tok_s"), values(peer, "tok_s"))])
    print_table(f"Families, batch 1 ({len(prompts)} ChatML prompts x exactly {budget} new tokens; TTFT of a "
                f"{len(long_prompt)}-token prompt) and LoRA r16 training (real tokens/s); the 1B shape has random weights",
                ["configuration", "tok/s", "TTFT s", "peak RSS GB", ""],
                rows + [[k, fmt_spread(v, "{:.2f}", "x"), "", "", "target >= 1x"] for k, v in ratios.items()])
    results |= {"summary": summary, "ratios": ratios}
    return results
