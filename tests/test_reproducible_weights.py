"""Same seed, same data, same config: the same bytes. The sha256 of model.safetensors of a tiny
SFT run, a tiny LoRA run and a tiny DPO run, made through the real CLI, pinned to the values the
code gave before the training loop was unified (issue 34), so a refactor of the loop that changes
what any command computes fails here.

Machine dependence: the hashes depend on the float kernels torch picks for this CPU (here AVX2,
torch 2.13.0+cpu, one thread so no reduction is split differently) and on torch's version. On a
machine where they differ, record the constants again from the code before the change (`git stash`
is not needed: `git archive` the commit before the change into a second folder and run this file
there with `pytest -s`: the fixture prints the hashes it found). Two machine kinds give two sets
(below): AMD EPYC with AVX-512 (MKL takes other code paths on AMD) and the Intel / AVX2 machines the
first set came from; the AMD set was recorded on 2026-12-06 from f877c03, the commit before that
day's changes, which then gave the same three hashes.
"""

import hashlib

import pytest
import torch

from instructkit.cli import main

PINNED_BY_MACHINE = {
    "intel or avx2": {
        "sft": "1d60ca0300c5783f62870a95fe64c669a61e01566807dbefb492614dfcc865ef",
        "lora": "f31ac2ea97990813ff5c0adfd7f757dd30ad8bc55297ab61a52bb492fb99b4ed",
        "dpo": "ca880d85546d444d639e282939a403ddc3e026116a74d1054a5763b228387f3a",
    },
    "amd avx512": {
        "sft": "83ac6bf73eb4d9480aaa1abd317f8cf4bafa57e90f07533702ad25f075e4e08f",
        "lora": "ff4b0cefb96b22d6cfc860206725b500e756e5d7132b3dd1737f420863d3a54a",
        "dpo": "5411c008aa028ca262cfe58bdb42575c8d310fb4d0e988b8360caca5ab8aebc9",
    },
}


def _machine_kind() -> str:
    try:
        info = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return "intel or avx2"
    return "amd avx512" if "AuthenticAMD" in info and " avx512f" in info else "intel or avx2"


PINNED = PINNED_BY_MACHINE[_machine_kind()]

# One thread: a matmul split over threads may sum in another order on another machine.
COMMON = ["--threads", "1", "--seed", "7", "--eval-batches", "1", "--save-every", "2"]
SFT = ["finetune", "--model", "tiny-gpt2", "--max-steps", "6", "--eval-every", "3", "--batch-size", "4",
       "--grad-accum", "2", "--schedule", "cosine", "--warmup", "2", "--clip", "1.0", "--no-sample", *COMMON]
LORA = ["finetune", "--model", "tiny-gpt2", "--max-steps", "4", "--eval-every", "2", "--lora-rank", "4",
        "--mask-instructions", "--no-sample", *COMMON]
DPO = ["dpo", "--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--sft-weight", "0.5", "--warmup", "1",
       "--clip", "1.0", "--lr", "1e-4", *COMMON]


def _sha256(run) -> str:
    return hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hashes(tmp_path_factory, chapter_data_path, shared_data):
    threads = torch.get_num_threads()  # the runs set one thread in this process: put it back after
    root = tmp_path_factory.mktemp("pinned")
    try:
        assert main([*SFT, "--data", str(chapter_data_path), "--out", str(root / "sft")]) == 0
        assert main([*LORA, "--data", str(chapter_data_path), "--out", str(root / "lora")]) == 0
        prefs = shared_data / "instruction-data-with-preference.json"
        assert main([*DPO, "--run", str(root / "sft"), "--data", str(prefs), "--out", str(root / "dpo")]) == 0
    finally:
        torch.set_num_threads(threads)
    found = {name: _sha256(root / name) for name in PINNED}
    print("pinned:", found)
    return found


@pytest.mark.parametrize("name", sorted(PINNED))
def test_weights_are_byte_identical_to_the_pinned_run(hashes, name):
    assert hashes[name] == PINNED[name]
