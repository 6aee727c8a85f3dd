"""Determinism and exact resume at the size users run: short LoRA fine-tunes of the real
embedded Gemma 3 270M (the tiny-model tests show the same on random weights)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from .conftest import kill_at_checkpoint, run_cli

pytestmark = pytest.mark.slow


def _args(data, out):
    return ["finetune", "--model", "gemma-3-270m", "--data", str(data), "--out", str(out), "--lora-rank", "8",
            "--max-steps", "4", "--save-every", "1", "--eval-every", "4", "--eval-batches", "1", "--no-sample",
            "--threads", "2"]


def _weights(run):
    return load_file(str(run / "adapter.safetensors")), load_file(str(run / "model.safetensors"))


def _assert_identical(first, second):
    for a, b in zip(_weights(first), _weights(second)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_same_seed_same_weights_and_a_killed_run_resumes_to_them(chapter_data_path, tmp_path):
    first, second, killed = tmp_path / "a", tmp_path / "b", tmp_path / "killed"
    for run in (first, second):
        result = run_cli(*_args(chapter_data_path, run))
        assert result.returncode == 0, result.stderr[-2000:]
    _assert_identical(first, second)
    losses = [[row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if row["kind"] == "step"] for run in (first, second)]
    assert losses[0] == losses[1] and len(losses[0]) == 4

    kill_at_checkpoint(_args(chapter_data_path, killed), killed, 2, timeout=600)
    resumed = run_cli("finetune", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_identical(first, killed)
