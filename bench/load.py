"""Load times of the default model: first load (assemble the GGUF, dequantize, convert, cache)
into an empty cache folder, then cached loads. Then the memory of loading a Hugging Face folder
of a 1.5B-parameter shape (Qwen2.5-1.5B's config, bf16 weights in two shards as on the Hub; the
values are zeros: memory and time do not depend on them): peak RSS against the model's fp32 size
(the loader streams tensors in one at a time, so it should stay near 1x, never 1.5x). Then the
whole commands a user runs on such a model (random N(0, 0.02) values: quantizing all-zero groups
would be degenerate), each a fresh process and its peak RSS: decoding with --quantize int8 /
int4, export to HF and GGUF f16 / q8_0, and a LoRA fine-tune on an int8 / int4 base (load, one
step, evaluation, the merged model saved): none may hold a second full-precision copy.

    python -m bench load [--quick] [--only memory]"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from bench.common import print_table, write_hf_folder

# Prints the load_model call's seconds, then the whole process's (imports of torch etc. included).
SNIPPET = ("import time; t0=time.perf_counter(); from instructkit.models.registry import load_model; "
           "t1=time.perf_counter(); load_model('gemma-3-270m'); t2=time.perf_counter(); print(t2-t1, t2-t0)")


def _timed_load(cache: str) -> tuple[float, float]:
    env = {**os.environ, "INSTRUCTKIT_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    load, total = out.stdout.strip().splitlines()[-1].split()
    return float(load), float(total)


LOAD_FOLDER = ("import resource, sys, time; t = time.perf_counter(); from instructkit.models.registry import load_model; "
               "m = load_model(sys.argv[1]); n = sum(p.numel() for p in m.model.parameters()); "
               "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t)")


def folder_memory(repeats: int) -> dict:
    """Peak RSS / fp32 size and seconds of loading the 1.5B-shape bf16 folder, each in a fresh process."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_hf_folder(folder, "qwen2.5-1.5b", values="zeros")
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", LOAD_FOLDER, folder], capture_output=True, text=True, check=True)
            params, peak, seconds = out.stdout.strip().splitlines()[-1].split()
            rows.append({"params": int(params), "peak_rss_gb": int(peak) / 1e9, "ratio": int(peak) / (4 * int(params)),
                         "seconds": float(seconds)})
    print_table("Loading a 1.5B-parameter HF folder (Qwen2.5-1.5B shape, bf16, 2 shards; weights all zero)",
                ["repeat", "parameters", "peak RSS GB", "peak RSS / fp32 size", "seconds"],
                [[i + 1, f"{r['params'] / 1e9:.3f}B", f"{r['peak_rss_gb']:.2f}", f"{r['ratio']:.3f}", f"{r['seconds']:.1f}"]
                 for i, r in enumerate(rows)])
    return {"folder_1_5b": rows}


# Runs one `instructkit` command line in this process, then prints its peak RSS (VmHWM) in bytes.
COMMAND = ("import sys; from instructkit.cli import main; code = main(sys.argv[1:]); "
           "from bench.common import peak_rss_bytes; print('PEAK', peak_rss_bytes(), code or 0)")


def command_memory(repeats: int) -> dict:
    """Peak RSS of whole commands on the 1.5B-shape bf16 folder, median (min-max) of `repeats`."""
    import shutil

    from bench.common import DATA, fmt_spread, spread

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        model = write_hf_folder(f"{folder}/model", "qwen2.5-1.5b", values="random")
        commands = {
            "generate --quantize int8 (load, quantize, 4 tokens)":
                ["generate", "--model", str(model), "--prompt", "Hello", "--max-new-tokens", "4", "--quantize", "int8", "--no-compile"],
            "generate --quantize int4 (load, quantize, 4 tokens)":
                ["generate", "--model", str(model), "--prompt", "Hello", "--max-new-tokens", "4", "--quantize", "int4", "--no-compile"],
            "export --format hf": ["export", "--model", str(model), "--format", "hf", "--out", f"{folder}/hf", "--force"],
            "export --format gguf --quant f16": ["export", "--model", str(model), "--format", "gguf", "--quant", "f16",
                                                 "--out", f"{folder}/gguf", "--force"],
            "export --format gguf --quant q8_0": ["export", "--model", str(model), "--format", "gguf", "--quant", "q8_0",
                                                  "--out", f"{folder}/gguf", "--force"],
            **{f"finetune --lora-rank 16 --base-quantize {base} (1 step, eval, save)":
               ["finetune", "--model", str(model), "--data", DATA, "--prompt-style", "chatml", "--lora-rank", "16",
                "--base-quantize", base, "--max-steps", "1", "--batch-size", "2", "--eval-every", "1",
                "--eval-batches", "1", "--no-sample-prompt", "--out", f"{folder}/run-{base}"] for base in ("int8", "int4")},
        }
        for _ in range(repeats):
            for name, argv in commands.items():
                for base in ("int8", "int4"):  # finetune refuses an --out that holds a run
                    shutil.rmtree(f"{folder}/run-{base}", ignore_errors=True)
                out = subprocess.run([sys.executable, "-c", COMMAND, *argv], capture_output=True, text=True)
                lines = [line for line in out.stdout.splitlines() if line.startswith("PEAK ")]
                if out.returncode != 0 or not lines or lines[-1].split()[2] != "0":
                    raise RuntimeError(f"{name}: failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
                results.setdefault(name, []).append(int(lines[-1].split()[1]) / 1e9)
    summary = {name: spread(values) for name, values in results.items()}
    print_table(f"Whole commands on the 1.5B shape (random bf16 weights, fp32 size 6.2 GB): peak RSS GB, "
                f"median (min-max) of {repeats}", ["command", "peak RSS GB"],
                [[name, fmt_spread(value, "{:.2f}")] for name, value in summary.items()])
    return {"commands_1_5b": {"summary": summary, "raw": results}}


def run(quick: bool = False, repeats: int | None = None, only: str | None = None) -> dict:
    if only == "memory":
        return command_memory(repeats or 3)
    with tempfile.TemporaryDirectory() as cache:
        first = _timed_load(cache)
        cached = [_timed_load(cache) for _ in range(2 if quick else 3)]
    print_table("Default model load, each in a fresh process (seconds)",
                ["load", "load_model()", "process incl. imports"],
                [["first (convert and cache)", *first]] + [[f"cached #{i + 1}", *t] for i, t in enumerate(cached)])
    if quick:
        return {"first_s": first, "cached_s": cached}
    return {"first_s": first, "cached_s": cached, **folder_memory(3), **command_memory(repeats or 3)}
