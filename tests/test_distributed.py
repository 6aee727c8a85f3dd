"""Data-parallel fine-tuning on this CPU with gloo: N processes are exact against one, resume,
fail as a whole, and shard evaluation; FSDP2 agrees with DDP. Every run is bounded by a timeout."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, kill_at_checkpoint, run_cli

TIMEOUT = 600
WORKER = str(REPO / "tests" / "dist_worker.py")


def _args(data, out, *extra):
    # The chapter's shuffled batches: examples of uneven lengths share each step, so a per-rank
    # mean differs from the mean over all tokens.
    return ["finetune", "--model", "tiny-gpt2", "--data", str(data), "--out", str(out), "--max-steps", "6",
            "--eval-every", "3", "--eval-batches", "2", "--save-every", "2", "--no-sample", "--batching", "chapter", *extra]


def _torchrun(*args, env=None, timeout=TIMEOUT):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
               WORKER, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def _step_losses(run):
    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if row["kind"] == "step"]


def _close(a, b, rtol=1e-5, atol=1e-6):
    return all(torch.allclose(a[name], b[name], rtol=rtol, atol=atol) for name in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory, chapter_data_path):
    runs = {}
    for kind, extra in (("full", []), ("lora", ["--lora-rank", "4"])):
        out = tmp_path_factory.mktemp("single") / kind
        result = run_cli(*_args(chapter_data_path, out, "--batch-size", "8", "--threads", "2", *extra), timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[kind] = out
    return runs


@pytest.mark.parametrize("kind, extra", [("full", []), ("lora", ["--lora-rank", "4"])])
def test_two_processes_with_half_the_batch_equal_one_process(single, chapter_data_path, tmp_path, kind, extra):
    out = tmp_path / "two"
    result = run_cli(*_args(chapter_data_path, out, "--batch-size", "4", "--nproc", "2", *extra), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _step_losses(out) == pytest.approx(_step_losses(single[kind]), rel=1e-5)
    assert _close(_weights(out), _weights(single[kind]))
    assert "module." not in " ".join(_weights(out))  # plain names: the run folder loads anywhere
    if kind == "full":  # the folder works with the other commands
        assert run_cli("respond", "--run", str(out), "--split", "val", "--max-new-tokens", "4").returncode == 0
        assert run_cli("export", "--run", str(out), "--format", "hf", "--out", str(tmp_path / "hf")).returncode == 0


def test_negative_control_a_per_rank_mean_loss_is_caught(single, chapter_data_path, tmp_path):
    """The anchors' bug, planted: each rank's mean loss, averaged. The comparison above fails."""
    out = tmp_path / "buggy"
    result = _torchrun(*_args(chapter_data_path, out, "--batch-size", "4"), env={"INSTRUCTKIT_TEST_PER_RANK_MEAN": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert _step_losses(out) != pytest.approx(_step_losses(single["full"]), rel=1e-5)
    assert not _close(_weights(out), _weights(single["full"]))


def test_a_killed_two_process_run_resumes_to_the_same_weights(chapter_data_path, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    args = lambda out: _args(chapter_data_path, out, "--batch-size", "4", "--nproc", "2", "--max-steps", "10")  # noqa: E731
    assert run_cli(*args(reference), timeout=TIMEOUT).returncode == 0
    kill_at_checkpoint(args(killed), killed, 4, timeout=TIMEOUT, group=True)  # the workers die with torchrun (PDEATHSIG)
    time.sleep(2)  # no worker left to write anything
    assert not (killed / "model.safetensors").exists()
    stamp = (killed / "checkpoint" / "state.json").stat().st_mtime_ns
    time.sleep(1)
    assert (killed / "checkpoint" / "state.json").stat().st_mtime_ns == stamp
    other_world = run_cli("finetune", "--resume", str(killed), timeout=TIMEOUT)
    assert other_world.returncode == 2 and "written by 2 process(es); resume it with --nproc 2" in other_world.stderr
    resumed = run_cli("finetune", "--resume", str(killed), "--nproc", "2", timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, actual = _weights(reference), _weights(killed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_distributed_evaluation_counts_every_example_once(chapter_data_path):
    env = {"INSTRUCTKIT_TEST_DATA": str(chapter_data_path)}
    two = _torchrun("eval", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, WORKER, "eval"], capture_output=True, text=True, timeout=TIMEOUT,
                         env={**os.environ, **env})
    two_result, one_result = json.loads(two.stdout.strip().splitlines()[-1]), json.loads(one.stdout.strip().splitlines()[-1])
    assert two_result["world"] == 2 and one_result["world"] == 1 and one_result["examples"] == 37  # odd-sized
    assert two_result["loss"] == pytest.approx(one_result["loss"], rel=1e-6)


def test_a_failure_on_one_rank_ends_the_run_without_a_partial_checkpoint(chapter_data_path, tmp_path):
    out = tmp_path / "failing"
    started = time.time()
    result = _torchrun(*_args(chapter_data_path, out, "--batch-size", "4"), env={"INSTRUCTKIT_TEST_FAIL": "1:3"},
                       timeout=300)
    assert result.returncode != 0 and time.time() - started < 300
    assert "injected failure on rank 1 at step 3" in result.stderr
    assert not (out / "checkpoint.tmp").exists() and not (out / "model.safetensors").exists()
    state = json.loads((out / "checkpoint" / "state.json").read_text())  # the last complete one
    assert state["step"] == 2 and state["world_size"] == 2


def test_fsdp2_one_step_equals_ddp(chapter_data_path, tmp_path):
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        result = run_cli(*_args(chapter_data_path, out, "--batch-size", "4", "--nproc", "2", "--max-steps", "1",
                                "--strategy", strategy), timeout=TIMEOUT)
        if result.returncode != 0 and strategy == "fsdp" and "NotImplementedError" in result.stderr:
            pytest.skip(f"FSDP2 cannot run on CPU with torch {torch.__version__}: {result.stderr.strip().splitlines()[-1]}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[strategy] = _weights(out)
    assert _close(runs["fsdp"], runs["ddp"])


def test_device_and_precision_options_are_checked(chapter_data_path, tmp_path):
    if not torch.cuda.is_available():
        result = run_cli(*_args(chapter_data_path, tmp_path / "a", "--device", "cuda"))
        assert result.returncode == 2 and "--device cuda: no CUDA device is available" in result.stderr
    result = run_cli(*_args(chapter_data_path, tmp_path / "b", "--device", "cpu", "--precision", "bf16"))
    assert result.returncode == 2 and "--precision bf16 runs on CUDA only" in result.stderr
    assert not (tmp_path / "b").exists()
    # The inference commands take the same options, checked the same way, before any work.
    inference = {"generate": ["--model", "tiny-gpt2", "--prompt", "Hi", "--max-new-tokens", "2"],
                 "respond": ["--model", "tiny-gpt2", "--data", str(chapter_data_path), "--split", "val",
                             "--max-new-tokens", "2", "--out", str(tmp_path / "r.json")],
                 "chat": ["--model", "tiny-gpt2", "--prompt-style", "alpaca"],
                 "serve": ["--model", "tiny-gpt2", "--prompt-style", "alpaca"],
                 "dpo": ["--model", "tiny-gpt2", "--data", "x.json", "--out", str(tmp_path / "d")]}
    for command, args in inference.items():
        bf16 = run_cli(command, *args, "--device", "cpu", "--precision", "bf16")
        assert bf16.returncode == 2 and "--precision bf16 runs on CUDA only" in bf16.stderr, command
        if not torch.cuda.is_available():
            cuda = run_cli(command, *args, "--device", "cuda")
            assert cuda.returncode == 2 and "--device cuda: no CUDA device" in cuda.stderr, command
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "d").exists()
    on_cpu = run_cli("generate", "--model", "tiny-gpt2", "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu")
    assert on_cpu.returncode == 0, on_cpu.stderr[-1000:]


def test_the_head_and_attention_run_on_the_meta_device():
    """Device plumbing without a GPU: the fused head and the attention make no tensor on a fixed
    device, so they run on meta tensors (shapes only)."""
    from instructkit.models.attention import attend
    from instructkit.train.loss import _head_loss_and_grads

    meta = torch.device("meta")
    hidden, weight = torch.empty(5, 8, device=meta), torch.empty(20, 8, device=meta)
    targets = torch.zeros(5, dtype=torch.long, device=meta)
    loss, grad, _ = _head_loss_and_grads(hidden, weight, targets, need_hidden=True, need_weight=False)
    assert loss.device == meta and grad.shape == (5, 8)
    q = torch.empty(2, 4, 3, 16, device=meta)
    kv = torch.empty(2, 2, 3, 16, device=meta)
    positions = torch.zeros(2, 3, dtype=torch.long, device=meta)
    out = attend(q, kv, kv, positions=positions, valid=None, cache=None, cache_state=None, window=None, scale=0.25,
                 default_positions=True)
    assert out.shape == (2, 4, 3, 16) and out.device == meta


@pytest.fixture(scope="module")
def sft(tmp_path_factory, chapter_data_path):
    out = tmp_path_factory.mktemp("sft") / "run"
    assert run_cli("finetune", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--out", str(out),
                   "--max-steps", "2", "--eval-batches", "1", "--no-sample").returncode == 0
    return out


@pytest.mark.parametrize("extra", [[], ["--precompute-ref", "--sft-weight", "0.5"]])
def test_dpo_on_two_processes_with_half_the_batch_equals_one_process(sft, shared_data, tmp_path, extra):
    """DPO's step is the mean over a global batch of pairs: two ranks of 2 pairs each must train
    as one process with 4 (the SFT term's token mean and the shared reference table included)."""
    prefs = shared_data / "instruction-data-with-preference.json"
    runs = {}
    for name, batch, nproc in (("one", "4", []), ("two", "2", ["--nproc", "2"])):
        out = tmp_path / name
        result = run_cli("dpo", "--run", str(sft), "--data", str(prefs), "--out", str(out), "--max-steps", "4",
                         "--batch-size", batch, "--eval-every", "2", "--eval-batches", "2", "--lr", "1e-4", *nproc, *extra,
                         timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = out
    assert _step_losses(runs["two"]) == pytest.approx(_step_losses(runs["one"]), rel=1e-5)
    evals = [[row["val_reward_margin"] for row in map(json.loads, (runs[n] / "metrics.jsonl").read_text().splitlines())
              if row["kind"] == "eval"] for n in ("one", "two")]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5, abs=1e-7)
    assert _close(_weights(runs["two"]), _weights(runs["one"]))


def test_dpo_fsdp2_equals_ddp(sft, shared_data, tmp_path):
    """DPO runs through finetune's loop, sharded weights included: the policy sharded with FSDP2
    (the frozen reference whole on each rank) trains as with DDP."""
    prefs = shared_data / "instruction-data-with-preference.json"
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        result = run_cli("dpo", "--run", str(sft), "--data", str(prefs), "--out", str(out), "--max-steps", "2",
                         "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1", "--lr", "1e-4", "--nproc", "2",
                         "--strategy", strategy, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[strategy] = out
    assert _step_losses(runs["fsdp"]) == pytest.approx(_step_losses(runs["ddp"]), rel=1e-5)
    assert _close(_weights(runs["fsdp"]), _weights(runs["ddp"]))
