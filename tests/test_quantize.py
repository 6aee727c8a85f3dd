"""Weight-only int8/int4 decoding: error within the quantizer's own bound, greedy agreement with fp32
on the real default model, the engine's batching properties kept, a cache that is reused only for
the same weights, and one clear line where a kernel is missing."""

import copy

import pytest
import torch

from instructkit.data.prompts import get_prompt_style
from instructkit.generate import generate, generate_cacheless
from instructkit.models.quantize import QuantizedLinear, dequantize, quantize_int4, quantize_int8, quantize_model
from instructkit.models.registry import load_model, quantize_loaded

from .conftest import run_cli

QUESTIONS = ["Name a fruit.", "What is the capital of France?", "Give a synonym for happy.", "Translate cat into Spanish.",
             "What is 2 plus 3?", "Write a short greeting.", "Name a yellow fruit.", "What is the opposite of cold?",
             "List two planets.", "Rewrite 'the dog barks' in the past tense.", "Name a primary color.",
             "What do bees make?", "How many days are in a week?", "Name an ocean.", "What is H2O?",
             "Give an example of a mammal.", "What is the boiling point of water?", "Name a musical instrument.",
             "Which is bigger, a cat or a mouse?", "Spell the word 'house' backwards."]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_layer_error_stays_within_the_quantizers_bound(mode):
    """Per output: |y - y_q| <= sum over groups of ||x_g||_1 * (the largest rounding error of a
    weight in that group): scale / 2 per weight, scale = max|w_row| / 127 (int8) or the group's
    range / 15 (int4). The kernel must also equal x @ dequantized(W)^T."""
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 256, generator=generator), torch.randn(5, 256, generator=generator)
    tensors = quantize_int8(weight) if mode == "int8" else quantize_int4(weight)
    layer = QuantizedLinear(mode, tensors, 96, 256)
    exact, quantized = x @ weight.T, layer(x)
    torch.testing.assert_close(quantized, x @ dequantize(mode, tensors, (96, 256)).T, rtol=1e-4, atol=1e-4)
    if mode == "int8":
        bound = x.abs().sum(dim=1, keepdim=True) * (weight.abs().amax(dim=1) / 127 / 2)[None, :]
    else:
        grouped = weight.reshape(96, 8, 32)
        step = (grouped.amax(-1) - grouped.amin(-1)) / 15 / 2  # (96, 8)
        bound = x.abs().reshape(5, 8, 32).sum(-1) @ step.T
    assert torch.all((quantized - exact).abs() <= bound * 1.001 + 1e-5)


@pytest.fixture(scope="module")
def real():
    return load_model("gemma-3-270m")


def _greedy_agreement(fp32_model, other_model, tokenizer, prompts, new_tokens=64):
    """Per decode step with teacher forcing: run the fp32 greedy continuation through both models
    and compare their next-token choices at every generated position."""
    agree = total = 0
    continuations = generate(fp32_model, tokenizer, prompts, max_new_tokens=new_tokens)
    for prompt, result in zip(prompts, continuations):
        ids = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            a = fp32_model.head(fp32_model(ids, return_hidden=True))[0, len(prompt) - 1 : -1].argmax(-1)
            b = other_model.head(other_model(ids, return_hidden=True))[0, len(prompt) - 1 : -1].argmax(-1)
        agree += int((a == b).sum())
        total += a.numel()
    return agree / total, total


@pytest.mark.slow
@pytest.mark.parametrize("mode, target", [("int8", 0.99), ("int4", 0.95)])
def test_greedy_decoding_agrees_with_fp32_on_the_real_model(real, mode, target):
    style = get_prompt_style("gemma")
    prompts = [real.tokenizer.encode(style.prompt({"instruction": q})) for q in QUESTIONS]
    quantized = quantize_model(copy.deepcopy(real.model), mode)
    agreement, steps = _greedy_agreement(real.model, quantized, real.tokenizer, prompts)
    print(f"{mode}: {agreement:.2%} of {steps} decode steps agree with fp32")
    assert steps >= 20 * 32 and agreement >= target


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma3"])
def test_batched_equals_single_and_cached_equals_cacheless_when_quantized(name, mode):
    loaded = load_model(name, seed=1)
    model = quantize_model(loaded.model, mode)
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


def test_a_missing_kernel_is_one_line():
    code = ("import sys; import instructkit.models.quantize as q; q.kernels_available = lambda mode: False; "
            "from instructkit.cli import main; sys.exit(main(['generate', '--model', 'tiny-gpt2', '--prompt', 'Hi', "
            "'--quantize', 'int4', '--max-new-tokens', '2']))")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("instructkit: error: --quantize int4: this torch")
    assert len(result.stderr.strip().splitlines()) == 1
    assert run_cli("generate", "--model", "tiny-gpt2", "--prompt", "Hi", "--quantize", "int3").returncode == 2
