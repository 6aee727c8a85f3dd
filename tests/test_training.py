"""The training loop: exact loss accounting, LoRA, kill-and-resume, and the finetune command."""

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from instructkit.data.batching import collate
from instructkit.data.pipeline import encode_splits, prepare_data
from instructkit.data.prompts import ALPACA
from instructkit.models.registry import load_model
from instructkit.train.config import TrainConfig
from instructkit.train.loop import build_optimizer, supervised_loss_sum, train_step
from instructkit.train.lora import apply_lora
from instructkit.train.loss import masked_cross_entropy

from .conftest import kill_at_checkpoint, merged_plain_model, run_cli


@pytest.fixture(scope="module")
def tiny_gpt2_examples(chapter_data_path):
    loaded = load_model("tiny-gpt2", seed=5)
    data = prepare_data(str(chapter_data_path))
    examples, _ = encode_splits(data, ALPACA, loaded.tokenizer, mask_instructions=True)["train"]
    return loaded, examples


def test_head_at_supervised_positions_equals_full_logits_loss(tiny_gpt2_examples):
    loaded, examples = tiny_gpt2_examples
    inputs, targets = collate(examples[:6], pad_id=loaded.tokenizer.pad_id)
    with torch.no_grad():
        loss_sum, count = supervised_loss_sum(loaded.model, inputs, targets)
        reference = masked_cross_entropy(loaded.model(inputs), targets)
    assert count == int((targets != -100).sum())
    assert loss_sum.item() / count == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("weight_trains", [True, False])
