"""The built-in verifiable dataset: deterministic, varied, leak-free, exactly scorable."""

import collections
import json
import re

from instructkit.data.builtin import FAMILIES, generate_builtin
from instructkit.data.split import split_records
from instructkit.evaluate.checks import passes, score_checks

from .conftest import run_cli


def test_same_seed_same_bytes_other_seed_differs():
    first = json.dumps(generate_builtin(300, seed=1)).encode()
    assert first == json.dumps(generate_builtin(300, seed=1)).encode()
    assert first != json.dumps(generate_builtin(300, seed=2)).encode()


def test_families_phrasings_and_lengths():
    records = generate_builtin()
    assert len(records) == 1100 and len(FAMILIES) >= 12
    families = collections.Counter(r["task"] for r in records)
    assert len(families) == len(FAMILIES) and min(families.values()) >= 1100 // len(FAMILIES)
    for family in families:
        phrasings = {re.sub(r"'[^']*'|[\d-]+", "", r["instruction"]) for r in records if r["task"] == family}
        assert len(phrasings) >= 2, family
        assert any(r["input"] for r in records if r["task"] == family), family
    assert any(not r["input"] for r in records) and max(len(r["output"]) for r in records) < 120


def test_every_answer_passes_its_own_check_and_a_wrong_one_fails():
    for record in generate_builtin(600, seed=3):
        assert passes(record["check"], record["output"]), record
        assert not passes(record["check"], "definitely wrong 123456"), record


def test_no_test_prompt_leaks_into_train_or_validation():
    splits = split_records(generate_builtin())
    prompt = lambda r: (r["instruction"], r["input"])  # noqa: E731
    seen = {prompt(r) for r in splits.train + splits.val}
    assert not any(prompt(r) in seen for r in splits.test)


def test_every_split_has_the_families_in_equal_shares():
    splits = split_records(generate_builtin())
    for part in (splits.train, splits.test, splits.val):
        counts = collections.Counter(r["task"] for r in part)
        assert len(counts) == len(FAMILIES) and max(counts.values()) - min(counts.values()) <= 2, counts


def test_scoring_user_records_with_checks():
    entries = [{"instruction": "q", "task": "mine", "check": {"type": "number", "answer": 4}, "model_response": "4 apples"},
               {"instruction": "r", "task": "mine", "check": {"type": "number", "answer": 4}, "model_response": "five"}]
    assert score_checks(entries)["families"]["mine"]["accuracy"] == 0.5


def test_data_command_shows_families_and_splits():
    result = run_cli("data", "--data", "builtin")
    assert result.returncode == 0, result.stderr
    assert "train 935 | test 110 | val 55" in result.stdout
    assert "arithmetic" in result.stdout and "spelling" in result.stdout
    bad = run_cli("data", "--data", "builtin:abc")
    assert bad.returncode == 2 and "builtin:N" in bad.stderr
