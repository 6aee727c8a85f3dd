"""The data stages put together: source -> records -> splits -> encoded examples, with statistics."""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from instructkit.data.builtin import generate_builtin, parse_builtin_spec
from instructkit.data.builtin_chat import generate_builtin_chat, parse_builtin_chat_spec
from instructkit.data.batching import batches_in_order, chapter_shuffle_order, length_grouped_batches, padding_share
from instructkit.data.prompts import PromptStyle
from instructkit.data.records import LoadedRecords, load_records
from instructkit.data.sources import resolve_source
from instructkit.data.split import SPLIT_NAMES, Splits, grouped_split, split_records
from instructkit.data.tokenize import EncodedExample, EncodingReport, encode_records
from instructkit.fileio import atomic_write_json
from instructkit.models.tokenizer import Tokenizer


@dataclass
class PreparedData:
    source: str
    loaded: LoadedRecords
    splits: Splits

    @property
    def fingerprint(self) -> str:
        """sha256 of the validated records: the same data, whatever path or URL it came from."""
        text = json.dumps(self.loaded.records, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare_data(source: str, *, skip_invalid: bool = False, shuffle_seed: int | None = None,
                 group_near_duplicates: bool = False, fmt: str = "auto", columns: str | None = None) -> PreparedData:
    """Load, validate and split. `group_near_duplicates`: clusters of near-duplicate prompts stay on
    one side of the split (data/split.py's grouped_split), so none leaks into the test split.
    `fmt` and `columns`: the file's format and field names (data/conversations.py)."""
    from instructkit.data.conversations import Columns

    builtin, builtin_chat = parse_builtin_spec(source), parse_builtin_chat_spec(source)
    if builtin is not None:
        loaded = LoadedRecords(path=Path(source), records=generate_builtin(*builtin), problems=[])
    elif builtin_chat is not None:
        loaded = LoadedRecords(path=Path(source), records=generate_builtin_chat(*builtin_chat), problems=[], format="messages")
    else:
        loaded = load_records(resolve_source(source), skip_invalid=skip_invalid, fmt=fmt, columns=Columns.parse(columns))
    if group_near_duplicates:
        records = list(loaded.records)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(records)
        return PreparedData(source=source, loaded=loaded, splits=grouped_split(records))
    return PreparedData(source=source, loaded=loaded, splits=split_records(loaded.records, shuffle_seed=shuffle_seed))


def uses_rendering(data: PreparedData, style: PromptStyle, train_on: str | None) -> bool:
    """Conversations, a model's own template, or an explicit --train-on go through the renderer
    (data/rendering.py); Alpaca records in a named style keep the record path (data/tokenize.py),
    which gives the same ids and labels for them (tested) and the chapter's statistics."""
    return data.loaded.format != "alpaca" or style.chat_template is not None or train_on is not None


def default_train_on(data: PreparedData, style: PromptStyle, mask_instructions: bool) -> str:
    """--train-on when not given: answers only for conversations and a model's own template,
    else what --mask-instructions says."""
    conversations = data.loaded.format != "alpaca" or style.chat_template is not None
    return "assistant" if conversations or mask_instructions else "all"


def supervision_words(data: PreparedData, style: PromptStyle, train_on: str | None, mask_instructions: bool) -> str:
    """What the loss covers, in words (the data command and the run's data.json)."""
    if uses_rendering(data, style, train_on):
        chosen = train_on or default_train_on(data, style, mask_instructions)
        return "every answer and its end token" if chosen == "assistant" else "every token"
    return "the response and its end token" if mask_instructions else "every token (the chapter's default)"


def encode_splits(
    data: PreparedData,
    style: PromptStyle,
    tokenizer: Tokenizer,
    *,
    mask_instructions: bool = False,
    max_length: int | None = None,
    train_on: str | None = None,
    skip_invalid: bool = False,
) -> dict[str, tuple[list[EncodedExample], EncodingReport]]:
    """Each split's examples and its report: an EncodingReport (record path) or a
    ConversationReport (renderer path: mask coverage, truncation, records dropped)."""
    if uses_rendering(data, style, train_on):
        from instructkit.data.rendering import Renderer, encode_conversations

        train_on = train_on or default_train_on(data, style, mask_instructions)
        renderer = Renderer(tokenizer, style=style)
        return {name: encode_conversations(data.splits.by_name(name), renderer, train_on=train_on, max_length=max_length,
                                           skip_invalid=skip_invalid, source=f"{data.loaded.path} ({name} split)")
                for name in SPLIT_NAMES}
    return {
        name: encode_records(
            data.splits.by_name(name),
            style,
            tokenizer,
            mask_instructions=mask_instructions,
            max_length=max_length,
            source=f"{data.loaded.path} ({name} split)",
        )
        for name in SPLIT_NAMES
    }


def mask_summary(examples: list[EncodedExample], report) -> dict:
    """One split's mask coverage: supervised tokens per record (min / median / max), records cut
    to the length limit and records dropped. A ConversationReport counts answer tokens per record
    (a conversation may make several examples); on the record path a record is an example."""
    supervised = report.supervised if getattr(report, "supervised", None) is not None else [e.num_supervised for e in examples]
    counts = sorted(supervised) or [0]
    return {"records": len(supervised), "supervised_min": counts[0], "supervised_median": counts[len(counts) // 2],
            "supervised_max": counts[-1], "supervised_total": sum(supervised), "truncated": report.truncated,
            "dropped": getattr(report, "skipped", 0)}


@dataclass(frozen=True)
class LengthStats:
    count: int
    minimum: int
    median: float
    p95: float
    maximum: int
    supervised: int


def length_stats(examples: list[EncodedExample]) -> LengthStats | None:
    """Statistics of training positions per example (ids[:-1]: what the model reads)."""
    if not examples:
        return None
    lengths = sorted(len(example) - 1 for example in examples)
    p95_index = min(len(lengths) - 1, max(0, round(0.95 * (len(lengths) - 1))))
    return LengthStats(
        count=len(lengths),
        minimum=lengths[0],
        median=statistics.median(lengths),
        p95=lengths[p95_index],
        maximum=lengths[-1],
        supervised=sum(example.num_supervised for example in examples),
    )


def padding_shares(examples: list[EncodedExample], batch_size: int, seed: int = 123) -> dict[str, float]:
    """Padding share of the chapter's batching (shuffled, drop_last) and of length-grouped batches."""
    lengths = [len(example) for example in examples]
    chapter = batches_in_order(chapter_shuffle_order(len(examples), seed), batch_size, drop_last=True)
    grouped = length_grouped_batches(lengths, batch_size, seed=seed, drop_last=True)
    return {"chapter": padding_share(chapter, lengths), "length_grouped": padding_share(grouped, lengths)}


def write_splits(splits: Splits, out_dir: Path) -> list[Path]:
    return [atomic_write_json(Path(out_dir) / f"{name}.json", splits.by_name(name)) for name in SPLIT_NAMES]
