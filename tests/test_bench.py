"""The benchmark harness itself, on tiny models (--quick): it runs and its output has the expected
shape. It checks no speed: speed claims live in bench/ and docs/BENCHMARKS.md, not in tests."""

import json
import subprocess
import sys

from .conftest import REPO


def test_quick_bench_runs_and_reports(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "peak", "train", "generate", "--quick", "--repeats", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for title in ("fp32 matmul peak", "Training throughput", "Ratios", "generation, batch 1", "test prompts, greedy"):
        assert title in out, title
    path = out.strip().splitlines()[-1].split("Raw results: ")[1]
    saved = json.loads(open(path).read())
    try:
        assert saved["quick"] is True and saved["peak"]["gflops"] > 0
        summary = saved["train"]["summary"]
        assert summary["gpt2: ours"]["real_tok_s"] > 0 and summary["gpt2: chapter loop (naive)"]["real_tok_s"] > 0
        assert "gpt2 ours / chapter loop (steps)" in saved["train"]["ratios"]
        assert saved["generate"]["cache"]["speedup"] > 0 and saved["generate"]["test_set"]["ours"]["tokens"] > 0
        assert "cpu_model" in saved["machine"] or saved["machine"]["cpus"] >= 1
    finally:
        import os

        os.remove(path)  # quick results are not kept
