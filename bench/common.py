"""Shared benchmark plumbing: machine facts, timing, tables, result files, worker processes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# The chapter's data when it sits beside the repo (as for CI), else the built-in dataset.
CHAPTER = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data.json"
BOOK = CHAPTER.with_name("instruction-data-with-response.json")  # the book's gpt2-medium test responses
DATA = str(CHAPTER) if CHAPTER.exists() else "builtin"


QUICK_RECORDS = 200  # --quick's data: the first 200 records of a file (splits of 170, 20 and 10)


def quick_data_file(source: Path, folder: Path, count: int = QUICK_RECORDS) -> Path:
    """For --quick: the first `count` records of the data file `source`, in a file of its own in
    `folder`, split by the same rules as the whole file. A quick run checks the harness, not the
    numbers, and every split a command trains on, scores or answers costs in proportion to it."""
    path = folder / f"quick-{source.name}"
    path.write_text(json.dumps(json.loads(source.read_text())[:count]))
    return path


def machine_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
    }
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def versions() -> dict:
    """Versions of everything a measurement may depend on (absent packages are left out)."""
    from importlib import metadata

    found = {}
    for name in ("torch", "numpy", "transformers", "trl", "accelerate", "llama_cpp_python", "gguf", "fastapi", "uvicorn"):
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return found


def spread(values: list[float]) -> dict:
    """Median with min and max: how every repeated number is reported."""
    import statistics

    values = [v for v in values if v == v]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_spread(s: dict, fmt: str = "{:.2f}", suffix: str = "") -> str:
    if not s["n"]:
        return "-"
    return f"{fmt.format(s['median'])}{suffix} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in header]] + [[f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def save_results(suite: str, payload: dict) -> Path:
    from instructkit.fileio import atomic_write_json

    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = RESULTS / f"{suite}-{stamp}.json"
    atomic_write_json(path, {"suite": suite, "machine": machine_info(), "versions": versions(), **payload}, indent=2)
    return path


def run_worker(module: str, spec: dict, timeout: float = 3600) -> dict:
    """Run one measurement in a fresh process (so peak RSS is its own); it prints one JSON line."""
    result = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True,
                            timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1], **spec}
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's own peak RSS. On Linux, VmHWM: getrusage's ru_maxrss survives exec, so a
    worker started from a bench process that already holds 2 GB reports at least those 2 GB."""
    from pathlib import Path

    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start VmHWM over from the present resident set (Linux: /proc/self/clear_refs "5"), so a
    later peak_rss_bytes() is the peak of what follows (training, apart from loading the model)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def cli_seconds(*args: str) -> float:
    """Run `python -m instructkit ARGS` from the repo; its wall seconds, or RuntimeError with its last error line."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "instructkit", *args], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise RuntimeError((result.stderr.strip().splitlines() or ["failed"])[-1])
    return time.perf_counter() - started


def chapter_response_budget() -> int:
    """The main job's response budget on the chapter's data (twice its longest training response)."""
    from instructkit.data.pipeline import prepare_data
    from instructkit.main_job import response_budget
    from instructkit.models.registry import load_model

    return response_budget(prepare_data(str(CHAPTER)).splits.train, load_model("tiny-gemma3").tokenizer)


def score_responses(*paths: Path) -> dict:
    """ROUGE-L, chrF, BLEU and words per response of the responses files taken together."""
    from instructkit.evaluate.metrics import summarize

    entries = [entry for path in paths for entry in json.loads(path.read_text())]
    summary, _ = summarize([e["model_response"] for e in entries], [e["output"] for e in entries])
    return {name: summary[name] for name in ("rouge_l", "chrf", "bleu", "response_words_mean")}


# A Hugging Face folder of a preset's shape as the Hub ships such models: bf16, two shards with an
# index, config.json, SmolLM2's tokenizer (its ids fit every preset's vocabulary). Written in a
# process of its own, so the writer's memory never counts in a measurement.
_WRITE_FOLDER = """
import json, shutil, sys, torch
from safetensors.torch import save_file
from instructkit.models.families import FAMILIES, family_of
from instructkit.models.registry import smollm2_folder
from instructkit.models.transformer import Transformer
folder, preset, values = sys.argv[1:4]
config = next(f.presets[preset] for f in FAMILIES.values() if preset in f.presets)
with torch.device("meta"):
    model = Transformer(config)
generator = torch.Generator().manual_seed(0)
def value(shape):
    if values == "zeros":
        return torch.zeros(shape, dtype=torch.bfloat16)
    if len(shape) == 1:  # norms near 1, biases near 0: a trained model's scale
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).bfloat16()
state = {n: value(tuple(t.shape)) for n, t in model.state_dict().items() if n != "lm_head.weight"}
names = sorted(state)
shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
          "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
for file, keys in shards.items():
    save_file({k: state[k] for k in keys}, f"{folder}/{file}", metadata={"format": "pt"})
json.dump({"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}},
          open(f"{folder}/model.safetensors.index.json", "w"))
json.dump(family_of(config.family).hf_config(config), open(f"{folder}/config.json", "w"))
shutil.copy(smollm2_folder() / "tokenizer.json", f"{folder}/tokenizer.json")
json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, open(f"{folder}/tokenizer_config.json", "w"))
"""


def write_hf_folder(folder: str | Path, preset: str, values: str = "random") -> Path:
    """`values`: "zeros" (memory and load time do not depend on them) or "random" (N(0, 0.02)
    matrices, ones for vectors: quantizing all-zero groups would be a degenerate case)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", _WRITE_FOLDER, str(folder), preset, values], check=True)
    return Path(folder)
