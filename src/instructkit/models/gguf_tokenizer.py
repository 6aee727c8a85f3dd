"""Tokenizers stored in GGUF files -> HF `tokenizers` objects that give llama.cpp's token ids.

A SentencePiece-style vocabulary (`tokenizer.ggml.model = llama`, as Gemma's) becomes an HF
`tokenizers` BPE whose merges are ranked by the score of the merged piece, which is how
llama.cpp's SPM tokenizer picks merges; user-defined pieces (whitespace runs, HTML tags) and
control tokens are matched whole before BPE, as llama.cpp does. Byte-level BPE vocabularies
(`tokenizer.ggml.model = gpt2`: GPT-2, SmolLM2, Llama 3, Qwen2) carry their merges; the text is
first split into words by the regexes llama.cpp picks from `tokenizer.ggml.pre` (BPE_PRE), each
regex splitting the pieces the one before it left, exactly as llama.cpp's `unicode_regex_split`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from instructkit.errors import UserError
from instructkit.models.tokenizer import choose_pad

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# llama.cpp's pre-tokenizers for byte-level BPE (src/llama-vocab.cpp, `llm_tokenizer_bpe`) ---------
# Written as llama.cpp writes them (its regex engine has no `(?i:...)`, hence '[sS]' in place of it).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one


@dataclass(frozen=True)
class BPEPre:
    regexes: tuple[str, ...]
    # llama.cpp takes a word that is itself a token whole, without merging (Llama 3's tokenizer.json
    # says the same with `ignore_merges`).
    ignore_merges: bool = False
    # llama.cpp's default for `add_bos_token` when the GGUF does not say.
    add_bos: bool = False


_DEFAULT = BPEPre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_GPT2_PRE = BPEPre((_GPT2,))
_SMOLLM = BPEPre((r"\p{N}", _GPT2))  # digits one by one, then GPT-2's words
_LLAMA3_PRE = BPEPre((_LLAMA3,), ignore_merges=True, add_bos=True)
# `tokenizer.ggml.pre` -> its pre-tokenizer; the first name of each is the one export writes.
BPE_PRE: dict[str, BPEPre] = {
    "default": _DEFAULT,
    "gpt-2": _GPT2_PRE, "phi-2": _GPT2_PRE, "olmo": _GPT2_PRE, "mpt": _GPT2_PRE,
    "smollm": _SMOLLM, "starcoder": _SMOLLM, "refact": _SMOLLM, "codeshell": _SMOLLM,
    "llama-bpe": _LLAMA3_PRE, "llama3": _LLAMA3_PRE, "llama-v3": _LLAMA3_PRE,
    "dbrx": BPEPre((_LLAMA3,)), "smaug-bpe": BPEPre((_LLAMA3,)),  # cl100k words, merges always applied
    "qwen2": BPEPre((_QWEN2,)), "deepseek-r1-qwen": BPEPre((_QWEN2,)), "stablelm2": BPEPre((_QWEN2,)),
}
# How the same splits are written in HF tokenizer.json files (Llama 3, Qwen2: `(?i:...)` and a
# trailing `|\s+` in ByteLevel's own regex, which change nothing): for export's detection.
_HF_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_HF_QWEN2 = _HF_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def bpe_pre_tokenizer(pre: str, path: Path | str):
    """The HF pre-tokenizer that splits text into words as llama.cpp does for `tokenizer.ggml.pre`:
    each regex splits the pieces left by the one before (matches and the text between them both
    become pieces), then bytes are mapped to GPT-2's printable characters."""
    from tokenizers import Regex, pre_tokenizers

    if pre not in BPE_PRE:
        raise UserError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(BPE_PRE)})")
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in BPE_PRE[pre].regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def llama_cpp_pre_name(pre_tokenizer: dict | None, ignore_merges: bool) -> str | None:
    """The `tokenizer.ggml.pre` whose splits equal those of a tokenizer.json `pre_tokenizer` (its
    JSON), or None when llama.cpp has none that does: for GGUF export."""
    steps = [] if pre_tokenizer is None else pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    signature = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            signature.append(("bytelevel", step.get("use_regex", True)))
        elif kind == "Digits":
            signature.append(("digits", step.get("individual_digits", False)))
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert") and "Regex" in step["pattern"]:
            signature.append(("split", step["pattern"]["Regex"]))
        else:
            return None
    known = {
        ((("bytelevel", True),), False): "gpt-2",
        ((("digits", True), ("bytelevel", True)), False): "smollm",
        ((("split", _HF_LLAMA3), ("bytelevel", False)), True): "llama-bpe",
        ((("split", _HF_LLAMA3), ("bytelevel", False)), False): "dbrx",
        ((("split", _HF_QWEN2), ("bytelevel", False)), False): "qwen2",
    }
    for name, pre in reversed(BPE_PRE.items()):  # our own GGUF-built tokenizers; first names win
        known[(tuple(("split", regex) for regex in pre.regexes) + (("bytelevel", False),), pre.ignore_merges)] = name
    return known.get((tuple(signature), ignore_merges))


