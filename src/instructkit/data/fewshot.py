"""Few-shot prompts for scoring a base model fairly.

A base model was never tuned to answer in a prompt style, so asking it zero-shot measures its
formatting, not what it knows. Its row in a report uses k solved examples from the training
split instead (of the same task family when records carry `task`), written as earlier turns of
a conversation in the same prompt style (prompts.py's multi-turn rule) before the question, and its answer is the first non-empty line of what it writes
(`first_line`): a base model keeps going after answering, typically with another example.
"""

from __future__ import annotations

import random

from instructkit.data.prompts import PromptStyle

DEFAULT_SHOTS = 3
# The style a base model's few-shot prompt is written in, chosen on the built-in validation split:
# Gemma 3 270M base answered 20.0% correctly with Alpaca's plain-text headers and 3.6% with
# Gemma's turn markers, after which the base model (never tuned on them) writes stray tokens
# instead of <end_of_turn>.
BASE_MODEL_STYLE = "alpaca"


def pick_shots(entry: dict, pool: list[dict], k: int, seed: int = 0) -> list[dict]:
    """k training records for `entry`: from its task family when there is one, drawn with a
    generator seeded by the seed and the entry's text, so the choice does not depend on order."""
    family = [record for record in pool if record.get("task") == entry.get("task")] if entry.get("task") else pool
    candidates = [record for record in (family or pool) if record["instruction"] != entry["instruction"]]
    rng = random.Random(f"{seed}|{entry['instruction']}|{entry.get('input', '')}")
    return rng.sample(candidates, min(k, len(candidates)))


def few_shot_prompt(style: PromptStyle, entry: dict, shots: list[dict]) -> str:
    """The shots as earlier exchanges of a conversation (the style's multi-turn rule), then the question."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": style.user_content(shot)}, {"role": "assistant", "content": shot["output"]}]
    return style.conversation(messages + [{"role": "user", "content": style.user_content(entry)}])


def first_line(text: str) -> str:
    return next((line.strip() for line in text.split("\n") if line.strip()), "")
