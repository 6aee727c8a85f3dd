"""Preference data for DPO: records with an instruction, an optional input, and a `chosen` and a
`rejected` response (JSON list or JSONL; other keys are kept); or conversations: `messages`
ending with the user message both responses answer (TRL's conversational `prompt` list and
one-message `chosen` / `rejected` lists too), rendered with the run's prompt style or template.

Validation is the instruction data's (data/records.py): one clear line per fault, or
--skip-invalid to drop and count. Pairs whose chosen and rejected responses are identical carry
no preference (6 in the chapter's file) and are dropped with a count, not an error. The split is
the chapter's (85 / 10 / 5 in file order).

Encoding: each pair becomes two examples, prompt + chosen and prompt + rejected (each followed by
the end token unless `append_eos` is off, as in the book). The prompt/response boundary comes
from token spans (the first token that ends past the prompt), not from a fixed offset; the
prompt's own tokens must be a prefix of the whole, else the pair is dropped and counted, as is a
pair whose response is truncated away by `max_length` (a zero-token response would give NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from instructkit.data.prompts import PromptStyle
from instructkit.data.records import CONTROL_TOKEN_LITERALS, RecordProblem, _kind, format_problems, parse_records
from instructkit.data.sources import resolve_source
from instructkit.data.split import Splits, split_records
from instructkit.data.tokenize import IGNORE_INDEX, EncodedExample
from instructkit.errors import UserError
from instructkit.models.tokenizer import Tokenizer

FIELDS = ("instruction", "input", "chosen", "rejected")


@dataclass
class Preferences:
    path: Path
    records: list[dict]
    splits: Splits
    skipped_invalid: int = 0
    identical: int = 0  # pairs dropped because chosen == rejected


def _conversation_preference(value: dict) -> tuple[dict | None, str | None]:
    """{"messages": [... ending with a user message], "chosen": str, "rejected": str}, or TRL's
    conversational form {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}.
    The messages are checked as training conversations are (data/conversations.py)."""
    from instructkit.data.conversations import Columns, normalize_conversation

    key = "messages" if "messages" in value else "prompt"
    raw = value.get(key)
    if not isinstance(raw, list) or not raw or not isinstance(raw[-1], dict) or raw[-1].get("role") != "user":
        return None, f"field {key!r} must end with a user message (the one the responses answer)"
    # Checked with a stand-in answer after it: a conversation to train on must have one.
    normalized, problem = normalize_conversation({"messages": [*raw, {"role": "assistant", "content": "."}]}, "messages",
                                                 Columns(), CONTROL_TOKEN_LITERALS)
    if problem is not None:
        return None, f"field {key!r}: {problem}"
    messages = normalized["messages"][:-1]
    answers = {}
    for name in ("chosen", "rejected"):
        answer = value.get(name)
        if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict) and answer[0].get("role") == "assistant":
            answer = answer[0].get("content")
        if not isinstance(answer, str) or not answer.strip():
            return None, f"field '{name}' must be a non-empty string (or one assistant message)"
        if (literal := next((c for c in CONTROL_TOKEN_LITERALS if c in answer), None)) is not None:
            return None, f"field '{name}' contains the literal control token {literal!r}"
        answers[name] = answer
    rest = {k: v for k, v in value.items() if k not in ("messages", "prompt", "chosen", "rejected")}
    return {**rest, "messages": messages, **answers, "instruction": messages[-1]["content"], "input": ""}, None


def check_preference(value: object) -> tuple[dict | None, str | None]:
    if isinstance(value, dict) and ("messages" in value or isinstance(value.get("prompt"), list)):
        return _conversation_preference(value)
    if not isinstance(value, dict):
        return None, f"is {_kind(value)}, expected an object with 'instruction', 'chosen' and 'rejected'"
    for name in ("instruction", "chosen", "rejected"):
        if name not in value:
            return None, f"missing key '{name}'"
    for name in FIELDS:
        if name in value and not isinstance(value[name], str):
            return None, f"field '{name}' is {_kind(value[name])}, expected a string"
    for name in ("instruction", "chosen", "rejected"):
        if not value[name].strip():
            return None, f"empty {name}"
    for name in FIELDS:
        for literal in CONTROL_TOKEN_LITERALS:
            if literal in value.get(name, ""):
                return None, f"field '{name}' contains the literal control token {literal!r}"
    return {**value, "input": value.get("input", "")}, None


def load_preferences(source: str, *, skip_invalid: bool = False) -> Preferences:
    path = resolve_source(source)
    records, problems = [], []
    for where, value in parse_records(path):
        record, fault = check_preference(value)
        if fault is not None:
            problems.append(RecordProblem(where, fault))
        else:
            records.append(record)
    if problems and not skip_invalid:
        raise UserError(format_problems(path, problems))
    kept = [r for r in records if r["chosen"] != r["rejected"]]
    if not kept:
        raise UserError(f"{path}: no preference pair with different chosen and rejected responses")
    # The split is taken over the file's records, as the chapter does, before identical pairs go.
    splits = split_records(records)
    differ = lambda part: [r for r in part if r["chosen"] != r["rejected"]]  # noqa: E731
    return Preferences(path, kept, Splits(differ(splits.train), differ(splits.test), differ(splits.val)),
                       skipped_invalid=len(problems), identical=len(records) - len(kept))


@dataclass(frozen=True)
class EncodedPair:
    chosen: EncodedExample
    rejected: EncodedExample


@dataclass
class PairReport:
    pairs: int = 0
    not_prefix: int = 0
    truncated_away: int = 0
    dropped_indices: list[int] = field(default_factory=list)


def _encode_response(prompt: str, response: str, style: PromptStyle, tokenizer: Tokenizer, *, append_eos: bool,
                     max_length: int | None) -> EncodedExample | None:
    # Rendered text: an earlier answer's end token (a conversation's) is read as that token.
    ids, ends = tokenizer.encode_rendered(prompt + response)
    start = next((i for i, end in enumerate(ends) if end > len(prompt)), len(ids))
    prompt_ids = tokenizer.encode_prompt(prompt)
    if ids[: len(prompt_ids)] != prompt_ids or start != len(prompt_ids):
        return None
    if append_eos:
        ids.append(style.end_token_id(tokenizer))
    if max_length is not None:
        ids = ids[: max_length + 1]
    labels = [IGNORE_INDEX] * start + ids[start:]
    return EncodedExample(ids, labels, start)


def encode_pairs(records: list[dict], style: PromptStyle, tokenizer: Tokenizer, *, append_eos: bool = True,
                 max_length: int | None = None) -> tuple[list[EncodedPair], PairReport]:
    """Both responses of every pair, supervised on the response (and end token) only."""
    report, pairs = PairReport(), []
    for index, record in enumerate(records):
        prompt = style.conversation(record["messages"], tokenizer.eos_text) if "messages" in record else style.prompt(record)
        chosen = _encode_response(prompt, record["chosen"], style, tokenizer, append_eos=append_eos, max_length=max_length)
        rejected = _encode_response(prompt, record["rejected"], style, tokenizer, append_eos=append_eos, max_length=max_length)
        report.pairs += 1
        if chosen is None or rejected is None:
            report.not_prefix += 1
            report.dropped_indices.append(index)
            continue
        if chosen.num_supervised == 0 or rejected.num_supervised == 0:
            report.truncated_away += 1
            report.dropped_indices.append(index)
            continue
        pairs.append(EncodedPair(chosen, rejected))
    return pairs, report
