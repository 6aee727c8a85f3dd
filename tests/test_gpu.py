"""The CUDA path, where a GPU is present: training and generation on CUDA agree with the CPU, and
bf16 autocast trains. On a CPU-only machine these skip, saying why (the CPU path is tested by
every other test, and the device plumbing on the meta device in test_distributed.py)."""

import copy

import pytest
import torch

from instructkit.data.batching import collate
from instructkit.decode.generate import generate
from instructkit.models.registry import load_model
from instructkit.train.config import TrainConfig
from instructkit.train.loop import build_optimizer, supervised_loss_sum, train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this machine (CPU-only)")]


@pytest.fixture(scope="module")
def tiny_examples(chapter_data_path):
    from instructkit.data.pipeline import encode_splits, prepare_data
    from instructkit.data.prompts import ALPACA

    loaded = load_model("tiny-gpt2", seed=5)
    examples, _ = encode_splits(prepare_data(str(chapter_data_path)), ALPACA, loaded.tokenizer, mask_instructions=True)["train"]
    return loaded, examples


def test_loss_and_one_step_on_cuda_match_the_cpu(tiny_examples):
    loaded, examples = tiny_examples
    cpu, gpu = copy.deepcopy(loaded.model).train(), copy.deepcopy(loaded.model).cuda().train()
    inputs, targets = collate(examples[:8], pad_id=loaded.tokenizer.pad_id)
    with torch.no_grad():
        a, n = supervised_loss_sum(cpu, inputs, targets)
        b, m = supervised_loss_sum(gpu, inputs.cuda(), targets.cuda())
    assert n == m and b.item() == pytest.approx(a.item(), rel=1e-4)
    config = TrainConfig(lr=1e-3)
    pad = loaded.tokenizer.pad_id
    train_step(cpu, build_optimizer(cpu, config), examples, [list(range(8))], pad_id=pad, lr=1e-3, clip=1.0)
    train_step(gpu, build_optimizer(gpu, config), examples, [list(range(8))], pad_id=pad, lr=1e-3, clip=1.0,
               device=torch.device("cuda"))
    for (name, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-4, msg=name)


def test_bf16_autocast_trains_on_cuda(tiny_examples):
    loaded, examples = tiny_examples
    model = copy.deepcopy(loaded.model).cuda().train()
    optimizer = build_optimizer(model, TrainConfig(lr=3e-3))
    losses = [train_step(model, optimizer, examples, [list(range(8))], pad_id=loaded.tokenizer.pad_id, lr=3e-3, clip=1.0,
                         device=torch.device("cuda"), precision="bf16").loss for _ in range(5)]
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0]


def test_greedy_generation_on_cuda_equals_the_cpu():
    loaded = load_model("tiny-gpt2", seed=1)
    prompts = [loaded.tokenizer.encode(text) for text in ("Hello", "The quick brown fox jumps over", "1 2 3")]
    on_cpu = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=16)
    on_gpu = generate(loaded.model.cuda(), loaded.tokenizer, prompts, max_new_tokens=16)
    assert [r.token_ids for r in on_gpu] == [r.token_ids for r in on_cpu]


def test_every_command_runs_on_cuda_in_both_precisions(chapter_data_path, shared_data, tmp_path):
    from .conftest import run_cli

    tuned = tmp_path / "ft"
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"ft-{precision}"
        result = run_cli("finetune", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--out", str(out),
                         "--max-steps", "2", "--eval-batches", "1", "--no-sample", "--device", "cuda", "--precision", precision)
        assert result.returncode == 0, result.stderr[-2000:]
        tuned = out
        result = run_cli("respond", "--run", str(out), "--split", "val", "--max-new-tokens", "4", "--device", "cuda",
                         "--precision", precision)
        assert result.returncode == 0, result.stderr[-2000:]
        result = run_cli("generate", "--model", "tiny-gpt2", "--prompt", "Hello", "--max-new-tokens", "4",
                         "--device", "cuda", "--precision", precision)
        assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli("dpo", "--run", str(tuned), "--data", str(shared_data / "instruction-data-with-preference.json"),
                     "--out", str(tmp_path / "dpo"), "--max-steps", "2", "--batch-size", "2", "--eval-batches", "1",
                     "--device", "cuda")
    assert result.returncode == 0, result.stderr[-2000:]
    refused = run_cli("generate", "--model", "tiny-gpt2", "--prompt", "Hi", "--device", "cuda", "--quantize", "int8")
    assert refused.returncode == 2 and "--quantize int8 runs on CPU kernels" in refused.stderr
