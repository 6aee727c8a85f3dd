"""Splits and the `instructkit data` command on the chapter's data."""

import json

from instructkit.data.records import load_records
from instructkit.data.split import split_records

from .conftest import run_cli


def test_chapter_split_sizes_and_order(chapter_data_path):
    records = load_records(chapter_data_path).records
    splits = split_records(records)
    assert (len(splits.train), len(splits.test), len(splits.val)) == (935, 110, 55)
    assert splits.train[0] == records[0] and splits.test[0] == records[935] and splits.val[-1] == records[-1]


def test_shuffle_seed_is_deterministic_and_changes_order(chapter_data_path):
    records = load_records(chapter_data_path).records
    first, again, other = (split_records(records, shuffle_seed=s) for s in (7, 7, 8))
    assert first == again and first.train != other.train
    assert sorted(map(json.dumps, first.train + first.test + first.val)) == sorted(map(json.dumps, records))


def test_test_split_matches_the_chapter_response_file(chapter_data_path):
    # The chapter's instruction-data-with-response.json holds its 110 test entries.
    reference = json.loads((chapter_data_path.parent / "instruction-data-with-response.json").read_text())
    test = split_records(load_records(chapter_data_path).records).test
    assert [(r["instruction"], r["input"], r["output"]) for r in test] == [
        (r["instruction"], r["input"], r["output"]) for r in reference
    ]


def test_data_command_reports_counts_and_writes_splits(chapter_data_path, tmp_path):
    out = tmp_path / "splits"
    result = run_cli("data", "--data", str(chapter_data_path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Loaded 1,100 records" in result.stdout
    assert "train 935 | test 110 | val 55" in result.stdout
    assert "Padding share of train batches (batch 8)" in result.stdout
    sizes = {name: len(json.loads((out / f"{name}.json").read_text())) for name in ("train", "test", "val")}
    assert sizes == {"train": 935, "test": 110, "val": 55}
    assert not list(out.glob("*.tmp"))


def test_data_command_refuses_a_max_length_that_leaves_nothing_to_learn(chapter_data_path):
    result = run_cli("data", "--data", str(chapter_data_path), "--mask-instructions", "--max-length", "30")
    assert result.returncode == 2
    assert "keep no supervised token" in result.stderr and len(result.stderr.splitlines()) == 1


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0 and "data" in result.stdout and "run" in result.stdout
