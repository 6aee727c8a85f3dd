"""The KV-cache engine against the chapter's cacheless loop, batching, stopping and sampling."""

import pytest
import torch

from instructkit.decode.generate import Sampling, generate, generate_cacheless, repeats_itself, sample_next_token, stream_text
from instructkit.models.registry import load_model

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog and then", "1 2 3", "A\tb  c\n\nd"]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-gemma3"])
def tiny(request):
    loaded = load_model(request.param, seed=1)
    return loaded.model, loaded.tokenizer


def test_cached_greedy_equals_cacheless(tiny):
    model, tokenizer = tiny
    # tiny-gemma3 has a 6-token window: 30 new tokens cross it many times.
    for text in PROMPTS:
        ids = tokenizer.encode(text)
        cached = generate(model, tokenizer, [ids], max_new_tokens=30)[0]
        reference = generate_cacheless(model, tokenizer, ids, max_new_tokens=30)
        assert cached.token_ids == reference.token_ids


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    batched = generate(model, tokenizer, prompts, max_new_tokens=25)
    # Prefilled in groups of two, whose caches are merged for decoding: still the same tokens.
    assert [r.token_ids for r in generate(model, tokenizer, prompts, max_new_tokens=25, prefill_batch=2)] == [
        r.token_ids for r in batched
    ]
    for prompt, result in zip(prompts, batched):
        assert generate(model, tokenizer, [prompt], max_new_tokens=25)[0].token_ids == result.token_ids


def test_continuous_batching_gives_each_row_its_own_tokens(tiny):
    """max_batch: rows join as others end, finished rows linger in the batch until a quarter of it
    has ended; every row still gets the tokens it gets alone, reported once as it ends."""
    model, tokenizer = tiny
    prompts = [tokenizer.encode(f"{text} {i}") for i in range(3) for text in PROMPTS]  # 12 prompts
    budgets = [3 + 3 * i for i in range(len(prompts))]  # rows end one by one
    alone = [generate(model, tokenizer, [p], max_new_tokens=b)[0].token_ids for p, b in zip(prompts, budgets)]
    finished: list[int] = []
    from instructkit.decode.decoder import Decoder, Request

    decoder = Decoder(model, tokenizer.pad_id, prefill_batch=2)
    requests = [Request(p, b) for p, b in zip(prompts[:8], budgets[:8])]
    decoder.join(requests)
    lingered = False
    while len(decoder):
        decoder.step()
        lingered |= len(decoder.rows) > len(decoder)  # ended, counted out at once, dropped later
    assert lingered
    assert [r.tokens for r in requests] == alone[:8]
    results = generate(model, tokenizer, prompts, max_new_tokens=31, max_batch=5, prefill_batch=2,
                       on_finished=lambda row, result: finished.append(row))
    reference = generate(model, tokenizer, prompts, max_new_tokens=31)
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]
    assert sorted(finished) == list(range(len(prompts)))


def test_stop_token_and_stop_string(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPTS[1])
    free = generate(model, tokenizer, [ids], max_new_tokens=12)[0]
    stop_at = free.token_ids[5]
    stopped = generate(model, tokenizer, [ids], max_new_tokens=12, stop_ids=[stop_at])[0]
    assert stopped.finish_reason == "stop_token"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at)]
    needle = tokenizer.decode(free.token_ids[3:5])
    cut = generate(model, tokenizer, [ids], max_new_tokens=12, stop_strings=[needle])[0]
    assert cut.finish_reason == "stop_string" and needle not in cut.text
    assert free.text.startswith(cut.text)


def test_context_length_cut_keeps_the_end_of_a_long_prompt():
    loaded = load_model("tiny-gpt2")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer.encode("word " * 400)  # 400 tokens > the 256-token context
    result = generate(model, tokenizer, [ids], max_new_tokens=8)[0]
    assert len(result.token_ids) == 8
    room = model.config.context_length - 8
    assert generate(model, tokenizer, [ids[-room:]], max_new_tokens=8)[0].token_ids == result.token_ids


def test_seeded_sampling_is_reproducible_and_filters_work(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPTS[0])
    sampling = Sampling(temperature=1.0, top_k=50, seed=7)
    first = generate(model, tokenizer, [ids], max_new_tokens=15, sampling=sampling)[0]
    again = generate(model, tokenizer, [ids], max_new_tokens=15, sampling=sampling)[0]
    other = generate(model, tokenizer, [ids], max_new_tokens=15, sampling=Sampling(temperature=1.0, seed=8))[0]
    assert first.token_ids == again.token_ids != other.token_ids
    greedy = generate(model, tokenizer, [ids], max_new_tokens=15)[0]
    for narrow in (Sampling(temperature=1.0, top_k=1, seed=1), Sampling(temperature=1.0, top_p=1e-6, seed=1)):
        assert generate(model, tokenizer, [ids], max_new_tokens=15, sampling=narrow)[0].token_ids == greedy.token_ids


def test_sample_next_token_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    seen = {int(sample_next_token(logits, Sampling(temperature=1.0, top_p=0.7), generator)) for _ in range(300)}
    assert seen == {0, 1}


