"""Validation of instruction files: one clear line per fault, nothing written on failure."""

import json

import pytest

from instructkit.data.records import load_records
from instructkit.errors import UserError

from .conftest import run_cli

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


def _write(tmp_path, name, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _error(path) -> str:
    with pytest.raises(UserError) as info:
        load_records(path)
    return str(info.value)


def test_missing_output_names_the_record(tmp_path):
    path = _write(tmp_path, "d.json", json.dumps([GOOD, {"instruction": "x", "input": ""}]))
    assert _error(path) == f"{path}: record 1: missing key 'output'"


@pytest.mark.parametrize(
    "record, fault",
    [
        ({"instruction": "x", "output": 3}, "field 'output' is a number, expected a string"),
        ({"instruction": "x", "input": None, "output": "y"}, "field 'input' is null, expected a string"),
        ({"instruction": "x", "output": "   "}, "empty output"),
        ({"instruction": "x", "output": "a<|endoftext|>b"}, "field 'output' contains the literal control token '<|endoftext|>'"),
        ({"instruction": "<end_of_turn>", "output": "y"}, "field 'instruction' contains the literal control token '<end_of_turn>'"),
        ("just text", "is a string, expected an object with 'instruction' and 'output'"),
        (GOOD, "exact duplicate of record 0"),
    ],
)
def test_record_faults(tmp_path, record, fault):
    path = _write(tmp_path, "d.json", json.dumps([GOOD, record]))
    assert _error(path) == f"{path}: record 1: {fault}"


def test_top_level_object(tmp_path):
    path = _write(tmp_path, "d.json", json.dumps({"data": [GOOD]}))
    assert "top-level JSON value is an object, expected a list" in _error(path)


def test_broken_json_names_line_and_column(tmp_path):
    path = _write(tmp_path, "d.json", '[\n  {"instruction": "a",\n   "output": "b"\n  ,\n]')
    message = _error(path)
    assert message.startswith(f"{path}: line 5, column 1: invalid JSON")


def test_jsonl_cut_line_names_the_line(tmp_path):
    lines = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(10)]
    lines[6] = lines[6][:15]
    path = _write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    assert _error(path).startswith(f"{path}: line 7, column")


def test_jsonl_record_fault_names_the_line(tmp_path):
    lines = [json.dumps({"instruction": "q", "output": "a"}), json.dumps({"instruction": "q2"})]
    path = _write(tmp_path, "d.jsonl", "\n".join(lines))
    assert _error(path) == f"{path}: line 2: missing key 'output'"


def test_latin1_bytes(tmp_path):
    path = _write(tmp_path, "d.json", '[{"instruction": "caf\u00e9", "output": "x"}]'.encode("latin-1"))
    assert _error(path) == f"{path}: line 1, byte 21: not valid UTF-8 (byte 0xe9); save the file as UTF-8"


def test_skip_invalid_drops_and_counts(tmp_path):
    records = [GOOD, {"instruction": "x"}, {"instruction": "y", "output": ""}, {"instruction": "z", "output": "w"}]
    path = _write(tmp_path, "d.json", json.dumps(records))
    loaded = load_records(path, skip_invalid=True)
    assert loaded.skipped == 2 and [r["instruction"] for r in loaded.records] == ["Say hi.", "z"]
    assert loaded.records[1]["input"] == ""


def test_many_problems_are_all_listed(tmp_path):
    path = _write(tmp_path, "d.json", json.dumps([GOOD] + [{"instruction": str(i)} for i in range(3)]))
    message = _error(path)
    assert "record 1: missing key" in message and "record 3: missing key" in message
    assert message.endswith("3 invalid records (fix them, or pass --skip-invalid to drop them)")


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.json", json.dumps([GOOD, {"instruction": "x"}]), "record 1: missing key 'output'"),
        ("object.json", json.dumps({"a": 1}), "top-level JSON value is an object"),
        ("cut.jsonl", "\n".join([json.dumps(GOOD | {"output": str(i)}) for i in range(6)] + ['{"instruction": "a", "outp']), "line 7, column"),
        ("latin.json", b'[{"instruction": "\xe9", "output": "x"}]', "not valid UTF-8"),
    ],
)
def test_cli_exits_nonzero_with_one_line_and_writes_nothing(tmp_path, name, content, expected):
    path = _write(tmp_path, name, content)
    out = tmp_path / "out"
    result = run_cli("data", "--data", str(path), "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("instructkit: error: ") and expected in lines[0]
    assert str(path) in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()


def test_cli_missing_file_is_one_line(tmp_path):
    result = run_cli("data", "--data", str(tmp_path / "nope.json"))
    assert result.returncode == 2 and "no such file" in result.stderr and len(result.stderr.splitlines()) == 1


def test_jsonl_lines_end_only_at_newline(tmp_path):
    """U+2028, U+2029 and U+0085 are legal raw inside JSON strings (ensure_ascii=False writes them);
    str.splitlines() would break records there."""
    from instructkit.fileio import append_jsonl, read_jsonl

    odd = {"instruction": "Line\u2028separator, paragraph\u2029and next-line\u0085here.", "input": "", "output": "ok\u2028."}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD, ensure_ascii=False) + "\n" + json.dumps(odd, ensure_ascii=False) + "\r\n",
                    encoding="utf-8")
    assert [r["instruction"] for r in load_records(path).records] == [GOOD["instruction"], odd["instruction"]]
    rows = tmp_path / "rows.jsonl"
    append_jsonl(rows, [odd, GOOD])
    with open(rows, "a", encoding="utf-8") as handle:
        handle.write('{"torn": ')  # a kill mid-write leaves a torn last line
    assert read_jsonl(rows) == [odd, GOOD]


