"""The benchmark harness itself, on tiny models (--quick): it runs and its output has the expected
shape. It checks no speed: speed claims live in bench/ and docs/BENCHMARKS.md, not in tests."""

import json
import subprocess
import sys

from instructkit.decode import native

from .conftest import REPO


def _quick_suite(*args: str) -> tuple[str, dict]:
    """Run `python -m bench ARGS --quick`; its printed output and its saved results (the results
    file is removed: quick numbers are not kept)."""
    import os

    result = subprocess.run([sys.executable, "-m", "bench", *args, "--quick"], cwd=REPO, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    path = result.stdout.strip().splitlines()[-1].split("Raw results: ")[1]
    saved = json.loads(open(path).read())
    os.remove(path)
    return result.stdout, saved


def test_quick_bench_runs_and_reports(tmp_path):
    out, saved = _quick_suite("peak", "train", "generate", "kernels", "--repeats", "1")
    for title in ("fp32 matmul peak", "Training throughput", "Ratios", "generation, batch 1", "Gemma 3 270M, greedy",
                  "Batch-1 matmul by weight format"):
        assert title in out, title
    assert saved["quick"] is True and saved["peak"]["gflops"] > 0
    summary = saved["train"]["summary"]
    assert summary["gpt2: ours, chapter recipe"]["real_tok_s"]["median"] > 0
    assert summary["gpt2: the chapter's loop"]["real_tok_s"]["median"] > 0
    ratios = {r["what"]: r for r in saved["train"]["ratios"]}
    same = ratios["gpt2-small, the chapter's recipe, incl. its evaluation"]
    assert same["same_work"] and same["met"] in ("yes", "no") and same["ratio"]["n"] == 1
    assert all(r["met"].startswith("-") for r in ratios.values() if not r["same_work"])
    assert saved["generate"]["cache"]["speedup"]["median"] > 0
    gemma = saved["generate"]["gemma"]["tok_s"]
    assert gemma["batch 1: ours"]["median"] > 0 and gemma["batched: llama.cpp, 16 parallel slots"]["median"] > 0
    kernels = saved["kernels"]["kernels"]
    exact = next(row for name, row in kernels.items() if name.endswith("fp32 x @ W.T (exact)"))
    assert exact["max_rel_error"] == 0 and exact["weight_gb_per_s"]["median"] > 0
    # every kernel computes the same product as the exact one, within its format's rounding
    assert all(row["max_rel_error"] < 0.2 and row["ms"]["median"] > 0 for row in kernels.values()), kernels
    assert any("inductor" in name for name in kernels)
    layouts = saved["kernels"]["streams"]["layouts"]  # one token's products: apart / stacked, 4 KB / 2 MB pages
    assert {"apart, 4 KB pages", "stacked, 4 KB pages"} <= set(layouts) and all(r["ms"]["median"] > 0 for r in layouts.values())
    prefills = saved["kernels"]["prefills"]  # a prefill's product: VNNI kernel against dequantized BLAS
    assert bool(prefills) == bool(native.available() and native.int8_block_rows())
    assert all(r["kernel_ms"]["median"] > 0 and r["blas_ms"]["median"] > 0 for r in prefills.values())
    assert "torch" in saved["versions"] and ("cpu_model" in saved["machine"] or saved["machine"]["cpus"] >= 1)


def test_quick_dpo_suite_reports_step_times_and_accuracy():
    """The dpo suite end to end on a tiny model: short runs with and without --precompute-ref, one
    DPO run, the held-out evaluation."""
    _, saved = _quick_suite("dpo")
    dpo = saved["dpo"]
    assert dpo["two_models"]["step_seconds"] > 0 and dpo["precomputed"]["step_seconds"] > 0
    assert 0.0 <= dpo["evaluation"]["implicit_reward"]["dpo"]["accuracy"] <= 1.0
    assert dpo["evaluation"]["pairs"] > 0


def test_quick_decoding_suite_scores_every_candidate_on_both_splits():
    """The decoding suite end to end on a 3-step tiny model: every candidate answers the validation
    and test splits through `instructkit respond`; the choice comes from validation ranks only."""
    _, saved = _quick_suite("decoding")
    decoding = saved["decoding"]
    assert [c["beams"] for c in decoding["candidates"]] == [1, 4, 4, 8, 8]
    for candidate in decoding["candidates"]:
        for split in ("val", "test"):
            assert candidate[split]["respond_s"] > 0 and 0.0 <= candidate[split]["rouge_l"] <= 1.0
    chosen = next(c for c in decoding["candidates"] if c["name"] == decoding["chosen"])
    assert sum(chosen["ranks"]) == min(sum(c["ranks"]) for c in decoding["candidates"] if "ranks" in c)


def test_quick_recipes_suite_chooses_on_pooled_validation_responses_only():
    """The recipes suite end to end on 3-step tiny models: every candidate trains on the training
    split and on a fold of it, answers the validation split, the fold's held-out part and the test
    split; the choice is the best mean rank of the pooled validation responses, never the test's."""
    _, saved = _quick_suite("recipes")
    recipes = saved["recipes"]
    assert [c["name"] for c in recipes["candidates"]] == ["full (all but the embedding), lr 1e-4",
                                                          "LoRA r16 alpha 32, lr 5e-4"]  # --quick: one of each kind
    for candidate in recipes["candidates"]:
        assert "error" not in candidate, candidate
        assert candidate["fold_loss"] > 0 and all(0.0 <= candidate[part]["rouge_l"] <= 1.0
                                                  for part in ("val", "pooled", "test"))
    ranked = [c for c in recipes["candidates"] if "ranks" in c]
    chosen = next(c for c in ranked if c["name"] == recipes["chosen"])
    assert sum(chosen["ranks"]) == min(sum(c["ranks"]) for c in ranked)
    best_pooled_rouge = max(ranked, key=lambda c: c["pooled"]["rouge_l"])
    assert best_pooled_rouge["ranks"][0] == 1


def test_quick_base_suite_compares_bases_and_reports_their_losses():
    """The base-quantize suite on tiny-gemma3: our LoRA on fp32 / int8 / int4 bases and HF + PEFT,
    training peak RSS apart from loading, then the final validation loss by base."""
    import importlib.util

    out, saved = _quick_suite("base")
    speed = saved["base"]["speed"]["summary"]
    for name in ("ours, LoRA r16, fp32 base", "ours, LoRA r16, int8 base", "ours, LoRA r16, int4 base"):
        assert speed[name]["real_tok_s"]["median"] > 0 and speed[name]["train_peak_rss_gb"]["median"] > 0, name
    peer = "HF + TRL + PEFT, LoRA r16, fp32 base"
    if importlib.util.find_spec("trl") and importlib.util.find_spec("peft"):  # the bench extra
        assert speed[peer]["real_tok_s"]["median"] > 0
    else:  # `make test` installs the test extra only: the peer's row says what is missing
        assert "No module named" in saved["base"]["speed"]["raw"][peer][0]["error"]
    assert set(saved["base"]["speed"]["ratios"]) == {"ours, LoRA r16, fp32 base", "ours, LoRA r16, int8 base",
                                                     "ours, LoRA r16, int4 base"}
    quality = saved["base"]["quality"]
    assert all(result["val_loss"] > 0 for result in quality.values()), quality
    assert "final validation loss by base" in out
