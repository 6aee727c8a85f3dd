"""Metrics loggers: the one loop's rows reach TensorBoard event files, W&B's offline run file and
an MLflow store on disk, with the same numbers as metrics.jsonl; a logger that is missing or
unknown is refused in one line before anything is written."""

import json
import os
import sys
from pathlib import Path

import pytest

from .conftest import require_module, run_cli


def _args(data, out, *extra):
    return ["finetune", "--model", "tiny-gpt2", "--data", str(data), "--out", str(out), "--max-steps", "4",
            "--eval-every", "2", "--eval-batches", "1", "--threads", "2", "--no-sample", *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(out):
    """(step, value) series the loggers must hold, from metrics.jsonl."""
    rows = _rows(out)
    steps, evals = [r for r in rows if r["kind"] == "step"], [r for r in rows if r["kind"] == "eval"]
    return {"train/loss": [(r["step"], r["loss"]) for r in steps], "train/lr": [(r["step"], r["lr"]) for r in steps],
            "train/tokens_per_s": [(r["step"], r["real_tokens"] / r["seconds"]) for r in steps],
            "eval/val_loss": [(r["step"], r["val_loss"]) for r in evals],
            "eval/train_loss": [(r["step"], r["train_loss"]) for r in evals]}


def _assert_series(found: dict, expected: dict) -> None:
    for name, series in expected.items():
        assert [step for step, _ in found[name]] == [step for step, _ in series], name
        assert [value for _, value in found[name]] == pytest.approx([value for _, value in series], rel=1e-6), name


def test_tensorboard_event_files_hold_loss_lr_tokens_per_s_and_validation(chapter_data_path, tmp_path):
    require_module("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "runs" / "tb"
    result = run_cli(*_args(chapter_data_path, out, "--log", "tensorboard"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(out.glob("events.out.tfevents.*")), "no event file in the run folder"
    events = EventAccumulator(str(out))
    events.Reload()
    found = {name: [(e.step, e.value) for e in events.Scalars(name)] for name in events.Tags()["scalars"]}
    _assert_series(found, _expected(out))


def test_dpo_logs_through_the_same_loop(chapter_data_path, shared_data, tmp_path):
    require_module("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sft = tmp_path / "sft"
    assert run_cli(*_args(chapter_data_path, sft, "--max-steps", "2")).returncode == 0
    out = tmp_path / "dpo"
    result = run_cli("dpo", "--run", str(sft), "--data", str(shared_data / "instruction-data-with-preference.json"),
                     "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--eval-every", "1", "--eval-batches", "1",
                     "--threads", "2", "--log", "tensorboard")
    assert result.returncode == 0, result.stderr[-2000:]
    events = EventAccumulator(str(out))
    events.Reload()
    evals = [r for r in _rows(out) if r["kind"] == "eval"]
    margins = [(e.step, e.value) for e in events.Scalars("eval/val_reward_margin")]
    assert [s for s, _ in margins] == [0, 1, 2]
    assert [v for _, v in margins] == pytest.approx([r["val_reward_margin"] for r in evals], rel=1e-5, abs=1e-7)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def _wandb_history(path: Path) -> list[dict]:
    """The history records of a W&B offline run file (a LevelDB-style log of protobuf records
    after a 7-byte header, in 32 KiB blocks), read apart from wandb's own code."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.HasField("history"):
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(chapter_data_path, tmp_path):
    require_module("wandb")
    out = tmp_path / "wb"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    import subprocess

    result = subprocess.run([sys.executable, "-m", "instructkit", *_args(chapter_data_path, out, "--log", "wandb")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    found: dict = {}
    for row in _wandb_history(run_file):
        for name, value in row.items():
            found.setdefault(name, []).append((row["_step"], value))
    _assert_series(found, _expected(out))


def test_mlflow_store_in_the_run_folder_holds_the_metrics(chapter_data_path, tmp_path, monkeypatch):
    require_module("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "ml"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_cli(*_args(chapter_data_path, out, "--log", "mlflow"))
    assert result.returncode == 0, result.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{out.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs(experiment_ids=["0"])
    assert run.info.run_name == "ml" and run.data.params["lr"] == "5e-05"
    found = {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
             for name in _expected(out)}
    _assert_series(found, _expected(out))


def test_unknown_or_missing_logger_is_one_line_and_writes_nothing(chapter_data_path, tmp_path, monkeypatch, capsys):
    from instructkit.cli import main

    result = run_cli(*_args(chapter_data_path, tmp_path / "a", "--log", "tensorboard,neptune"))
    assert result.returncode == 2 and "--log must name some of jsonl, tensorboard, wandb, mlflow, got 'neptune'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec gives None
    assert main(_args(chapter_data_path, tmp_path / "b", "--log", "wandb")) == 2
    error = capsys.readouterr().err
    assert "--log wandb: the wandb package is not installed (pip install wandb)" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_a_resumed_run_logs_each_step_once_to_tensorboard(chapter_data_path, tmp_path):
    """Killed after its checkpoint at step 4 (and perhaps a few steps on), resumed: TensorBoard
    shows every step once, with the numbers of metrics.jsonl (the events after the checkpoint
    that the killed process wrote are purged)."""
    require_module("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from .conftest import kill_at_checkpoint

    out = tmp_path / "killed"
    args = _args(chapter_data_path, out, "--max-steps", "12", "--save-every", "4", "--log", "tensorboard")
    kill_at_checkpoint(args, out, 4)
    resumed = run_cli("finetune", "--resume", str(out), "--log", "tensorboard")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    _assert_series({name: [(e.step, e.value) for e in events.Scalars(name)] for name in ("train/loss", "eval/val_loss")},
                   {name: series for name, series in _expected(out).items() if name in ("train/loss", "eval/val_loss")})