@pytest.mark.parametrize(
    "check, fault",
    [
        ("exact", "'check' is a string, expected an object"),
        ({"type": "fuzzy", "answer": "x"}, "'check' has type 'fuzzy'; choose from exact"),
        ({"type": "number"}, "'check' of type 'number' has no 'answer'"),
        ({"type": "number", "answer": "four"}, "'check' of type 'number' needs an answer of type int, got a string"),
        ({"type": "number", "answer": 4, "tolerance": -1}, "'check' tolerance must be a non-negative number"),
        ({"type": "set", "answer": "a, b"}, "'check' of type 'set' needs an answer of type list"),
    ],
)
def test_malformed_check_is_one_line_naming_the_record(tmp_path, check, fault):
    path = _write(tmp_path, "d.json", json.dumps([GOOD, {**GOOD, "instruction": "Other.", "check": check}]))
    assert _error(path).startswith(f"{path}: record 1: {fault}")
    result = run_cli("data", "--data", str(path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "record 1" in result.stderr


DEEP = "[" * 100_000 + "]" * 100_000  # json's parser gives up near 1,000 levels with a RecursionError


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("surrogate.json", '[{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "a\\ud800b", "output": "x"}]',
         "record 1: field 'instruction' holds a lone surrogate escape (\\ud800)"),
        ("surrogate-key.jsonl", '{"instruction": "a", "output": "x", "note\\udfff": 1}\n',
         "line 1: field 'note\\udfff' holds a lone surrogate escape (\\udfff)"),
        ("duplicate.json", '[{"instruction": "Say hi.", "output": "Hi.", "output": "Bye."}]',
         "record 0: the key 'output' appears twice"),
        ("duplicate-check.jsonl", '{"instruction": "a", "output": "4", "check": {"type": "number", "answer": 4, "answer": 5}}\n',
         "line 1: the key 'answer' appears twice inside field 'check'"),
        ("deep.json", '[{"instruction": "a", "output": "b"},\n{"instruction": "c", "output": "d", "x": ' + DEEP + "}]",
         "record 1 (line 2, column 140): JSON nested deeper than 100 levels"),
        ("deep.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d", "x": ' + DEEP + "}\n",
         "line 2, column 141: JSON nested deeper than 100 levels"),
        ("deepish.json", '[{"instruction": "c", "output": "d", "x": ' + "[" * 200 + "]" * 200 + "}]",
         "record 0: field 'x' nested deeper than 100 levels"),
    ],
)
def test_hostile_records_are_one_line_naming_the_record(tmp_path, name, content, expected):
    """Each of these loaded today as a traceback (surrogate: later, when written as UTF-8; depth:
    RecursionError) or silently (a duplicate key: the last one won)."""
    path = _write(tmp_path, name, content)
    assert expected in _error(path)
    out = tmp_path / "out"
    result = run_cli("data", "--data", str(path), "--out", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0] and str(path) in lines[0], result.stderr
    assert not out.exists()


def test_a_faulty_record_is_dropped_by_skip_invalid(tmp_path):
    other = {**GOOD, "instruction": "Say bye."}
    path = _write(tmp_path, "d.json", "[" + json.dumps(GOOD) + ', {"instruction": "x", "output": "y", "output": "z"}, '
                  + '{"instruction": "\\ud800", "output": "y"}, ' + json.dumps(other) + "]")
    loaded = load_records(path, skip_invalid=True)
    assert loaded.records == [GOOD, other] and loaded.skipped == 2


@pytest.mark.parametrize(
    "check, fault",
    [
        ('{"type": "number", "answer": NaN}', "'check' answer nan is not a finite number"),
        ('{"type": "number", "answer": -Infinity}', "'check' answer -inf is not a finite number"),
        ('{"type": "number", "answer": 4, "tolerance": NaN}', "'check' tolerance must be a non-negative number, got nan"),
        ('{"type": "number", "answer": 4, "tolerance": Infinity}', "'check' tolerance must be a non-negative number, got inf"),
        ('{"type": "number", "answer": 1' + "0" * 400 + "}", "'check' answer 1000000000000000000000000000000000000... is not"),
        ('{"type": "json", "answer": {"a": [1, NaN]}}', "'check' answer holds nan, which no response can match"),
    ],
)
def test_non_finite_check_answers_are_one_line_naming_the_record(tmp_path, check, fault):
    """NaN passed validation (`nan < 0` is False) and made a record no response could ever pass."""
    path = _write(tmp_path, "d.json", "[" + json.dumps(GOOD) + ', {"instruction": "Other.", "output": "4", "check": ' + check + "}]")
    assert _error(path) == f"{path}: record 1: {fault}" or _error(path).startswith(f"{path}: record 1: {fault}")
    result = run_cli("data", "--data", str(path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "record 1" in result.stderr
