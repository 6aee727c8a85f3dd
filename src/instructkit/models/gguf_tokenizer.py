"""Tokenizers stored in GGUF files -> HF `tokenizers` objects that give llama.cpp's token ids.

A SentencePiece-style vocabulary (`tokenizer.ggml.model = llama`, as Gemma's) becomes an HF
`tokenizers` BPE whose merges are ranked by the score of the merged piece, which is how
llama.cpp's SPM tokenizer picks merges; user-defined pieces (whitespace runs, HTML tags) and
control tokens are matched whole before BPE, as llama.cpp does. GPT-2 style vocabularies
(`tokenizer.ggml.model = gpt2`) carry their merges and use byte-level BPE.
"""

from __future__ import annotations

from pathlib import Path

from instructkit.errors import UserError

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


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
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

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
        merges = [tuple(m.split(" ", 1)) for m in _array(reader, "tokenizer.ggml.merges")]
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    else:
        raise UserError(f"{path}: tokenizer model {kind!r} is not supported (supported: llama/SentencePiece, gpt2)")
    # Matched whole in raw text before BPE, as llama.cpp does; never normalised.
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL])
    return backend


def special_token_names(reader) -> dict[str, str | None]:
    tokens = _array(reader, "tokenizer.ggml.tokens")

    def name(key: str) -> str | None:
        index = _field(reader, key)
        return str(tokens[int(index)]) if index is not None else None

    bos = name("tokenizer.ggml.bos_token_id") if _field(reader, "tokenizer.ggml.add_bos_token", False) else None
    eos = name("tokenizer.ggml.eos_token_id")
    pad = name("tokenizer.ggml.padding_token_id") or eos
    return {"eos": eos, "pad": pad, "bos": bos}