# GGUF metadata ---------------------------------------------------------------------------------
def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _array(reader, key: str) -> list:
    field = reader.fields.get(key)
    if field is None:
        return []
    return field.contents()


def _pre(reader) -> str:
    return str(_field(reader, "tokenizer.ggml.pre", "") or "default")  # llama.cpp: missing -> "default"


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece-BPE scoring: a merge ranks by the merged piece's score."""
    mergeable = {token: score for token, score, kind in zip(tokens, scores, types) if kind == NORMAL}
    merges: list[tuple[float, float, str, str]] = []
    for piece, score in mergeable.items():
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in mergeable and right in mergeable:
                merges.append((score, mergeable[left] + mergeable[right], left, right))
    merges.sort(key=lambda m: (m[0], m[1]), reverse=True)
    return [(left, right) for _, _, left, right in merges]


def tokenizer_from_gguf(reader, path: Path):
    """Build an HF `tokenizers.Tokenizer` from the GGUF's vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = [str(t) for t in _array(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _array(reader, "tokenizer.ggml.token_type")] or [NORMAL] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    if kind == "llama":
        scores = [float(s) for s in _array(reader, "tokenizer.ggml.scores")]
        unk = tokens[int(_field(reader, "tokenizer.ggml.unknown_token_id", 0))]
        backend = Tokenizer(
            models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=unk,
                       byte_fallback=True, fuse_unk=True)
        )
        if _field(reader, "tokenizer.ggml.add_space_prefix", False):
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    elif kind == "gpt2":
        pre = _pre(reader)
        pre_tokenizer = bpe_pre_tokenizer(pre, path)  # an unknown pre type stops here, in one line
        merges = [tuple(m.split(" ", 1)) for m in _array(reader, "tokenizer.ggml.merges")]
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=BPE_PRE[pre].ignore_merges))
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()
    else:
        raise UserError(f"{path}: tokenizer model {kind!r} is not supported (supported: llama/SentencePiece, gpt2)")
    # Matched whole in raw text before BPE, as llama.cpp does; never normalised.
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL])
    return backend


# Token texts llama.cpp ends generation on wherever they are in a vocabulary (llama-vocab.cpp,
# `special_eog_ids`), beside the eos, eot, eom and fill-in-the-middle ids the GGUF names.
_END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                      "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")


def special_token_names(reader, path: Path | str | None = None) -> dict:
    """The GGUF's special tokens as token texts, as llama.cpp reads them:

    eos: the end-of-sequence token; pad: the padding token (the GGUF's, else one that is not an
    end token, else eos); bos: the beginning-of-sequence token if BOS is added to every text, else
    None; eos_extra: the other tokens llama.cpp ends generation on (its EOT/EOM ids and the
    end-of-turn texts it knows, such as "<|im_end|>" and "<|endoftext|>"), for `stop_ids`;
    eot: the end-of-turn token the GGUF names (`tokenizer.ggml.eot_token_id`), else None (llama.cpp
    then guesses one by name in hash order; eos_extra holds every candidate); add_bos: whether BOS
    is added (`tokenizer.ggml.add_bos_token`, else llama.cpp's default for the tokenizer kind).
    The keys eos, pad, bos and eos_extra make a "tokenizer.json" tokenizer reference; `path`
    names the file in errors."""
    tokens = [str(t) for t in _array(reader, "tokenizer.ggml.tokens")]

    def name(key: str) -> str | None:
        index = _field(reader, key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    kind = _field(reader, "tokenizer.ggml.model")
    default_add_bos = kind == "llama" or (kind == "gpt2" and BPE_PRE.get(_pre(reader), _DEFAULT).add_bos)
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", default_add_bos))
    bos = name("tokenizer.ggml.bos_token_id")
    eos = name("tokenizer.ggml.eos_token_id")
    where = path or "the GGUF file"
    if eos is None:
        raise UserError(f"{where}: no end-of-sequence token (tokenizer.ggml.eos_token_id)")
    if add_bos and bos is None:
        raise UserError(f"{where}: tokenizer.ggml.add_bos_token is true but there is no tokenizer.ggml.bos_token_id")
    present = set(tokens)
    eot = name("tokenizer.ggml.eot_token_id")
    ends = [name(f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom", "fim_pad", "fim_rep", "fim_sep")]
    ends += [t for t in _END_OF_GENERATION if t in present]
    eos_extra = list(dict.fromkeys(t for t in ends if t is not None and t != eos))
    pad = name("tokenizer.ggml.padding_token_id") or choose_pad(present, {eos, *eos_extra, bos})
    return {"eos": eos, "pad": pad or eos, "bos": bos if add_bos else None, "eos_extra": eos_extra,
            "eot": eot, "add_bos": add_bos}
