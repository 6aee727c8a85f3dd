"""The embedded Gemma 3 270M against llama.cpp (llama-cpp-python) on the same GGUF file:
identical token ids on a varied corpus, and the same top-5 next tokens."""

import json

import numpy as np
import pytest
import torch

from instructkit.models.registry import embedded_gguf_path, load_model

from .conftest import require_module

llama_cpp = require_module("llama_cpp")

HANDWRITTEN = [
    "The capital of France is", "", " ", "  ", "   leading spaces", "trailing spaces   ", "tab\tseparated\tvalues",
    "\t\tindented with tabs", "line one\nline two", "para\n\npara", "many\n\n\n\n\nnewlines", "\r\nwindows line end",
    "Café au lait, naïve façade, Ångström", "Straße und Größe", "Привет, как дела?", "こんにちは世界", "頑張って (Ganbatte)",
    "你好，世界！", "안녕하세요", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "Ελληνικά γράμματα", "¿Puedes ayudarme?",
    "😀😃😄 emoji run", "👨‍👩‍👧‍👦 family ZWJ", "🇫🇷🇯🇵 flags", "thumbs 👍🏽 skin tone", "math ∑∫∂√∞ ≠ ≤ ≥",
    "1234567890", "3.14159265358979", "1,000,000 and 1.000.000", "-42 + 17 = -25", "0x1F 0b1010 1e-9",
    "2026-11-24T23:56:00Z", "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<div class=\"x\">html</div>", "<table><tr><td>cell</td></tr></table>", "SELECT * FROM users WHERE id = 1;",
    '{"key": [1, 2, {"nested": null}]}', "https://example.com/path?q=1&r=2#frag", "user@example.com",
    "C:\\Program Files\\App\\app.exe", "snake_case camelCase PascalCase kebab-case", "ALL CAPS SENTENCE HERE",
    "a", "ab", "abc", "I'm we've they'll don't", "\"quoted\" 'single' `back`", "(parens) [brackets] {braces}",
    "end with newline\n", "\n starts with newline", "mixed \t \n whitespace", "word" * 30, "x " * 40,
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>", "<unused0> token",
    "zero\u200bwidth", "non\u00a0breaking space", "combining e\u0301 accent", "emoji at end 🎉",
]


def corpus(chapter_data_path) -> list[str]:
    records = json.loads(chapter_data_path.read_text())
    texts = list(HANDWRITTEN)
    for record in records[::7][:160]:  # varied real instructions, inputs and outputs
        texts.append(record["instruction"] + ("\n\n" + record["input"] if record["input"] else "") + "\n" + record["output"])
    return texts


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def reference_vocab():
    return llama_cpp.Llama(str(embedded_gguf_path()), vocab_only=True, verbose=False)


def test_token_ids_equal_llama_cpp(gemma, reference_vocab, chapter_data_path):
    texts = corpus(chapter_data_path)
    assert len(texts) >= 200
    mismatches = []
    for text in texts:
        expected = reference_vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        has_bos = text.startswith("<bos>")
        if has_bos:  # llama.cpp adds a second BOS to a text that starts with one (and warns); we never do
            expected = expected[1:]
        actual = gemma.tokenizer.encode(text)
        if actual != expected:
            mismatches.append((text, actual, expected))
        assert gemma.tokenizer.decode(actual if has_bos else actual[1:]) == text
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first: {mismatches[0]!r}"


PROMPTS = [
    "The capital of France is", "Water boils at a temperature of", "The opposite of hot is",
    "1, 2, 3, 4, 5,", "def add(a, b):\n    return", "Once upon a time, there was a",
    "The chemical symbol for gold is", "Monday, Tuesday, Wednesday,", "The largest planet in our solar system is",
    "To be or not to be, that is the", "The sun rises in the", "Translate to French: Good morning ->",
    "Q: What is 2 + 2?\nA:", "The plural of mouse is", "My favourite colour is",
    "<start_of_turn>user\nName a fruit.<end_of_turn>\n<start_of_turn>model\n", "import numpy as",
    "The first president of the United States was", "Photosynthesis converts sunlight into",
    "A haiku about autumn:\n", "The speed of light is approximately", "Paris, London, Berlin,",
]


def test_top5_next_tokens_equal_llama_cpp(gemma):
    """Same top-1 and the same top-5 set, up to near-ties at the 5th place.

    llama.cpp multiplies with 8-bit-quantized activations, which moves logits by up to ~0.1 (the
    correlation with ours is 0.997 to 0.9997 over these prompts). So a token may be in one top 5
    and not the other only when it sits within NEAR_TIE of the 5th-best logit in both models;
    any real disagreement (a wrong mask, norm or RoPE base) moves logits by whole units."""
    near_tie = 0.75  # the largest gap seen here was 0.43
    reference = llama_cpp.Llama(str(embedded_gguf_path()), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    assert len(PROMPTS) >= 20
    exact = 0
    for prompt in PROMPTS:
        ids = gemma.tokenizer.encode(prompt)
        reference.reset()
        reference.eval(ids)
        theirs = np.asarray(reference.scores[len(ids) - 1], dtype=np.float64)
        with torch.no_grad():
            ours = gemma.model(torch.tensor([ids]))[0, -1].double().numpy()
        top_ours, top_theirs = np.argsort(-ours)[:5], np.argsort(-theirs)[:5]
        assert top_ours[0] == top_theirs[0], f"{prompt!r}: top-1 ours {top_ours[0]}, llama.cpp {top_theirs[0]}"
        for token in set(top_ours) ^ set(top_theirs):
            assert abs(ours[token] - ours[top_ours[4]]) < near_tie, f"{prompt!r}: token {token} is no near-tie (ours)"
            assert abs(theirs[token] - theirs[top_theirs[4]]) < near_tie, f"{prompt!r}: token {token} is no near-tie (llama.cpp)"
        exact += set(top_ours) == set(top_theirs)
        assert np.corrcoef(ours, theirs)[0, 1] > 0.995
    assert exact >= len(PROMPTS) * 3 // 4, f"only {exact} of {len(PROMPTS)} prompts have identical top-5 sets"
