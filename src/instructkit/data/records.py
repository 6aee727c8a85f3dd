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
import math
import re
from dataclasses import dataclass
from pathlib import Path

from instructkit.errors import UserError

REQUIRED_FIELDS = ("instruction", "output")
# Records are flat; a `check` answer may nest a little. Deeper is a damaged or hostile file (json's
# parser itself gives up near 1,000 levels with a RecursionError).
MAX_DEPTH = 100
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')
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


def _finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float's range
        return False


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
        if not _finite(answer):  # NaN never equals a number: the record could never pass
            return f"'check' answer {_short(answer)} is not a finite number"
        tolerance = check.get("tolerance", 0)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not _finite(tolerance) or tolerance < 0:
            return f"'check' tolerance must be a non-negative number, got {_short(tolerance)}"
        if check.get("take", "first") not in ("first", "last"):
            return "'check' take must be 'first' or 'last'"
    if kind in ("set", "json") and (bad := _non_finite(answer)) is not None:
        return f"'check' answer holds {bad}, which no response can match"
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _non_finite(value: object) -> str | None:
    """The first NaN or infinity inside a JSON value, as text, or None (values are nested at most
    MAX_DEPTH levels: structure_problem has checked)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return repr(item)
        stack.extend(item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
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
    format: str = "alpaca"  # alpaca, messages or sharegpt (conversations are read into "messages")


class _DuplicateKeys(dict):
    """A JSON object in which a key appeared more than once (json keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    seen: set[str] = set()
    marked = _DuplicateKeys(value)
    marked.duplicates = tuple(key for key, _ in pairs if key in seen or seen.add(key))
    return marked


def _loads(text: str) -> object:
    return json.loads(text, object_pairs_hook=_json_object)


def structure_problem(value: object) -> str | None:
    """What no record may hold whatever its fields: a key given twice, a lone surrogate escape
    ("\\ud800" is no character: writing it as UTF-8 fails later, mid-run), or nesting deeper than
    MAX_DEPTH. Walked with a stack, not recursion, so no depth can crash the walk itself."""
    stack: list[tuple[object, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, field = stack.pop()  # field: the record's key the item sits under, for the message
        where = f"field {field!r} " if field else ""
        if depth > MAX_DEPTH:
            return f"{where}nested deeper than {MAX_DEPTH} levels"
        if isinstance(item, str):
            if (match := _SURROGATE.search(item)) is not None:
                return f"{where}holds a lone surrogate escape (\\u{ord(match.group()):04x}), which is not a character"
        elif isinstance(item, dict):
            if isinstance(item, _DuplicateKeys):
                inside = f" inside field {field!r}" if field else ""
                return f"the key {item.duplicates[0]!r} appears twice{inside} (JSON would keep only the last, silently)"
            for key, child in item.items():
                stack += [(key, depth + 1, field or key), (child, depth + 1, field or key)]
        elif isinstance(item, list):
            stack.extend((child, depth + 1, field) for child in item)
    return None


def _too_deep(text: str) -> tuple[int, int, int]:
    """Where `text` first nests deeper than MAX_DEPTH: (line, column, index of the top-level list
    item), found by a scan of brackets outside strings (run only after the parser gave up)."""
    depth = item = 0
    for token in _JSON_TOKENS.finditer(text):
        mark = token.group()
        if mark in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                line = text.count("\n", 0, token.start()) + 1
                return line, token.start() - text.rfind("\n", 0, token.start()), item
        elif mark in "]}":
            depth -= 1
        elif mark == "," and depth == 1:
            item += 1
    return 1, 1, 0


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


TABLE_SUFFIXES = (".parquet", ".arrow", ".csv")


def _table_rows(path: Path) -> list[tuple[str, object]]:
    """Rows of a Parquet, Arrow (the `datasets` library's files: IPC stream or file) or CSV file,
    as (\"row N\", object) pairs; nested columns (a list of messages) stay lists of objects."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            import csv

            with open(path, newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.DictReader(handle))
        else:
            import pyarrow as pa

            if suffix == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(path)
            else:
                with pa.memory_map(str(path)) as source:
                    try:
                        table = pa.ipc.open_stream(source).read_all()
                    except pa.ArrowInvalid:
                        table = pa.ipc.open_file(source).read_all()
            rows = table.to_pylist()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: byte {exc.start}: not valid UTF-8; save the file as UTF-8") from None
    except Exception as exc:  # pyarrow's and csv's many error types: one line naming the file
        raise UserError(f"{path}: not a readable {suffix[1:]} file ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    # A missing value in a table is a null (or "" in CSV); a record without the field reads the same.
    return [(f"row {index}", {key: value for key, value in row.items() if value is not None})
            for index, row in enumerate(rows)]


def parse_records(path: Path, *, keep_faulty: bool = False) -> list[tuple[str, object]]:
    """Return (location, value) pairs for every record in the file, or raise UserError. A record
    with a `structure_problem` raises too, unless `keep_faulty` (load_records reports it with the
    other record faults, so --skip-invalid can drop it)."""
    rows = _table_rows(path) if path.suffix.lower() in TABLE_SUFFIXES else _parse(path, read_text_utf8(path))
    if not keep_faulty:
        for where, value in rows:
            if (problem := structure_problem(value)) is not None:
                raise UserError(f"{path}: {where}: {problem}")
    return rows


def _parse(path: Path, text: str) -> list[tuple[str, object]]:
    if _is_jsonl(path, text):
        rows: list[tuple[str, object]] = []
        # Only "\n" ends a JSONL line: splitlines() would also break inside strings on U+2028/U+2029/U+0085.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", _loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {number}, column {exc.colno}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise UserError(f"{path}: line {number}, column {_too_deep(line)[1]}: JSON nested deeper than "
                                f"{MAX_DEPTH} levels") from None
        return rows
    try:
        value = _loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        line, column, item = _too_deep(text)
        raise UserError(f"{path}: record {item} (line {line}, column {column}): JSON nested deeper than "
                        f"{MAX_DEPTH} levels") from None
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
    if (problem := structure_problem(value)) is not None:
        return None, problem
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


def load_records(path: Path, *, skip_invalid: bool = False, fmt: str = "auto", columns=None) -> LoadedRecords:
    """Parse and validate a file. With skip_invalid, bad rows are dropped and counted. `fmt`:
    alpaca, messages, sharegpt (data/conversations.py), or auto (from the first record);
    `columns`: a conversations.Columns for other field names."""
    from instructkit.data.conversations import FORMATS, Columns, detect_format, normalize_conversation

    columns = columns or Columns()
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    records: list[dict] = []
    problems: list[RecordProblem] = []
    first_seen: dict[object, str] = {}
    rows = parse_records(path, keep_faulty=True)
    if fmt == "auto":
        found = next((f for f in (detect_format(value, columns) for _, value in rows) if f is not None), None)
        if found is None and rows and isinstance(rows[0][1], dict):
            raise UserError(f"{path}: {rows[0][0]}: neither Alpaca (instruction, output), OpenAI messages (messages) "
                            f"nor ShareGPT (conversations): its keys are {', '.join(map(repr, list(rows[0][1])[:6]))}; "
                            "name the fields with --columns or the format with --format")
        fmt = found or "alpaca"
    for where, value in rows:
        if fmt == "alpaca":
            record, fault = check_record(value)
            key = (record["instruction"], record["input"], record["output"]) if record is not None else None
        else:
            if (fault := structure_problem(value)) is None:
                record, fault = normalize_conversation(value, fmt, columns, CONTROL_TOKEN_LITERALS)
                if fault is not None and (other := detect_format(value, columns)) not in (None, fmt):
                    fault = f"is a {other} record in a {fmt} file"
            else:
                record = None
            key = json.dumps(record["messages"], ensure_ascii=False) if record is not None else None
        if record is not None:
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
    loaded = LoadedRecords(path=path, records=records, problems=problems, format=fmt)
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
