"""Low-precision decoding (models/quantize.py): each layer kind within its stated error bound and
equal to x @ W_ref^T for the weights it stands for; greedy agreement with fp32 on the real default
model; the engine's batching properties kept; a cache reused only for the same weights; and one
clear line where a kernel is missing."""

import copy
import subprocess
import sys

import pytest
import torch

from instructkit.data.prompts import get_prompt_style
from instructkit.generate import generate, generate_cacheless
from instructkit.models.quantize import Fp16Linear, Int4Linear, Int8RowLinear, ShortlistHead, quantize_model
from instructkit.models.registry import load_model, quantize_loaded

from .conftest import run_cli

QUESTIONS = ["Name a fruit.", "What is the capital of France?", "Give a synonym for happy.", "Translate cat into Spanish.",
             "What is 2 plus 3?", "Write a short greeting.", "Name a yellow fruit.", "What is the opposite of cold?",
             "List two planets.", "Rewrite 'the dog barks' in the past tense.", "Name a primary color.",
             "What do bees make?", "How many days are in a week?", "Name an ocean.", "What is H2O?",
             "Give an example of a mammal.", "What is the boiling point of water?", "Name a musical instrument.",
             "Which is bigger, a cat or a mouse?", "Spell the word 'house' backwards."]


def _bound(kind, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Largest |x W^T - layer(x)| per output, from the format alone: each weight is off by at most
    half a step of its grid, and (int8 only) FBGEMM's 7-bit input (reduce_range, on the grid of
    [-max|x|, max|x|] of its row) by half a step of its own."""
    n, k = weight.shape
    if kind is Fp16Linear:
        return x.abs() @ (weight.abs() * 2.0**-11 + 2.0**-25).T  # fp16: 11 significant bits
    if kind is Int8RowLinear:
        weight_step = weight.abs().amax(dim=1) / 127  # (N,)
        weight_part = x.abs().sum(dim=1, keepdim=True) * (weight_step / 2)[None, :]
        span = 2 * x.abs().amax(dim=1, keepdim=True)  # per row: each row is scaled onto the grid of [-1, 1]
        input_part = (span / 127 / 2) * (weight.abs() + weight_step[:, None] / 2).sum(dim=1)[None, :]
        return weight_part + input_part
    grouped = weight.reshape(n, k // 32, 32)
    step = (grouped.amax(-1) - grouped.amin(-1)) / 15 / 2  # (N, K/32)
    return x.abs().reshape(x.shape[0], k // 32, 32).sum(-1) @ step.T


@pytest.mark.parametrize("kind", [Fp16Linear, Int8RowLinear, Int4Linear])
def test_each_layer_kind_stays_within_its_formats_error_bound(kind):
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 256, generator=generator), torch.randn(5, 256, generator=generator)
    x[2] *= 40  # rows of very different size: int8's per-row input scale must not mix them
    layer = kind(kind.quantize(weight), None)
    exact, quantized = x @ weight.T, layer(x)
    assert torch.all((quantized - exact).abs() <= _bound(kind, weight, x) * 1.001 + 1e-4)
    if kind is not Int8RowLinear:  # the others multiply fp32 inputs by exactly the reference weights
        torch.testing.assert_close(quantized, x @ kind.reference(weight).T, rtol=1e-4, atol=1e-4)
    alone = torch.cat([layer(row[None]) for row in x])
    if kind is Int8RowLinear:  # one grid for every row, exact integer sums: a row's result ignores its batch exactly
        torch.testing.assert_close(quantized, alone, rtol=1e-6, atol=1e-5)
    else:  # FBGEMM / aten block the sum by batch size on some CPUs (AVX2): equal up to fp32 rounding of a K-term sum
        rounding = weight.shape[1] * 2.0**-24 * (x.abs() @ kind.reference(weight).abs().T)
        assert torch.all((quantized - alone).abs() <= rounding)


@pytest.fixture(scope="module")
def real():
    return load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def continuations(real):
    """fp32 greedy continuations of the 20 prompts, 64 tokens each: (prompt ids, continuation ids)."""
    style = get_prompt_style("gemma")
    prompts = [real.tokenizer.encode(style.prompt({"instruction": q})) for q in QUESTIONS]
    results = generate(real.model, real.tokenizer, prompts, max_new_tokens=64, stop_ids=())
    return [(prompt, result.token_ids) for prompt, result in zip(prompts, results)]


def _teacher_forced_agreement(reference, other, continuations) -> tuple[float, int]:
    """Per decode step: feed both models the fp32 continuation and compare their next-token
    choices at every generated position, so one early difference does not hide the rest."""
    agree = total = 0
    for prompt, continuation in continuations:
        ids = torch.tensor([prompt + continuation])
        with torch.no_grad():
            a = reference(ids)[0, len(prompt) - 1 : -1].argmax(-1)
            b = other(ids)[0, len(prompt) - 1 : -1].argmax(-1)
        agree += int((a == b).sum())
        total += a.numel()
    return agree / total, total


@pytest.mark.slow
@pytest.mark.parametrize("mode, target", [("fp16", 0.99), ("int8", 0.99)])
def test_greedy_decoding_agrees_with_fp32_on_the_real_model(real, continuations, mode, target):
    quantized = quantize_model(copy.deepcopy(real.model), mode)
    agreement, steps = _teacher_forced_agreement(real.model, quantized, continuations)
    print(f"{mode}: {agreement:.2%} of {steps} teacher-forced decode steps agree with fp32")
    if mode == "int8":  # the shortlist's worth: the same weights without the fp32 rescoring
        quantized.lm_head = quantized.lm_head.rough
        without, _ = _teacher_forced_agreement(real.model, quantized, continuations)
        print(f"int8 without the shortlist's fp32 rescoring: {without:.2%}")
    assert steps == 20 * 64 and agreement >= target


@pytest.mark.slow
def test_int4_weights_agree_with_fp32_on_the_real_model(real, continuations):
    """The int4 CPU kernel is slower than fp32 here (models/quantize.py), too slow to push 1,280
    teacher-forced steps through in a test. So this checks the two halves: the kernel multiplies by
    exactly the reference int4 weights on every layer shape of the real model, and a model made of
    those reference weights (plain fp32 arithmetic) meets the agreement target."""
    layers = {name: module for name, module in real.model.named_modules() if isinstance(module, torch.nn.Linear)}
    shapes = {}
    for name, layer in layers.items():
        shapes.setdefault(tuple(layer.weight.shape), layer.weight.detach())
    x = torch.randn(2, 1, generator=torch.Generator().manual_seed(0))
    for (n, k), weight in shapes.items():
        rows = x * torch.randn(2, k, generator=torch.Generator().manual_seed(n))
        kernel = Int4Linear(Int4Linear.quantize(weight), None)(rows)
        torch.testing.assert_close(kernel, rows @ Int4Linear.reference(weight).T, rtol=1e-4, atol=1e-3)
    stand_in = copy.deepcopy(real.model)
    with torch.no_grad():
        for name, module in stand_in.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(Int4Linear.reference(module.weight))
        rough_head = torch.nn.Linear(*reversed(real.model.lm_head.weight.shape), bias=False)
        rough_head.weight = torch.nn.Parameter(Int4Linear.reference(real.model.lm_head.weight))
    stand_in.lm_head = ShortlistHead(rough_head, real.model.lm_head.weight.detach())  # as quantize_model builds it
    agreement, steps = _teacher_forced_agreement(real.model, stand_in, continuations)
    print(f"int4: {agreement:.2%} of {steps} teacher-forced decode steps agree with fp32")
    assert steps == 20 * 64 and agreement >= 0.95


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma3"])
def test_batched_equals_single_and_cached_equals_cacheless_when_quantized(name, mode):
    loaded = load_model(name, seed=1)
    model = quantize_model(loaded.model, mode)
    assert any(isinstance(module, (Fp16Linear, Int8RowLinear, Int4Linear)) for module in model.modules())
    prompts = [loaded.tokenizer.encode(text) for text in ["Hello", "The quick brown fox jumps over", "1 2 3", "A\tb"]]
    together = generate(model, loaded.tokenizer, prompts, max_new_tokens=20)
    alone = [generate(model, loaded.tokenizer, [p], max_new_tokens=20)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert generate_cacheless(model, loaded.tokenizer, prompts[1], max_new_tokens=20).token_ids == alone[1].token_ids


def test_quantized_weights_are_cached_beside_the_model_and_only_reused_for_the_same_weights(tmp_path, chapter_data_path):
    run = tmp_path / "run"
    assert run_cli("finetune", "--model", "tiny-gemma3", "--data", str(chapter_data_path), "--out", str(run),
                   "--max-steps", "1", "--eval-batches", "1", "--no-sample").returncode == 0
    first = quantize_loaded(load_model(str(run)), "int8")
    cache = run / "quantized-int8.safetensors"
    assert cache.exists()
    ids = torch.tensor([first.tokenizer.encode("Hello there")])
    again = quantize_loaded(load_model(str(run)), "int8")
    with torch.no_grad():
        torch.testing.assert_close(first.model(ids), again.model(ids), rtol=0, atol=0)
    stamp = cache.stat().st_mtime_ns
    (run / "model.safetensors").touch()  # "new weights": the cache no longer matches and is remade
    quantize_loaded(load_model(str(run)), "int8")
    assert cache.stat().st_mtime_ns != stamp


def test_a_missing_kernel_or_unknown_mode_is_one_line():
    code = ("import sys; import instructkit.models.quantize as q; q.kernels_available = lambda mode: False; "
            "from instructkit.cli import main; sys.exit(main(['generate', '--model', 'tiny-gpt2', '--prompt', 'Hi', "
            "'--quantize', 'int8', '--max-new-tokens', '2']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("instructkit: error: --quantize int8: this torch")
    assert len(result.stderr.strip().splitlines()) == 1
    unknown = run_cli("generate", "--model", "tiny-gpt2", "--prompt", "Hi", "--quantize", "int3")
    assert unknown.returncode == 2 and "--quantize must be one of none, fp16, int8, int4" in unknown.stderr


def test_auto_falls_back_to_exact_weights_where_the_kernels_are_missing(monkeypatch):
    import instructkit.models.quantize as quantize

    monkeypatch.setattr(quantize, "kernels_available", lambda mode: False)
    loaded = quantize_loaded(load_model("tiny-gpt2", seed=1), "auto")
    assert not any(isinstance(m, (Fp16Linear, Int8RowLinear, Int4Linear)) for m in loaded.model.modules())
