"""Responses in the chapter's format, resumable; offline metrics, checks and the report."""

import json
import signal
import subprocess
import sys
import time

import pytest

from instructkit.evaluate.checks import passes, score_checks
from instructkit.evaluate.metrics import normalize, rouge_l, summarize

from .conftest import run_cli


def test_respond_writes_the_chapter_format_and_resumes(chapter_data_path, tmp_path):
    out = tmp_path / "responses.json"
    args = ["respond", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--split", "test",
            "--out", str(out), "--max-new-tokens", "40", "--batch-size", "8"]
    process = subprocess.Popen([sys.executable, "-m", "instructkit", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl = out.with_suffix(".jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 16):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = jsonl.read_text().splitlines()
    assert 16 <= len(before) < 110 and not out.exists(), "the run was not killed partway"

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    after = jsonl.read_text().splitlines()
    assert after[: len(before)] == before and len(after) == 110  # kept, then only the rest
    responses = json.loads(out.read_text())
    reference = json.loads((chapter_data_path.parent / "instruction-data-with-response.json").read_text())
    assert [r["instruction"] for r in responses] == [r["instruction"] for r in reference]
    assert set(responses[0]) == {"instruction", "input", "output", "model_response"}
    assert out.read_text().startswith('[\n    {\n        "instruction"')  # indent 4, as the chapter writes
    assert all(isinstance(r["model_response"], str) for r in responses)


def test_metrics_on_known_values():
    assert normalize("The Cat, sat!") == "cat sat"
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("cat sat on mat", "cat on the mat") == pytest.approx(2 * (3 / 4) * (3 / 3) / (3 / 4 + 3 / 3))
    summary, entries = summarize(["Paris.", "blue"], ["Paris.", "Red"])
    assert summary["exact_match"] == 0.5 and entries[0].exact and not entries[1].normalized
    assert summary["chrf"] > 0 and 0 <= summary["bleu"] <= 100


def test_checks_score_exactly():
    assert passes({"type": "exact", "answer": "DOG"}, "dog.")
    assert passes({"type": "number", "answer": 12.5, "tolerance": 0.01}, "The answer is 12.5 km")
    assert not passes({"type": "number", "answer": 12.5}, "13")
    shown_working = {"type": "number", "answer": 7, "take": "last"}
    assert passes(shown_working, "4 + 3 = 7") and not passes(shown_working, "7 + 3 = 10")
    assert passes({"type": "number", "answer": 6}, "6 - 1 = 5") and not passes({"type": "number", "answer": 5}, "6 - 1 = 5")
    assert passes({"type": "set", "answer": ["a", "b"]}, "b, a")
    assert passes({"type": "json", "answer": {"x": 1}}, '{"x": 1}') and not passes({"type": "json", "answer": {"x": 1}}, "x=1")
    entries = [{"instruction": str(i), "task": "t1" if i < 3 else "t2", "check": {"type": "exact", "answer": "y"},
                "model_response": "y" if i % 2 == 0 else "n"} for i in range(5)]
    checks = score_checks(entries)
    assert checks["accuracy"] == pytest.approx(0.6) and checks["families"]["t1"]["accuracy"] == pytest.approx(2 / 3)
    assert len(checks["failures"]) == 2


def test_evaluate_offline_on_the_chapter_responses(chapter_data_path, tmp_path):
    responses = chapter_data_path.parent / "instruction-data-with-response.json"
    result = run_cli("evaluate", "--responses", str(responses), "--baseline", str(responses), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["metrics"]["entries"] == 110 and evaluation["metrics"] == evaluation["baseline"]["metrics"]
    assert 0 < evaluation["metrics"]["rouge_l"] < 1 and len(evaluation["entries"]) == 110
    report = (tmp_path / "report.md").read_text()
    assert "| rouge_l |" in report and "base model" in report
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "http" not in html.split("<body>")[1].split("Responses")[0]


def test_evaluate_bad_responses_file_is_one_line(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    result = run_cli("evaluate", "--responses", str(bad))
    assert result.returncode == 2 and "record 0: missing or non-string 'model_response'" in result.stderr


def test_the_main_job_takes_each_datasets_recipe_and_explicit_settings_over_it(chapter_data_path, tmp_path):
    """The per-dataset recipes (src/instructkit/recipes/builtin.yaml and chapter.yaml): full fine-tuning
    and greedy responses on the built-in data, LoRA and beam search on the chapter's; an explicit
    setting wins over the recipe."""
    from instructkit.main_job import MainJob

    builtin = MainJob(train={"data": "builtin:150", "out": "x"}).recipe()
    assert (builtin.epochs, builtin.lora_rank, builtin.lr) == (3, 0, 1e-4) and MainJob().chosen_beams() == 1
    chapter = MainJob(train={"data": str(chapter_data_path), "out": "x"})
    assert (chapter.recipe().epochs, chapter.recipe().lora_rank, chapter.recipe().lora_alpha) == (2, 16, 32.0)
    assert chapter.chosen_beams() == 4 and chapter.recipe().lr == 5e-4 and chapter.recipe().freeze_embedding
    full = MainJob(train={"data": str(chapter_data_path), "out": "x", "lora_rank": 0, "epochs": 3}, beams=1)
    assert (full.recipe().lora_rank, full.recipe().lr, full.recipe().epochs, full.chosen_beams()) == (0, 1e-4, 3, 1)
    assert MainJob(train={"data": str(chapter_data_path), "lr": 2e-5}).recipe().lr == 2e-5  # an explicit lr wins
    refused = run_cli("run", "--data", str(chapter_data_path), "--lora-rank", "-1", "--out", str(tmp_path / "r"))
    assert refused.returncode == 2 and not (tmp_path / "r").exists()
    # TrainConfig.validate() says it, the one place that checks a training setting.
    assert refused.stderr.strip() == "instructkit: error: --weight-decay, --warmup and --lora-rank cannot be negative"


def test_main_job_end_to_end_on_a_tiny_model(tmp_path):
    """`instructkit run` (the README's main command) with a tiny random Gemma 3 and a small
    built-in dataset: fine-tune, respond with the tuned and the base model, evaluate, report."""
    out = tmp_path / "main"
    args = ("run", "--model", "tiny-gemma3", "--data", "builtin:150", "--max-steps", "4", "--max-new-tokens", "6",
            "--base-max-new-tokens", "6", "--out", str(out))
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "loss-plot.png", "loss-plot.pdf",
                 "test-responses.json", "base-responses.json", "evaluation.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint").exists() and "Wall time:" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["mask_instructions"] and config["freeze_embedding"] and config["schedule"] == "cosine"
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation["checks"]["families"]) == {r["task"] for r in json.loads((out / "test-responses.json").read_text())}
    assert "accuracy per task family" in (out / "report.md").read_text()
    again = run_cli(*args)  # a rerun keeps the finished training and redoes only the cheap stages
    assert again.returncode == 0 and "training already finished" in again.stdout


def test_respond_resume_refuses_other_weights_quantization_or_precision(chapter_data_path, tmp_path):
    """A kill under --quantize fp16 resumed under exact weights mixed the two silently: the rows'
    settings now record how the weights decoded."""
    import torch

    from instructkit.data.pipeline import prepare_data
    from instructkit.data.prompts import ALPACA
    from instructkit.errors import UserError
    from instructkit.models.registry import load_model
    from instructkit.respond import respond

    out = tmp_path / "responses.json"
    args = ["respond", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--split", "val", "--out", str(out),
            "--max-new-tokens", "2"]
    assert run_cli(*args, "--quantize", "fp16").returncode == 0
    rows = out.with_suffix(".jsonl").read_text()
    assert json.loads(rows.splitlines()[0])["settings"]["quantize"] == "fp16"
    other = run_cli(*args)  # --quantize none (the default)
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1 and "made with other settings (quantize: fp16 -> none)" in lines[0], other.stderr
    assert out.with_suffix(".jsonl").read_text() == rows  # nothing touched
    assert run_cli(*args, "--quantize", "fp16").returncode == 0  # the same settings resume

    entries = prepare_data(str(chapter_data_path)).splits.val[:3]
    exact = tmp_path / "exact.json"
    respond(load_model("tiny-gpt2", seed=1), ALPACA, entries, exact, max_new_tokens=2, progress=False)
    bf16 = load_model("tiny-gpt2", seed=1)
    bf16.model.to(torch.bfloat16)
    with pytest.raises(UserError, match=r"made with other settings \(precision: fp32 -> bf16\)"):
        respond(bf16, ALPACA, entries, exact, max_new_tokens=2, progress=False)
