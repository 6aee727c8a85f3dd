"""The compiled decode step (instructkit.decode.static_decode): its static-shape arithmetic (a slot tensor,
masks over the whole cache) gives the engine's tokens, batched and single, with padding, sliding
windows and rows leaving; compiled, it gives the same tokens again; and on the real default
model in int8, the mode chat and serve use, compiled streaming equals eager streaming. Its
attention (csrc/one_query_attention.cpp) agrees with PyTorch's SDPA."""

import copy

import pytest
import torch
import torch.nn.functional as F

from instructkit.data.prompts import get_prompt_style
from instructkit.decode import static_decode
from instructkit.decode import native
from instructkit.decode.generate import generate, stream_tokens
from instructkit.decode.load import quantize_loaded
from instructkit.decode.quantize import quantize_model
from instructkit.models.registry import load_model

from .conftest import run_cli

TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog again", "1 2 3", "A\tb"]


@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, keys", [
    (1, 4, 1, 256, 200),  # the default model's shape at a chat's length
    (1, 4, 1, 256, 700),  # several chunks of 256 keys, merged
    (3, 8, 2, 64, 300),  # GPT-2's head size, several rows and key/value heads, 4 query heads each
    (2, 6, 6, 12, 40),  # a head size the vector path cannot take (the plain loops), no grouping
    (1, 5, 1, 32, 9),  # 5 query heads a key/value head: one group of 4 and one of 1
])
def test_one_query_attention_agrees_with_sdpa(batch, heads, kv_heads, head_dim, keys):
    """The static step's attention kernel against PyTorch's SDPA on the same mask: random hidden
    keys (unfilled slots, a window), and one row that sees a single key."""
    assert native.load() is None, native.load()
    generator = torch.Generator().manual_seed(keys)
    q = torch.randn(batch, heads, 1, head_dim, generator=generator)
    k, v = (torch.randn(batch, kv_heads, keys, head_dim, generator=generator) * 3 for _ in range(2))
    allowed = torch.rand(batch, keys, generator=generator) < 0.6
    allowed[0] = False
    allowed[0, keys // 2] = True
    scale = head_dim ** -0.5
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None], scale=scale,
                                              enable_gqa=heads != kv_heads)
    result = torch.ops.instructkit_native.one_query_attention(q, k, v, allowed, scale)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result[0], v[0, :, keys // 2].repeat_interleave(heads // kv_heads, 0)[:, None], rtol=0, atol=0)


def _token_ids(model, tokenizer, prompts, **options):
    return [r.token_ids for r in generate(model, tokenizer, prompts, max_new_tokens=24, **options)]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma3"])
def test_static_shape_steps_give_the_engines_tokens_batched_and_single(name):
    """tiny-gemma3's 6-token window is passed within the first steps, and the batch is left-padded
    and loses rows as they finish (different budgets), so every branch of the mask is exercised."""
    loaded = load_model(name, seed=3)
    prompts = [loaded.tokenizer.encode(text) for text in TEXTS]
    expected = _token_ids(loaded.model, loaded.tokenizer, prompts)
    static = static_decode.enable(copy.deepcopy(loaded.model), compile=False)
    cache = static.new_cache(1, 8)
    static.static_step(torch.tensor([[1]]), torch.tensor([[0]]), cache)
    assert cache.one_query_kernel  # the attention is csrc/one_query_attention.cpp's, tested above
    assert _token_ids(static, loaded.tokenizer, prompts) == expected
    assert [_token_ids(static, loaded.tokenizer, [p])[0] for p in prompts] == expected
    uneven = generate(static, loaded.tokenizer, prompts[:2], max_new_tokens=5) + generate(
        static, loaded.tokenizer, prompts[2:], max_new_tokens=24)
    assert [r.token_ids for r in uneven] == [e[:5] for e in expected[:2]] + expected[2:]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_compiled_step_gives_the_same_tokens_on_a_tiny_model(mode):
    """In int8, the mode chat and serve use, the products are the compiled graph's external calls
    (ours and FBGEMM's, decode/quantize.py's operators); in int4 only ours. The compiled step skips
    the guards on the model (static_decode._skip_model_guards): batch sizes seen before are picked
    again correctly, and a second model in the process gets graphs of its own, not the first's."""
    loaded = load_model("tiny-gemma3", seed=4)
    model = quantize_model(loaded.model, mode)
    prompts = [loaded.tokenizer.encode(text) for text in TEXTS]
    expected = _token_ids(model, loaded.tokenizer, prompts)
    compiled = static_decode.enable(model)
    assert _token_ids(compiled, loaded.tokenizer, prompts[1:2]) == expected[1:2]
    assert _token_ids(compiled, loaded.tokenizer, prompts) == expected  # other batch sizes: more compiles
    assert _token_ids(compiled, loaded.tokenizer, prompts[3:]) == expected[3:]  # batch 1 again
    other = load_model("tiny-gemma3", seed=5)
    other_model = quantize_model(other.model, mode)
    other_expected = _token_ids(other_model, other.tokenizer, prompts[1:2])
    assert other_expected != expected[1:2]
    assert _token_ids(static_decode.enable(other_model), other.tokenizer, prompts[1:2]) == other_expected


@pytest.mark.slow
def test_compiled_int8_streaming_equals_eager_on_the_real_model():
    loaded = quantize_loaded(load_model("gemma-3-270m"), "int8")
    prompt = loaded.tokenizer.encode(get_prompt_style("gemma").prompt({"instruction": "Describe the sea in two sentences."}))
    eager = list(stream_tokens(loaded.model, loaded.tokenizer, prompt, max_new_tokens=48))
    static_decode.enable(loaded.model)
    compiled = list(stream_tokens(loaded.model, loaded.tokenizer, prompt, max_new_tokens=48))
    assert len(eager) == 48 and compiled == eager


def test_generate_with_compile_prints_what_it_prints_without():
    args = ["generate", "--model", "tiny-gemma3", "--prompt", "The quick brown fox", "--max-new-tokens", "12", "--quantize", "int8"]
    plain, compiled = run_cli(*args), run_cli(*args, "--compile")
    assert plain.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == plain.stdout and plain.stdout.strip()
    assert "Compiling the decode step" in compiled.stderr


def test_a_failing_compile_is_one_line_and_leaves_the_model_eager(monkeypatch):
    """Inductor needs a C++ compiler; without one (here: torch.compile replaced by a function that
    fails like it) --compile says so in one line and the model keeps its eager decoding."""
    from instructkit.errors import UserError

    def broken_compile(fn, **options):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(long traceback)")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = load_model("tiny-gemma3").model
    with pytest.raises(UserError) as error:
        static_decode.enable(model)
    message = str(error.value)
    assert "\n" not in message and "No working C++ compiler" in message and "without --compile" in message
    assert not hasattr(model, "static_step")
