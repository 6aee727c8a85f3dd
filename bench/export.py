"""Export of Gemma 3 270M to each format: seconds (median, min-max over rounds; target <= 10 s per
format on 2 cores), file sizes, and for every GGUF quantization how close llama.cpp's next-token
logits come to our fp32 model (max |difference| and top-1 agreement over the prompts below, one of
them past the 512-token sliding window)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import fmt_spread, print_table, spread

TARGET_SECONDS = 10.0
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "1, 2, 3, 4, 5,",
           "<start_of_turn>user\nName a fruit.<end_of_turn>\n<start_of_turn>model\n", "The plural of mouse is",
           "def add(a, b):\n    return", "Monday, Tuesday, Wednesday,", "The opposite of hot is",
           "Translate to French: Good morning ->", "The largest planet in our solar system is"]


def _agreement(loaded, path: Path) -> dict:
    import llama_cpp

    from instructkit.data.pipeline import prepare_data

    long_text = " ".join(r["output"] for r in prepare_data("builtin").loaded.records[:300])
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS] + [loaded.tokenizer.encode(long_text)[:700]]
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=torch.get_num_threads(), logits_all=True, verbose=False)
    diffs, same_top = [], 0
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
        with torch.no_grad():
            ours = loaded.model(torch.tensor([ids]))[0, -1].double().numpy()
        diffs.append(float(np.abs(theirs - ours).max()))
        same_top += int(np.argmax(theirs) == np.argmax(ours))
    return {"max_abs_logit_diff": max(diffs), "top1_agreement": same_top / len(prompts), "prompts": len(prompts)}


def run(quick: bool = False, repeats: int | None = None, run_dir: str | None = None) -> dict:
    from instructkit.data.prompts import get_prompt_style
    from instructkit.export import export_model
    from instructkit.models.registry import load_model
    from instructkit.runs import RunFolder

    repeats = repeats or (1 if quick else 3)
    source = run_dir if run_dir and RunFolder(run_dir).is_finished else "gemma-3-270m"
    loaded = load_model(source)
    style = get_prompt_style("gemma")
    formats = [("hf", None), ("gguf", "f32"), ("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_k_m")]
    seconds: dict[str, list[float]] = {}
    sizes, quality = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(repeats):
            for fmt, quant in formats:
                name = f"{fmt} {quant}" if quant else fmt
                out = Path(tmp) / f"{name.replace(' ', '-')}-{round_index}"
                start = time.perf_counter()
                exported = export_model(loaded, style, fmt, out, quant=quant)
                seconds.setdefault(name, []).append(time.perf_counter() - start)
                sizes[name] = sum(p.stat().st_size for p in exported.files)
                if fmt == "gguf" and round_index == 0:
                    quality[name] = _agreement(loaded, exported.files[0])
                if round_index:
                    import shutil

                    shutil.rmtree(out)
    timing = {name: spread(values) for name, values in seconds.items()}
    rows = []
    for name, value in timing.items():
        q = quality.get(name, {})
        rows.append([name, fmt_spread(value, "{:.1f}", " s"), "yes" if value["median"] <= TARGET_SECONDS else "no",
                     f"{sizes[name] / 1e6:,.0f}", f"{q['max_abs_logit_diff']:.3f}" if q else "-",
                     f"{q['top1_agreement']:.0%}" if q else "-"])
    print_table(f"Export of {loaded.name} (median and min-max of {repeats}); target <= {TARGET_SECONDS:.0f} s per format",
                ["format", "seconds", "met", "MB", "max |logit diff| vs ours", "top-1 agreement"], rows)
    return {"source": source, "seconds": timing, "sizes": sizes, "quality": quality, "repeats": repeats}
