"""Baselines that need no model, per task family: how much of a family a prior solves.

- majority: always give the family's most common test answer. It is the best any constant answer
  can score on these entries (an upper bound of "answer what is usually right").
- rules: the one-line heuristics each built-in family lists (always "1", copy the input, "add -s",
  the first item...); the best of them is reported with its name.

A fine-tuned model is worth something in a family only where it beats both.
"""

from __future__ import annotations

from collections import Counter

from instructkit.data.builtin_families import FAMILY_BY_NAME
from instructkit.evaluate.checks import passes


def _accuracy(entries: list[dict], answer_for) -> float:
    return sum(passes(entry["check"], answer_for(entry)) for entry in entries) / len(entries)


def family_baselines(entries: list[dict]) -> dict[str, dict]:
    """{family: {"majority": accuracy, "majority_answer": text, "rules": {name: accuracy}}} for
    entries that carry a `check`."""
    by_family: dict[str, list[dict]] = {}
    for entry in entries:
        if isinstance(entry.get("check"), dict):
            by_family.setdefault(entry.get("task", "all"), []).append(entry)
    result = {}
    for family, members in sorted(by_family.items()):
        answers = Counter(str(entry["check"].get("answer")) for entry in members)
        majority_answer = answers.most_common(1)[0][0]
        rules = {}
        if family in FAMILY_BY_NAME:
            rules = {name: _accuracy(members, rule) for name, rule in FAMILY_BY_NAME[family].rules}
        result[family] = {"majority": _accuracy(members, lambda entry: majority_answer),
                          "majority_answer": majority_answer, "rules": rules}
    return result


def best_rule(baseline: dict) -> tuple[str, float] | None:
    if not baseline["rules"]:
        return None
    name = max(baseline["rules"], key=baseline["rules"].get)
    return name, baseline["rules"][name]
