"""Few-shot prompts for scoring a base model fairly.

A base model was never tuned to answer in a prompt style, so asking it zero-shot measures its
formatting, not what it knows. Its row in a report uses k solved examples from the training
split instead (of the same task family when records carry `task`), written in the same prompt
style before the question, and its answer is the first non-empty line of what it writes
(`first_line`): a base model keeps going after answering, typically with another example.
"""

from __future__ import annotations

import random

from instructkit.data.prompts import PromptStyle

DEFAULT_SHOTS = 3


def pick_shots(entry: dict, pool: list[dict], k: int, seed: int = 0) -> list[dict]:
    """k training records for `entry`: from its task family when there is one, drawn with a
    generator seeded by the seed and the entry's text, so the choice does not depend on order."""
    family = [record for record in pool if record.get("task") == entry.get("task")] if entry.get("task") else pool
    candidates = [record for record in (family or pool) if record["instruction"] != entry["instruction"]]
    rng = random.Random(f"{seed}|{entry['instruction']}|{entry.get('input', '')}")
    return rng.sample(candidates, min(k, len(candidates)))


def few_shot_prompt(style: PromptStyle, entry: dict, shots: list[dict]) -> str:
    """The shots, each a prompt followed by its answer and a blank line, then the question."""
    solved = "".join(style.prompt(shot) + shot["output"] + "\n\n" for shot in shots)
    return solved + style.prompt(entry)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.split("\n") if line.strip()), "")
