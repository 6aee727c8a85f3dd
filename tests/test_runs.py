"""A run folder belongs to one request: resume and the main job never mix two runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from instructkit.data.pipeline import prepare_data
from instructkit.data.prompts import ALPACA
from instructkit.errors import UserError
from instructkit.models.registry import load_model
from instructkit.respond import respond
from instructkit.runs import RunFolder, default_run_dir

from .conftest import run_cli


def _tiny_finetune(data, out, *extra):
    return ["finetune", "--model", "tiny-gpt2", "--data", str(data), "--out", str(out), "--max-steps", "6",
            "--save-every", "2", "--eval-every", "3", "--eval-batches", "1", "--no-sample", *extra]


def test_default_run_folders_follow_the_data():
    assert default_run_dir("builtin") == "runs/builtin"
    assert default_run_dir("builtin:200:3") == "runs/builtin-200-3"
    assert default_run_dir("../shared/data/instruction-data.json") == "runs/instruction-data"
    assert default_run_dir("https://host/x/alpaca_data.json") == "runs/alpaca_data"
    assert default_run_dir("chapter7") == "runs/chapter7"
    assert default_run_dir("builtin", model="gemma-3-270m") == "runs/builtin"  # the default model
    assert default_run_dir("builtin", model="smollm2-135m-instruct") == "runs/builtin-smollm2-135m-instruct"
    assert default_run_dir("builtin", model="/models/Qwen2.5-0.5B/") == "runs/builtin-Qwen2.5-0.5B"


def test_resume_refuses_other_settings_and_changed_data(chapter_data_path, tmp_path):
    data = tmp_path / "data.json"
    shutil.copy(chapter_data_path, data)
    out = tmp_path / "R"
    process = subprocess.Popen([sys.executable, "-m", "instructkit", *_tiny_finetune(data, out, "--max-steps", "400")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint" / "state.json").exists():
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    other_lr = run_cli("finetune", "--resume", str(out), "--lr", "1e-3")
    assert other_lr.returncode == 2 and "lr: 5e-05 -> 0.001" in other_lr.stderr
    assert len(other_lr.stderr.strip().splitlines()) == 1
    records = json.loads(data.read_text())
    records[0]["output"] += " Changed."
    data.write_text(json.dumps(records))
    changed = run_cli("finetune", "--resume", str(out))
    assert changed.returncode == 2 and "data_sha256:" in changed.stderr
    assert (out / "checkpoint" / "state.json").exists()  # nothing was touched


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(chapter_data_path, tmp_path):
    out = tmp_path / "R"
    assert run_cli(*_tiny_finetune(chapter_data_path, out)).returncode == 0
    expected = (out / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "model.json", "metrics.jsonl"):
        (out / name).unlink()  # as if killed after writing its config, before any checkpoint
    again = run_cli("finetune", "--resume", str(out))
    assert again.returncode == 0, again.stderr
    assert "starting it afresh" in again.stdout + again.stderr
    assert (out / "model.safetensors").read_bytes() == expected


def test_the_main_job_refuses_a_folder_made_from_other_data(tmp_path):
    out = tmp_path / "main"
    base = ["run", "--model", "tiny-gemma3", "--max-steps", "2", "--max-new-tokens", "4", "--base-max-new-tokens", "4",
            "--out", str(out)]
    first = run_cli(*base, "--data", "builtin:150")
    assert first.returncode == 0, first.stderr
    other = run_cli(*base, "--data", "builtin:150:1")
    assert other.returncode == 2 and "holds a run with other settings" in other.stderr and "data:" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert json.loads((out / "config.json").read_text())["data"] == "builtin:150"


def test_respond_resume_matches_whole_records_and_settings(chapter_data_path, tmp_path):
    loaded = load_model("tiny-gpt2", seed=1)
    entries = prepare_data(str(chapter_data_path)).splits.test[:6]
    out = tmp_path / "r.json"
    respond(loaded, ALPACA, entries, out, max_new_tokens=3, progress=False)
    same_instruction = [dict(entries[0], output="Another reference.")] + entries[1:]
    with pytest.raises(UserError, match="row 0 holds another record"):
        respond(loaded, ALPACA, same_instruction, out, max_new_tokens=3, progress=False)
    with pytest.raises(UserError, match="made with other settings"):
        respond(loaded, ALPACA, entries, out, max_new_tokens=5, progress=False)
    assert len(respond(loaded, ALPACA, entries, out, max_new_tokens=3, progress=False)) == 6


def test_few_shot_responses_take_the_first_line(chapter_data_path, tmp_path):
    from instructkit.data.fewshot import few_shot_prompt, first_line, pick_shots

    data = prepare_data("builtin")
    entry = data.splits.test[0]
    shots = pick_shots(entry, data.splits.train, 3)
    assert len(shots) == 3 and {s["task"] for s in shots} == {entry["task"]}
    assert shots == pick_shots(entry, data.splits.train, 3) and len({s["instruction"] for s in shots}) == 3
    prompt = few_shot_prompt(ALPACA, entry, shots)
    assert prompt.endswith(ALPACA.prompt(entry)) and prompt.count("### Response:") == 4
    assert first_line("\n  Paris.\n\n### Instruction:\nmore") == "Paris."
    loaded = load_model("tiny-gpt2", seed=1)
    rows = respond(loaded, ALPACA, data.splits.test[:4], tmp_path / "b.json", max_new_tokens=12, shots=3,
                   shot_pool=data.splits.train, progress=False)
    assert all("\n" not in row["model_response"] for row in rows)


def test_run_folder_names_its_files(tmp_path):
    run = RunFolder(tmp_path)
    assert run.responses_file("val").name == "val-responses.json" and run.responses_file(base=True).name == "base-responses.json"
    assert not run.is_finished and not run.has_config()
    with pytest.raises(UserError, match="no fine-tuned model here"):
        run.require_finished()
    (tmp_path / "checkpoint").mkdir()
    for name in ("model.json", "model.safetensors", "tokenizer_ref.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(UserError, match="the run is unfinished"):
        run.require_finished()
    run.remove_checkpoints()
    assert run.is_finished
