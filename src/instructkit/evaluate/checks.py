"""Exact scoring of entries that carry a `check` (the builtin dataset, or a user's own).

A check is an object: {"type": "exact", "answer": "..."} (case, outer spaces and a final period
ignored), {"type": "exact_case", "answer": "..."} (only outer spaces ignored), {"type": "number",
"answer": 3.5, "tolerance": 0.01} (the first number in the response; with "take": "last", the last,
for answers that show their working), {"type": "set", "answer":
["a", "b"]} (comma- or line-separated items, any order) or {"type": "json", "answer": {...}}.
"""

from __future__ import annotations

import json
import re

from instructkit.evaluate.stats import bootstrap_mean_ci

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _clean(text: str) -> str:
    return " ".join(text.strip().strip(".").split()).lower()


def passes(check: dict, response: str) -> bool:
    """Whether `response` passes `check` (a check validated by data/records.check_problem)."""
    kind = check.get("type")
    answer = check.get("answer")
    if kind == "exact":
        return _clean(response) == _clean(str(answer))
    if kind == "exact_case":  # letter case is the point of the task
        return response.strip() == str(answer).strip()
    if kind == "number":
        found = _NUMBER.findall(response.replace(",", ""))
        if not found:
            return False
        value = found[-1] if check.get("take") == "last" else found[0]
        return abs(float(value) - float(answer)) <= float(check.get("tolerance", 1e-9))
    if kind == "set":
        items = {_clean(part) for part in re.split(r"[,\n;]", response) if part.strip()}
        return items == {_clean(str(a)) for a in answer}
    if kind == "json":
        try:
            return json.loads(response) == answer
        except json.JSONDecodeError:
            return False
    raise ValueError(f"unknown check type {kind!r}")  # records.check_problem rejects these on load


def score_checks(entries: list[dict]) -> dict | None:
    """Accuracy overall and per task family, with 95% intervals; None if no entry has a check."""
    checked = [e for e in entries if isinstance(e.get("check"), dict)]
    if not checked:
        return None
    outcomes = [(e.get("task", "all"), passes(e["check"], e["model_response"])) for e in checked]
    mean, low, high = bootstrap_mean_ci([float(ok) for _, ok in outcomes])
    families = {}
    for family in sorted({f for f, _ in outcomes}):
        values = [float(ok) for f, ok in outcomes if f == family]
        m, lo, hi = bootstrap_mean_ci(values)
        families[family] = {"n": len(values), "accuracy": m, "ci95": [lo, hi]}
    failures = [{"instruction": e["instruction"], "expected": e["check"].get("answer"), "response": e["model_response"]}
                for e, (_, ok) in zip(checked, outcomes) if not ok]
    return {"n": len(checked), "accuracy": mean, "ci95": [low, high], "families": families, "failures": failures[:50]}