def test_streaming_yields_the_same_text(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPTS[2])
    pieces = list(stream_text(model, tokenizer, ids, max_new_tokens=20))
    assert "".join(pieces) == generate(model, tokenizer, [ids], max_new_tokens=20)[0].text
    assert len(pieces) > 1


def test_repeats_itself_finds_an_earlier_copy_of_the_tail():
    assert repeats_itself([1, 2, 3, 9, 1, 2, 3], 3)
    assert repeats_itself([5, 5, 5, 5], 3)  # overlapping: one token four times
    assert not repeats_itself([5, 5, 5], 3)
    assert not repeats_itself([1, 2, 3, 9, 1, 2, 4], 3)
    assert not repeats_itself([1, 2], 3)


def test_repeat_stop_only_cuts_a_loop_off():
    """A random tiny model decodes greedily into loops; with repeat_stop each row is the plain row cut
    just before its first repeated window, and a row without a loop is unchanged."""
    loaded = load_model("tiny-gpt2", seed=0)
    prompts = [loaded.tokenizer.encode(text) for text in ("Hello there", "The list is", "One two three four")]
    plain = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=80)
    guarded = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=80, repeat_stop=4)
    assert any(g.finish_reason == "repeat" for g in guarded)
    for p, g in zip(plain, guarded):
        kept = len(g.token_ids)
        assert g.token_ids == p.token_ids[:kept]
        assert not any(repeats_itself(g.token_ids[:end], 4) for end in range(1, kept + 1))
        if g.finish_reason == "repeat":
            assert repeats_itself(p.token_ids[: kept + 4], 4)
        else:
            assert g.token_ids == p.token_ids


def test_a_tiny_temperature_is_greedy_not_nan():
    """1e-300 passed every range check and divided logits into inf, then NaN probabilities."""
    logits = torch.tensor([[3.0, 9.0, -2.0, 8.5], [0.0, -1.0, 4.0, 1.0]])
    for temperature in (1e-300, 1e-30, 1e-6):
        assert sample_next_token(logits, Sampling(temperature=temperature, seed=1), torch.Generator().manual_seed(1)).tolist() == [1, 2]
    # Just above the greedy cut the arithmetic is still finite: the top logit is 0 after the shift.
    huge = torch.tensor([[1e4, 0.0, -1e4]])
    assert sample_next_token(huge, Sampling(temperature=2e-5), torch.Generator().manual_seed(1)).tolist() == [0]


def test_generate_cli_takes_a_tiny_temperature():
    from .conftest import run_cli

    result = run_cli("generate", "--model", "tiny-gpt2", "--prompt", "Hello", "--max-new-tokens", "4",
                     "--temperature", "1e-300", "--quantize", "none")
    assert result.returncode == 0, result.stderr[-2000:]
    greedy = run_cli("generate", "--model", "tiny-gpt2", "--prompt", "Hello", "--max-new-tokens", "4", "--quantize", "none")
    assert result.stdout == greedy.stdout


class _FailsAt(torch.nn.Module):
    """A model whose one-token decode step fails for any row at `position` (an injected fault
    that no arithmetic guard catches: the row's own data breaks the forward pass)."""

    def __init__(self, model, position):
        super().__init__()
        self.inner, self.config, self.position = model, model.config, position

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def head(self, hidden):
        return self.inner.head(hidden)

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[1] == 1 and bool((kwargs["positions"] == self.position).any()):
            raise RuntimeError("injected failure")
        return self.inner(input_ids, **kwargs)


def test_a_failing_row_ends_alone_and_the_others_keep_their_tokens():
    from instructkit.decode.generate import Decoder, Request

    loaded = load_model("tiny-gemma3", seed=1)
    tokenizer = loaded.tokenizer
    short, longer = tokenizer.encode("Hi"), [tokenizer.encode(text) for text in PROMPTS[1:3]]
    assert all(len(ids) > len(short) + 3 for ids in longer)  # the healthy rows never reach that position
    alone = generate(loaded.model, tokenizer, longer, max_new_tokens=12)
    decoder = Decoder(_FailsAt(loaded.model, len(short) + 2), tokenizer.pad_id)
    requests = [Request(short, 12), *(Request(ids, 12) for ids in longer)]
    decoder.join(requests)
    while len(decoder):
        decoder.step()
    assert requests[0].finish_reason == "error" and "injected failure" in str(requests[0].error)
    assert len(requests[0].tokens) == 3  # it decoded until the step that failed
    assert [r.tokens for r in requests[1:]] == [a.token_ids for a in alone]


def test_the_cache_grows_with_the_rows_not_with_their_budgets():
    """max_new_tokens of 10**9 used to size the cache for the whole context at the first step."""
    from instructkit.decode.generate import Decoder, Request

    loaded = load_model("tiny-gemma3", seed=1)
    context = loaded.model.config.context_length
    decoder = Decoder(loaded.model, loaded.tokenizer.pad_id)
    prompt = loaded.tokenizer.encode("Hello")
    request = Request(prompt, context - len(prompt))  # what the server allows a max_tokens of 10**9
    decoder.join([request])
    assert decoder.cache.capacity < context // 4
    for _ in range(40):
        decoder.step()
    assert decoder.cache.capacity <= 2 * (len(prompt) + len(request.tokens)) + 64
    reference = generate(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=40)[0]
    assert request.tokens == reference.token_ids
