"""Reading and validating Alpaca-style instruction records.

A record is an object with `instruction` (string), optional `input` (string, "" when absent)
and `output` (string). Other keys (`model_response`, `task`, `check`, ...) are kept untouched.
Files are a JSON list of such objects, or JSONL with one object per line.

File-level faults (bad UTF-8, broken JSON, a top level that is not a list) raise `UserError`
at once with the file and position. Record-level faults are collected as `RecordProblem`s so
the caller can report all of them, or drop the bad rows with `skip_invalid`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from instructkit.errors import UserError

REQUIRED_FIELDS = ("instruction", "output")
TEXT_FIELDS = ("instruction", "input", "output")

# Literal control tokens that must never appear inside data: a model trained on them learns to
# stop (or start a turn) in the middle of a response, and the chapter's collate would mask them.
CONTROL_TOKEN_LITERALS = (
    "<|endoftext|>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|end|>",
    "<|user|>",
    "<|assistant|>",
)


# A record's optional `check` (how to score a response exactly; evaluate/checks.py scores it):
# type -> the type(s) its answer must have.
CHECK_ANSWER_TYPES = {"exact": (str,), "exact_case": (str,), "number": (int, float), "set": (list,), "json": (dict, list)}


def check_problem(check: object) -> str | None:
    """What is wrong with a `check` object, or None."""
    if not isinstance(check, dict):
        return f"'check' is {_kind(check)}, expected an object like {{\"type\": \"exact\", \"answer\": \"...\"}}"
    kind = check.get("type")
    if kind not in CHECK_ANSWER_TYPES:
        return f"'check' has type {kind!r}; choose from {', '.join(CHECK_ANSWER_TYPES)}"
    if "answer" not in check:
        return f"'check' of type {kind!r} has no 'answer'"
    answer = check["answer"]
    if isinstance(answer, bool) or not isinstance(answer, CHECK_ANSWER_TYPES[kind]):
        return f"'check' of type {kind!r} needs an answer of type {CHECK_ANSWER_TYPES[kind][0].__name__}, got {_kind(answer)}"
    if kind == "number":
        tolerance = check.get("tolerance", 0)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
            return "'check' tolerance must be a non-negative number"
        if check.get("take", "first") not in ("first", "last"):
            return "'check' take must be 'first' or 'last'"
    return None


@dataclass(frozen=True)
class RecordProblem:
    where: str  # "record 12" for JSON lists, "line 7" for JSONL
    fault: str

    def __str__(self) -> str:
        return f"{self.where}: {self.fault}"


@dataclass
class LoadedRecords:
    path: Path
    records: list[dict]
    problems: list[RecordProblem]
    skipped: int = 0


def read_text_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}: line {line}, byte {exc.start}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
            "save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # tolerate a UTF-8 byte-order mark


def _is_jsonl(path: Path, text: str) -> bool:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    if path.suffix.lower() == ".json":
        return False
    return not text.lstrip().startswith("[")


def parse_records(path: Path) -> list[tuple[str, object]]:
    """Return (location, value) pairs for every record in the file, or raise UserError."""
    text = read_text_utf8(path)
    if _is_jsonl(path, text):
        rows: list[tuple[str, object]] = []
        # Only "\n" ends a JSONL line: splitlines() would also break inside strings on U+2028/U+2029/U+0085.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {number}, column {exc.colno}: invalid JSON ({exc.msg})") from None
        return rows
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    if not isinstance(value, list):
        raise UserError(
            f"{path}: the top-level JSON value is {_kind(value)}, expected a list of records "
            '(e.g. [{"instruction": ..., "input": ..., "output": ...}])'
        )
    return [(f"record {index}", item) for index, item in enumerate(value)]


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def check_record(value: object) -> tuple[dict | None, str | None]:
    """Normalise one record or say what is wrong with it."""
    if not isinstance(value, dict):
        return None, f"is {_kind(value)}, expected an object with 'instruction' and 'output'"
    for field in REQUIRED_FIELDS:
        if field not in value:
            return None, f"missing key '{field}'"
    for field in TEXT_FIELDS:
        if field in value and not isinstance(value[field], str):
            return None, f"field '{field}' is {_kind(value[field])}, expected a string"
    if not value["instruction"].strip():
        return None, "empty instruction"
    if not value["output"].strip():
        return None, "empty output"
    for field in TEXT_FIELDS:
        for literal in CONTROL_TOKEN_LITERALS:
            if literal in value.get(field, ""):
                return None, f"field '{field}' contains the literal control token {literal!r}"
    if "check" in value and (problem := check_problem(value["check"])) is not None:
        return None, problem
    record = dict(value)
    record.setdefault("input", "")
    return record, None


def load_records(path: Path, *, skip_invalid: bool = False) -> LoadedRecords:
    """Parse and validate a file. With skip_invalid, bad rows are dropped and counted."""
    records: list[dict] = []
    problems: list[RecordProblem] = []
    first_seen: dict[tuple[str, str, str], str] = {}
    for where, value in parse_records(path):
        record, fault = check_record(value)
        if record is not None:
            key = (record["instruction"], record["input"], record["output"])
            if key in first_seen:
                fault = f"exact duplicate of {first_seen[key]}"
            else:
                first_seen[key] = where
        if fault is not None:
            problems.append(RecordProblem(where, fault))
            continue
        records.append(record)
    if not records and not problems:
        raise UserError(f"{path}: contains no records")
    loaded = LoadedRecords(path=path, records=records, problems=problems)
    if skip_invalid:
        loaded.skipped = len(problems)
    elif problems:
        raise UserError(format_problems(path, problems))
    if not loaded.records:
        raise UserError(f"{path}: all {len(problems)} records are invalid (first: {problems[0]})")
    return loaded


def format_problems(path: Path, problems: list[RecordProblem], limit: int = 10) -> str:
    if len(problems) == 1:
        return f"{path}: {problems[0]}"
    shown = "\n".join(f"{path}: {problem}" for problem in problems[:limit])
    more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{shown}{more}\n{path}: {len(problems)} invalid records (fix them, or pass --skip-invalid to drop them)"