def test_fused_head_loss_matches_logits_and_cross_entropy(monkeypatch, weight_trains):
    """The chunked head + cross-entropy (gradients made in the forward pass) against autograd
    through full logits and F.cross_entropy, over several chunks."""
    import instructkit.train.loss as loss_module

    monkeypatch.setattr(loss_module, "LOGITS_CHUNK_ELEMENTS", 16 * 50)  # 16 rows per chunk
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(53, 12, generator=generator, requires_grad=True)
    weight = torch.randn(50, 12, generator=generator, requires_grad=weight_trains)
    targets = torch.randint(0, 50, (53,), generator=generator)
    fused = loss_module.fused_head_cross_entropy_sum(hidden, weight, targets)
    (fused * 0.37).backward()
    fused_grads = hidden.grad.clone(), (weight.grad.clone() if weight_trains else None)
    hidden.grad, weight.grad = None, None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (reference * 0.37).backward()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(fused_grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    if weight_trains:
        torch.testing.assert_close(fused_grads[1], weight.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert loss_module.fused_head_cross_entropy_sum(hidden, weight, targets).item() == pytest.approx(reference.item(), rel=1e-6)


def test_padding_does_not_change_the_loss(tiny_gpt2_examples):
    loaded, examples = tiny_gpt2_examples
    batch = examples[:5]
    with torch.no_grad():
        together, n = supervised_loss_sum(loaded.model, *collate(batch, pad_id=loaded.tokenizer.pad_id))
        alone = [supervised_loss_sum(loaded.model, *collate([e], pad_id=loaded.tokenizer.pad_id)) for e in batch]
    assert together.item() == pytest.approx(sum(s.item() for s, _ in alone), rel=1e-5)
    assert n == sum(c for _, c in alone)


def test_batch_8_equals_batch_1_with_accumulation_8(tiny_gpt2_examples):
    """Same gradients, hence the same update. Plain SGD makes the update lr * gradient; Adam's
    first step is ~lr * sign(gradient), which magnifies float noise where a gradient is ~0."""
    loaded, examples = tiny_gpt2_examples
    one, many = copy.deepcopy(loaded.model).train(), copy.deepcopy(loaded.model).train()
    pad = loaded.tokenizer.pad_id
    big = train_step(one, torch.optim.SGD(one.parameters(), lr=0.1), examples, [list(range(8))], pad_id=pad, lr=0.1, clip=1.0)
    small = train_step(many, torch.optim.SGD(many.parameters(), lr=0.1), examples, [[i] for i in range(8)], pad_id=pad, lr=0.1, clip=1.0)
    assert big.loss == pytest.approx(small.loss, rel=1e-5)
    assert big.supervised_tokens == small.supervised_tokens
    for (name, a), (_, b) in zip(one.named_parameters(), many.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    # And the step did move the weights.
    assert not torch.allclose(one.transformer.h[0].mlp.c_fc.weight, loaded.model.transformer.h[0].mlp.c_fc.weight)


def test_lora_starts_at_the_base_model_trains_only_adapters_and_merges_exactly(tiny_gpt2_examples):
    loaded, examples = tiny_gpt2_examples
    model = copy.deepcopy(loaded.model)
    inputs, targets = collate(examples[:4], pad_id=loaded.tokenizer.pad_id)
    with torch.no_grad():
        base_logits = model(inputs)
    assert apply_lora(model, ["attention", "mlp"], rank=4, alpha=8) == 4 * model.config.n_layers
    with torch.no_grad():
        assert torch.equal(model(inputs), base_logits)  # B starts at zero
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
    train_step(model, optimizer, examples, [list(range(8))], pad_id=loaded.tokenizer.pad_id, lr=1e-2, clip=None)
    with torch.no_grad():
        adapted = model(inputs)
        merged = merged_plain_model(model)(inputs)
    assert not torch.allclose(adapted, base_logits)
    assert torch.allclose(adapted, merged, atol=1e-4)


def _finetune_args(data, out, *extra):
    return ["finetune", "--model", "tiny-gpt2", "--data", str(data), "--out", str(out), "--max-steps", "24",
            "--save-every", "2", "--eval-every", "4", "--eval-batches", "2", "--threads", "2", "--lora-rank", "0",
            "--no-sample", *extra]


def test_killed_run_resumes_to_identical_weights(chapter_data_path, tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert run_cli(*_finetune_args(chapter_data_path, reference)).returncode == 0

    kill_at_checkpoint(_finetune_args(chapter_data_path, interrupted), interrupted, 8)

    resumed = run_cli("finetune", "--resume", str(interrupted))
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stderr + resumed.stdout
    expected, actual = load_file(str(reference / "model.safetensors")), load_file(str(interrupted / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == list(range(1, 25))


def test_training_processes_ask_mkl_for_repeatable_products():
    """MKL's default mode may sum a product in a different order from run to run (a resumed run
    then drifts by an ulp from the uninterrupted one); importing instructkit selects its
    reproducible mode before torch's first product, unless the user chose one."""
    code = ("import ctypes, os, torch, instructkit; torch.ones(8, 8) @ torch.ones(8, 8); "
            "lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), 'lib', 'libtorch_cpu.so')); "
            "print(os.environ['MKL_CBWR'], lib.mkl_serv_cbwr_get(-1))")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["AUTO", "2"]  # MKL_CBWR_AUTO; the default mode reads 1
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env | {"MKL_CBWR": "COMPATIBLE"}, check=True)
    assert result.stdout.split() == ["COMPATIBLE", "3"]


def test_a_run_that_cannot_fit_is_refused_before_it_starts(chapter_data_path, tmp_path):
    """The expected peak memory is printed before training; a run expected to exceed the memory it
    may use (here --memory-limit; by default what the OS has available) stops in one line naming
    what it needs and which settings lower it, having written nothing."""
    out = tmp_path / "R"
    result = run_cli(*_finetune_args(chapter_data_path, out, "--memory-limit", "0.05"))
    assert result.returncode == 2 and not out.exists()
    line = result.stderr.strip()
    assert "\n" not in line and f"{out}: needs about" in line and "--memory-limit 0.05 GB" in line
    assert "lower --batch-size or --max-length" in line and "expected peak memory" in result.stdout
    fits = run_cli(*_finetune_args(chapter_data_path, tmp_path / "S", "--max-steps", "1", "--memory-limit", "8"))
    assert fits.returncode == 0, fits.stderr


def test_finetune_command_leaves_a_complete_run_folder(chapter_data_path, tmp_path):
    out = tmp_path / "R"
    result = run_cli("finetune", "--model", "tiny-gemma3", "--data", str(chapter_data_path), "--max-steps", "10", "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "prompt_style.json", "model.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_ref.json", "metrics.jsonl", "loss-plot.png", "loss-plot.pdf"):
        assert (out / name).exists(), name
    assert not (out / "checkpoint").exists()
    assert "Ep 1 (Step 000005): Train loss" in result.stdout + result.stderr
    assert (out / "loss-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "loss-plot.pdf").read_bytes()[:5] == b"%PDF-"
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert [row["step"] for row in evals] == [0, 5, 10] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    reloaded = load_model(str(out))
    assert reloaded.model.config.family == "gemma3" and reloaded.tokenizer.encode("hi") == load_model("tiny-gemma3").tokenizer.encode("hi")


def test_finetune_refuses_to_overwrite_and_bad_resume_is_one_line(chapter_data_path, tmp_path):
    out = tmp_path / "R"
    (out).mkdir()
    (out / "config.json").write_text("{}")
    result = run_cli(*_finetune_args(chapter_data_path, out))
    assert result.returncode == 2 and "already holds a run" in result.stderr
    result = run_cli("finetune", "--resume", str(tmp_path))
    assert result.returncode == 2 and "not a fine-tuning run folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli(*_finetune_args(chapter_data_path, tmp_path / "S", "--lr", "-1"))
    assert result.returncode == 2 and "--lr must be positive" in result.stderr


def test_batch_order_is_made_for_the_effective_batch(tiny_gpt2_examples):
    """With length-grouped batches too, batch 8 and batch 1 x accumulation 8 put the same examples
    into every optimizer step."""
    from instructkit.train.loop import epoch_batches

    _, examples = tiny_gpt2_examples
    for batching in ("grouped", "chapter"):
        big = epoch_batches(examples, TrainConfig(batch_size=8, grad_accum=1, batching=batching), 0)
        small = epoch_batches(examples, TrainConfig(batch_size=1, grad_accum=8, batching=batching), 0)
        two = epoch_batches(examples, TrainConfig(batch_size=4, grad_accum=2, batching=batching), 0)
        assert big == [sum(small[i : i + 8], []) for i in range(0, len(small), 8)]
        assert big == [two[i] + two[i + 1] for i in range(0, len(two), 2)]


def test_a_step_without_supervised_tokens_is_skipped(tiny_gpt2_examples):
    from instructkit.data.tokenize import EncodedExample

    loaded, examples = tiny_gpt2_examples
    model = copy.deepcopy(loaded.model).train()
    blind = [EncodedExample(e.input_ids, [-100] * len(e.input_ids), len(e.input_ids)) for e in examples[:2]]
    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(model, build_optimizer(model, TrainConfig()), blind, [[0, 1]], pad_id=loaded.tokenizer.pad_id,
                        lr=1e-2, clip=1.0)
    assert result.skipped and result.supervised_tokens == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fused_loss_refuses_targets_outside_the_vocabulary():
    from instructkit.train.loss import fused_head_cross_entropy_sum

    hidden, weight = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 10\)"):
        fused_head_cross_entropy_sum(hidden, weight, torch.tensor([1, -100, 2]))
    with pytest.raises(ValueError):
        fused_head_cross_entropy_sum(hidden, weight, torch.tensor([1, 10, 2]))


def test_examples_longer_than_the_context_are_cut_with_a_count(chapter_data_path, tmp_path):
    """tiny-gpt2 has a 256-token context: one 2,000-word example is cut (the chapter's
    allowed_max_length), said once, and training goes on."""
    records = json.loads(chapter_data_path.read_text())
    records[3]["output"] = " ".join(["word"] * 2000)
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records))
    result = run_cli("finetune", "--model", "tiny-gpt2", "--data", str(data), "--out", str(tmp_path / "R"),
                     "--max-steps", "3", "--eval-batches", "1", "--no-sample")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Truncated 1 examples to 256 positions (the model's context)" in result.stdout + result.stderr


def test_unseeded_sampling_leaves_the_global_generator_alone(tiny_gpt2_examples):
    from instructkit.decode.generate import Sampling, generate

    loaded, _ = tiny_gpt2_examples
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    generate(loaded.model, loaded.tokenizer, [[1, 2, 3]], max_new_tokens=4, sampling=Sampling(temperature=1.0))
    assert torch.equal(torch.rand(3), expected)


def test_checkpoint_state_loads_with_weights_only(chapter_data_path, tmp_path):
    out = tmp_path / "R"
    process = subprocess.Popen([sys.executable, "-m", "instructkit", *_finetune_args(chapter_data_path, out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint" / "optimizer.pt").exists():
        time.sleep(0.05)
    process.kill()
    process.wait()
    saved = torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True)
    assert set(saved) == {"optimizer", "torch_rng", "rank_rng"} and saved["optimizer"]["state"]


def test_tied_weight_gradient_equals_the_plain_full_logits_gradient(tiny_gpt2_examples):
    """The fused head, the ordering identity on the tied weight and the sparse embedding gradient
    together give the same gradient as full logits + F.cross_entropy through autograd."""
    loaded, examples = tiny_gpt2_examples
    fused_model, plain_model = copy.deepcopy(loaded.model).train(), copy.deepcopy(loaded.model).train()
    inputs, targets = collate(examples[:6], pad_id=loaded.tokenizer.pad_id)
    loss_sum, count = supervised_loss_sum(fused_model, inputs, targets)
    (loss_sum / count).backward()
    masked_cross_entropy(plain_model(inputs), targets).backward()
    for (name, a), (_, b) in zip(fused_model.named_parameters(), plain_model.named_parameters()):
        torch.testing.assert_close(a.grad.to_dense(), b.grad.to_dense(), rtol=1e-4, atol=1e-6, msg=name)
    assert not fused_model.lm_head.weight.grad.is_sparse


def test_the_schedule_is_a_function_of_plain_numbers():
    """Warm-up to the peak, then constant or a cosine to zero at the last step (closed form)."""
    import math

    from instructkit.train.fit import lr_at

    assert [lr_at(s, 1e-3, 4, "constant", 20) for s in (0, 3, 4, 19)] == pytest.approx([2.5e-4, 1e-3, 1e-3, 1e-3])
    cosine = [lr_at(s, 1e-3, 4, "cosine", 20) for s in (3, 4, 12, 20)]
    assert cosine == pytest.approx([1e-3, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), 0.0], abs=1e-12)
