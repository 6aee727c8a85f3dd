"""Low-precision decoding (decode/quantize.py): each layer kind within its stated error bound and
equal to x @ W_ref^T for the weights it stands for; greedy agreement with fp32 on the real default
model; the engine's batching properties kept; a cache reused only for the same weights; and one
clear line where a kernel is missing."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from instructkit.data.prompts import get_prompt_style
from instructkit.decode import quantize
from instructkit.decode.generate import generate, generate_cacheless
from instructkit.decode.quantize import (INT8_INPUT_GRID, KERNEL_MAX_ROWS, Fp16Linear, Int4GroupLinear, Int4Linear,
                                         Int8GroupLinear, Int8RowLinear, quantize_model)
from instructkit.decode.load import quantize_loaded
from instructkit.models.registry import load_model

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
    if kind is Int8GroupLinear:
        step = grouped.abs().amax(-1) / 127 / 2  # (N, K/32)
    else:
        step = (grouped.amax(-1) - grouped.amin(-1)) / 15 / 2  # (N, K/32)
    if kind is Int4GroupLinear:  # its scale and low are stored in fp16, which moves the grid a little
        step = step + (grouped.amax(-1).abs() + grouped.amin(-1).abs()) * 2.0**-10
    return x.abs().reshape(x.shape[0], k // 32, 32).sum(-1) @ step.T


def _input_grid_bound(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Largest |x W_ref^T - layer(x)| where the kernel puts x on a grid of INT8_INPUT_GRID steps
    each side per group of 32 (int8's VNNI path): each x off by half a step of its group's grid,
    plus fp32 rounding of the scaling and the sum over groups."""
    m, k = x.shape
    step = x.abs().reshape(m, k // 32, 32).amax(-1) / INT8_INPUT_GRID / 2  # (M, K/32)
    per_group = reference.abs().reshape(reference.shape[0], k // 32, 32).sum(-1)  # (N, K/32)
    return step @ per_group.T + 1e-6 * (x.abs() @ reference.abs().T)


@pytest.mark.parametrize("kind", [Fp16Linear, Int8RowLinear, Int8GroupLinear, Int4GroupLinear, Int4Linear])
def test_each_layer_kind_stays_within_its_formats_error_bound(kind):
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 256, generator=generator), torch.randn(5, 256, generator=generator)
    x[2] *= 40  # rows of very different size: int8's per-row input scale must not mix them
    layer = kind(kind.quantize(weight), None)
    exact, quantized = x @ weight.T, layer(x)
    assert torch.all((quantized - exact).abs() <= _bound(kind, weight, x) * 1.001 + 1e-4)
    if getattr(layer, "block_rows", 0):  # int8's VNNI path: exactly the reference weights, x on a 16-bit grid per group
        reference = kind.reference(weight)
        assert torch.all((quantized - x @ reference.T).abs() <= _input_grid_bound(x, reference) * 1.001 + 1e-5)
    elif kind is not Int8RowLinear:  # the others multiply fp32 inputs by exactly the reference weights,
        # up to fp32 rounding, relative to the sum of |products| (int4 sums x u * scale and x * low apart)
        reference = kind.reference(weight)
        assert torch.all((quantized - x @ reference.T).abs() <= 1e-5 * (x.abs() @ reference.abs().T) + 1e-5)
    alone = torch.cat([layer(row[None]) for row in x])
    if kind is Int8RowLinear:  # one grid for every row, exact integer sums: a row's result ignores its batch exactly
        torch.testing.assert_close(quantized, alone, rtol=1e-6, atol=1e-5)
    elif kind in (Int8GroupLinear, Int4GroupLinear):  # every output summed in one fixed order, whatever the batch: bit for bit
        assert torch.equal(quantized, alone)
    else:  # FBGEMM / aten block the sum by batch size on some CPUs (AVX2): equal up to fp32 rounding of a K-term sum
        rounding = weight.shape[1] * 2.0**-24 * (x.abs() @ kind.reference(weight).abs().T)
        assert torch.all((quantized - alone).abs() <= rounding)


@pytest.fixture(scope="module")
def real():
    return load_model("gemma-3-270m")


def test_int4_finds_the_grid_llama_cpp_put_the_weights_on_and_never_does_worse_than_min_max(real):
    """Gemma 3 270M's o_proj weights are Q4_K in its GGUF: every group of 32 already lies on a
    16-level grid that llama.cpp's quantizer chose, often leaving level 0 or 15 unused, so a
    min/max grid misses it (relative squared error ~2e-3, measured). Our least-squares search finds
    it again up to the fp16 rounding of scale and low; and on any weights its weighted error is
    never above min/max's, which is one of its candidates."""
    o_proj = real.model.model.layers[0].self_attn.o_proj.weight.detach()  # (640, 1024), Q4_K in the file

    def min_max(weight):  # the old grid: 16 levels spanning each group, scale and low in fp16
        groups = weight.reshape(-1, 32)
        low = groups.amin(-1, keepdim=True)
        scale = ((groups.amax(-1, keepdim=True) - low) / 15).half().float()
        low = low.half().float()
        return (torch.round((groups - low) / scale).clamp(0, 15) * scale + low).reshape(weight.shape)

    def relative_error(reference):
        return ((reference - o_proj).square().sum() / o_proj.square().sum()).item()

    assert relative_error(Int4GroupLinear.reference(o_proj)) < 1e-5 < 1e-4 < relative_error(min_max(o_proj))
    generator = torch.Generator().manual_seed(0)
    for weight in (torch.randn(64, 256, generator=generator), torch.rand(64, 256, generator=generator) ** 4):
        groups = weight.reshape(-1, 32)
        w = groups.square().mean(-1, keepdim=True).sqrt() + groups.abs()  # the search's weighting
        ours = (Int4GroupLinear.reference(weight).reshape(-1, 32) - groups).square()
        theirs = (min_max(weight).reshape(-1, 32) - groups).square()
        assert torch.all((w * ours).sum(-1) <= (w * theirs).sum(-1) * (1 + 1e-6))
        assert (w * ours).sum() < 0.9 * (w * theirs).sum()


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
@pytest.mark.parametrize("mode, target", [("fp16", 0.99), ("int8", 0.99), ("int4", 0.95)])
def test_greedy_decoding_agrees_with_fp32_on_the_real_model(real, continuations, mode, target, monkeypatch):
    quantized = quantize_model(copy.deepcopy(real.model), mode)
    agreement, steps = _teacher_forced_agreement(real.model, quantized, continuations)
    print(f"{mode}: {agreement:.2%} of {steps} teacher-forced decode steps agree with fp32")
    if mode == "int8":  # whole sequences take the dequantized (BLAS) path except on VNNI processors
        # (whose kernel takes prefills too); int8's kernel also rounds x (a 16-bit grid on VNNI
        # processors), so here every product goes through the kernel as in decoding
        monkeypatch.setattr(quantize, "KERNEL_MAX_ROWS", 10**6)
        through_kernel, _ = _teacher_forced_agreement(real.model, quantized, continuations)
        print(f"{mode} through our kernel: {through_kernel:.2%}")
        assert through_kernel >= target
    if mode != "fp16":  # the shortlist's worth: the same weights without the fp32 rescoring
        quantized.lm_head = quantized.lm_head.rough
        without, _ = _teacher_forced_agreement(real.model, quantized, continuations)
        print(f"{mode} without the shortlist's fp32 rescoring: {without:.2%}")
    assert steps == 20 * 64 and agreement >= target


@pytest.mark.slow
@pytest.mark.parametrize("kind", [Int8GroupLinear, Int4GroupLinear])
def test_our_kernels_multiply_by_exactly_the_reference_weights_on_every_real_layer_shape(real, kind, monkeypatch):
    """A decode step takes the kernel; a prompt's prefill takes the dequantized (BLAS) path, or on
    VNNI processors int8's kernel again, in chunks of rows. All must multiply by the same weights:
    the kernel, for one row, a few and a short prompt's worth, equals x @ W_ref^T on every layer
    shape of the default model; wherever the kernel runs, a batch's rows equal the rows alone
    exactly, chunked or not."""
    shapes = {}
    for module in real.model.modules():
        if isinstance(module, torch.nn.Linear):
            shapes.setdefault(tuple(module.weight.shape), module.weight.detach())
    for (n, k), weight in shapes.items():
        layer = kind(kind.quantize(weight), None)
        reference = kind.reference(weight)
        torch.testing.assert_close(layer.dequantized(), reference, rtol=0, atol=0)
        # one row and a few (decoding), and a short prompt's prefill (26 rows: the kernel's on VNNI,
        # in chunks of 8 here, the last of 2 rows; BLAS's elsewhere, a tile of weight rows at a time,
        # one buffer refilled, where the layer is bigger than a tile, as the head is)
        monkeypatch.setattr(quantize, "KERNEL_CHUNK_ROWS", 8)
        for rows in (1, 3, KERNEL_MAX_ROWS + 10):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n + rows))
            if getattr(layer, "block_rows", 0):  # int8's VNNI path: x on a 16-bit grid per group, then exact
                assert layer.kernel_takes_prefill()
                assert torch.all((layer(x) - x @ reference.T).abs() <= _input_grid_bound(x, reference) * 1.001 + 1e-5)
            else:
                torch.testing.assert_close(layer(x), x @ reference.T, rtol=1e-4, atol=1e-4)
            if rows <= KERNEL_MAX_ROWS or layer.kernel_takes_prefill():  # a row's result ignores its batch bit for bit
                assert torch.equal(layer(x), torch.cat([layer(row[None]) for row in x]))
        x = x[:3]
        if hasattr(layer, "round_input"):  # a shortlist head's product may round x to bf16 (8 significant bits)
            layer.round_input = True
            rounded = layer(x)
            assert torch.all((rounded - x @ reference.T).abs() <= x.abs() @ reference.abs().T * 2.0**-8 + 1e-5)
            assert torch.equal(rounded, torch.cat([layer(row[None]) for row in x]))


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma3"])
def test_batched_equals_single_and_cached_equals_cacheless_when_quantized(name, mode):
    loaded = load_model(name, seed=1)
    model = quantize_model(loaded.model, mode)
    assert any(isinstance(module, (Fp16Linear, Int8RowLinear, Int8GroupLinear, Int4GroupLinear, Int4Linear)) for module in model.modules())
    prompts = [loaded.tokenizer.encode(text) for text in ["Hello", "The quick brown fox jumps over", "1 2 3", "A\tb"]]
    together = generate(model, loaded.tokenizer, prompts, max_new_tokens=20)
    alone = [generate(model, loaded.tokenizer, [p], max_new_tokens=20)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert generate_cacheless(model, loaded.tokenizer, prompts[1], max_new_tokens=20).token_ids == alone[1].token_ids


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_frees_each_fp32_layer_before_the_next(mode, monkeypatch):
    """Each fp32 linear layer is gone once its quantized one replaced it, before the next is made:
    the fp32 and the quantized model never coexist (a 1B model once peaked at twice its size)."""
    import weakref

    model = load_model("tiny-gemma3", seed=1).model
    alive = {name: weakref.ref(module.weight) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name != "lm_head"}  # the head's weight is the embedding's
    seen: list[str] = []
    original = quantize._layer_kind

    def watching(kinds, name, weight):
        assert [done for done in seen if alive[done]() is not None] == [], "a replaced fp32 layer is still alive"
        if name in alive:
            seen.append(name)
        return original(kinds, name, weight)

    monkeypatch.setattr(quantize, "_layer_kind", watching)
    quantize_model(model, mode)
    assert seen == list(alive) and all(ref() is None for ref in alive.values())


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
    code = ("import sys; import instructkit.decode.quantize as q; q.kernels_available = lambda mode: False; "
            "from instructkit.cli import main; sys.exit(main(['generate', '--model', 'tiny-gpt2', '--prompt', 'Hi', "
            "'--quantize', 'int8', '--max-new-tokens', '2']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("instructkit: error: --quantize int8: this torch")
    assert len(result.stderr.strip().splitlines()) == 1
    unknown = run_cli("generate", "--model", "tiny-gpt2", "--prompt", "Hi", "--quantize", "int3")
    assert unknown.returncode == 2 and "--quantize must be one of none, fp16, int8, int4" in unknown.stderr


def test_int8_without_a_compiler_falls_back_to_pytorchs_kernels_in_one_line(tmp_path):
    """Our C++ kernels are built on first use; with no compiler (CXX pointing nowhere, an empty
    cache), int8 still decodes, on FBGEMM's kernels as before them, after one line."""
    env = {**os.environ, "INSTRUCTKIT_CACHE": str(tmp_path), "CXX": "/nonexistent/c++"}
    result = subprocess.run([sys.executable, "-m", "instructkit", "generate", "--model", "tiny-gpt2", "--prompt", "Hi",
                             "--quantize", "int8", "--max-new-tokens", "2"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "instructkit: our int8/int4 kernels are unavailable (no C++ compiler (/nonexistent/c++) on PATH); "
        "--quantize int8 uses PyTorch's (Fp16Linear body, Int8RowLinear head)"]


def test_auto_falls_back_to_exact_weights_where_the_kernels_are_missing(monkeypatch):
    import instructkit.decode.quantize as quantize

    monkeypatch.setattr(quantize, "kernels_available", lambda mode: False)
    loaded = quantize_loaded(load_model("tiny-gpt2", seed=1), "auto")
    assert not any(isinstance(m, (Fp16Linear, Int8RowLinear, Int8GroupLinear, Int4GroupLinear, Int4Linear)) for m in loaded.model.modules())


def test_int8_without_a_vnni_path_widens_row_by_row_and_keeps_fbgemms_head(monkeypatch):
    """On processors without AVX512-VNNI our int8 kernel widens the weights to fp32 row by row;
    there int8's head stays FBGEMM's (faster there). Shown on any processor by hiding the VNNI
    path: the layer then keeps the plain row order and multiplies by exactly the reference weights."""
    from instructkit.decode import native
    from instructkit.decode.quantize import scheme

    has_vnni = native.int8_block_rows() == 16
    generator = torch.Generator().manual_seed(1)
    weight, x = torch.randn(64, 640, generator=generator), torch.randn(3, 640, generator=generator)
    blocked = Int8GroupLinear(Int8GroupLinear.quantize(weight), None)
    monkeypatch.setattr(native, "int8_block_rows", lambda: 0)
    plain = Int8GroupLinear(Int8GroupLinear.quantize(weight), None)
    assert scheme("int8") == (Int8GroupLinear, Int8RowLinear) and plain.block_rows == 0
    reference = Int8GroupLinear.reference(weight)
    torch.testing.assert_close(plain.dequantized(), reference, rtol=0, atol=0)
    assert torch.all((plain(x) - x @ reference.T).abs() <= 1e-5 * (x.abs() @ reference.abs().T) + 1e-5)
    if has_vnni:  # where the VNNI path exists (it does on the machines CI runs on): both paths, the same weights
        monkeypatch.undo()
        assert scheme("int8") == (Int8GroupLinear, Int8GroupLinear) and blocked.block_rows == 16
        torch.testing.assert_close(blocked.dequantized(), reference, rtol=0, atol=0)
        assert torch.all((blocked(x) - plain(x)).abs() <= _input_grid_bound(x, reference) * 1.001 + 2e-5)


def test_a_killed_kernel_build_never_blocks_the_next_process(tmp_path):
    """PyTorch's extension builder guards its folder with a lock file that a killed build leaves
    behind; every later process then waited on it forever (seen: a whole test run hung on one).
    With the library built and a stale lock file beside it, a fresh process loads the kernels at
    once, without the builder (a build holds an OS lock, flock, which dies with its process)."""
    import shutil

    from instructkit.decode import native

    assert native.load() is None, native.load()
    name = native._build_name()
    built = native.cache_dir() / "kernels" / name / f"{name}.so"
    folder = tmp_path / "kernels" / name
    folder.mkdir(parents=True)
    shutil.copy(built, folder / built.name)
    (folder / "lock").touch()  # what a SIGKILLed build leaves
    env = {**os.environ, "INSTRUCTKIT_CACHE": str(tmp_path)}
    probe = [sys.executable, "-c", "from instructkit.decode import native; print(native.load())"]
    result = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "None" and "building" not in result.stderr, result.stderr


def _one_token_at_a_time(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (1, T, V) of ids (1, T) fed a token a step through a KV cache: every product takes
    our kernels' path (one input row), as decoding does."""
    cache = model.new_cache(1, ids.shape[1])
    with torch.no_grad():
        return torch.cat([model(ids[:, t: t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4"])
def test_fused_projections_decode_as_the_separate_layers_bit_for_bit(mode):
    """q/k/v and gate/up multiplied as one stacked layer each (quantize_model's default) give the
    logits of the separate quantized layers exactly, token by token, and a prefill's within fp32
    rounding (BLAS on the dequantized weights, whose blocking may follow the width)."""
    loaded = load_model("tiny-gemma3", seed=1)
    separate = quantize_model(copy.deepcopy(loaded.model), mode, fuse=False)
    fused = quantize_model(copy.deepcopy(loaded.model), mode)
    for layer in fused.model.layers:
        assert set(layer.self_attn.fused_sizes) == {"qkv_proj"} and set(layer.mlp.fused_sizes) == {"gate_up_proj"}
        assert not any(hasattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj"))
        assert type(layer.self_attn.qkv_proj) is type(separate.model.layers[0].self_attn.q_proj)
    assert not separate.model.layers[0].self_attn.fused_sizes
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_one_token_at_a_time(fused, ids), _one_token_at_a_time(separate, ids))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), separate(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fused_projections_decode_as_the_separate_layers_on_the_real_model(real):
    """The same property at real size (Gemma 3 270M, int8, the chat default): stacked q/k/v and
    gate/up give the separate layers' logits bit for bit, token by token."""
    separate = quantize_model(copy.deepcopy(real.model), "int8", fuse=False)
    fused = quantize_model(copy.deepcopy(real.model), "int8")
    assert all(layer.self_attn.fused_sizes and layer.mlp.fused_sizes for layer in fused.model.layers)
    ids = torch.tensor([real.tokenizer.encode("Write a short poem about the sea.")])
    assert torch.equal(_one_token_at_a_time(fused, ids), _one_token_at_a_time(separate, ids))


def test_a_group_with_a_member_the_body_kind_cannot_take_stays_separate(monkeypatch):
    """Where one member of q/k/v would get another kind (here k and v, 32 rows, refused by int8's
    `fits` and so fp16), the group is not stacked: each member keeps its own layer and the model
    decodes as with stacking off."""
    monkeypatch.setattr(Int8GroupLinear, "fits", staticmethod(lambda weight: weight.shape[0] != 32))
    loaded = load_model("tiny-gemma3", seed=1)
    model = quantize_model(copy.deepcopy(loaded.model), "int8")
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert not attention.fused_sizes and isinstance(attention.q_proj, Int8GroupLinear)
    assert isinstance(attention.k_proj, Fp16Linear) and isinstance(attention.v_proj, Fp16Linear)
    assert mlp.fused_sizes == {"gate_up_proj": [128, 128]}  # the MLP's group is whole
    unstacked = quantize_model(copy.deepcopy(loaded.model), "int8", fuse=False)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_one_token_at_a_time(model, ids), _one_token_at_a_time(unstacked, ids))


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):
            start, stop = (int(part, 16) for part in first.split("-"))
            inside = start <= address < stop
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def _streamed(model: torch.nn.Module) -> list[torch.Tensor]:
    return [getattr(module, name) for module in model.modules() for name in getattr(module, "streamed", ())]


def test_quantized_weights_stream_from_huge_pages_where_the_system_has_them(tmp_path, monkeypatch):
    """Every quantized layer's streamed tensors move into one region advised for 2 MB pages
    (decode/huge_pages.py), which the kernel backs with them where transparent huge pages are
    "always" or "madvise" (this machine's setting); with "never" (a setting file saying so) they
    stay where they were. Either way the model computes what it did."""
    from instructkit.decode import huge_pages

    model = quantize_model(load_model("tiny-gemma3", seed=1).model, "int8")
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    before = _one_token_at_a_time(model, ids)
    tensors = _streamed(model)
    assert len(tensors) >= 2 * 4 * model.config.n_layers  # q/k/v, o, gate/up, down (and the head), two tensors each
    regions = {tensor.untyped_storage().data_ptr() for tensor in tensors}
    if huge_pages.available():  # this machine's (and CI's) setting
        assert len(regions) == 1
        first = min(tensor.data_ptr() for tensor in tensors)
        assert first % huge_pages.HUGE_PAGE == 0 and _anon_huge_kb(first) >= 2048
    else:
        print(f"{huge_pages.SETTING}: transparent huge pages are off here; only the fallback is checked")
        assert len(regions) == len(tensors)
    # with THP off, nothing moves; the values are the same either way
    never = tmp_path / "enabled"
    never.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "SETTING", never)
    assert not huge_pages.available()
    separate = quantize_model(load_model("tiny-gemma3", seed=1).model, "int8")
    streamed = _streamed(separate)
    assert len({tensor.untyped_storage().data_ptr() for tensor in streamed}) == len(streamed)
    assert huge_pages.gather(model) == 0
    assert torch.equal(_one_token_at_a_time(separate, ids), before)
    assert torch.equal(_one_token_at_a_time(model, ids), before)
