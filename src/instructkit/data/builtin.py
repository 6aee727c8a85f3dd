"""A built-in instruction dataset whose every answer can be checked exactly, with no leak between
its splits.

`builtin` (or `builtin:N`, `builtin:N:SEED`) generates N records (default 1,100, like the
chapter's) from the 15 task families in builtin_families.py, deterministically: the same N and
seed give the same bytes. Records are Alpaca-style plus `task` (the family), `check` (how to score
a response; see evaluate/checks.py) and `key` (the semantic key: the underlying question, however
it is worded).

The file is laid out for the chapter's split (first 85% train, next 10% test, last 5% validation,
in file order), and three rules hold by construction, each tested:
  - no key appears in two splits: every key belongs to one split (a seeded hash of the key), and
    a record is only placed where its key belongs, so a test question is never a training
    question in other words;
  - no (input, output) pair of a record with an input appears in two splits;
  - answers are balanced: within a split, no answer makes up more than 30% of a family, and in
    the test and validation splits no answer appears more than twice per family, so always giving
    the most common answer scores at most 2 of a family's 7-8 test entries.
Records come in blocks of one per family, so every split holds the families in equal shares.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter

from instructkit.data.builtin_families import FAMILIES, Family
from instructkit.errors import UserError

DEFAULT_COUNT, DEFAULT_SEED = 1100, 0
# Shares of keys given to each split. Test and validation get more keys than their share of
# records, so families with few questions (12 months x 2 directions) still have some there.
KEY_SHARES = (("train", 0.78), ("test", 0.14), ("val", 0.08))
MAX_SHARE_OF_ONE_ANSWER = 0.3
MAX_REPEATS_IN_HELD_OUT = 2  # per answer and family, in the test and validation splits


def semantic_key(family: Family, question: tuple) -> str:
    return f"{family.name}:{json.dumps(list(question))}"


def key_split(key: str, seed: int) -> str:
    """The one split a key may appear in: a seeded hash of the key, so it does not depend on the
    order of generation."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    for name, share in KEY_SHARES:
        if u < share:
            return name
        u -= share
    return KEY_SHARES[-1][0]


def split_sizes(count: int) -> dict[str, int]:
    """The chapter's split arithmetic (data/split.py), for a file of `count` records."""
    train = int(count * 0.85)
    test = int(count * 0.10)
    return {"train": train, "test": test, "val": count - train - test}


def answer_of(record: dict) -> str:
    answer = record["check"]["answer"]
    return json.dumps(answer, sort_keys=True) if isinstance(answer, dict) else str(answer).strip().lower()


class _Placement:
    """What has been placed so far, to enforce the three rules above."""

    def __init__(self, sizes: dict[str, int]):
        self.cap = {name: max(MAX_REPEATS_IN_HELD_OUT, math.ceil(MAX_SHARE_OF_ONE_ANSWER * size / len(FAMILIES)))
                    for name, size in sizes.items()}
        self.cap["test"] = self.cap["val"] = MAX_REPEATS_IN_HELD_OUT
        self.answers: Counter = Counter()  # (split, family, answer) -> count
        self.prompts: set[tuple[str, str]] = set()
        self.pair_split: dict[tuple[str, str], str] = {}

    def accepts(self, record: dict, split: str) -> bool:
        if (record["instruction"], record["input"]) in self.prompts:
            return False
        if self.answers[(split, record["task"], answer_of(record))] >= self.cap[split]:
            return False
        pair = (record["input"], record["output"])
        return not record["input"] or self.pair_split.get(pair, split) == split

    def add(self, record: dict, split: str) -> None:
        self.prompts.add((record["instruction"], record["input"]))
        self.answers[(split, record["task"], answer_of(record))] += 1
        if record["input"]:
            self.pair_split[(record["input"], record["output"])] = split


def _draw_for_split(family: Family, split: str, rng: random.Random, seed: int, placement: _Placement,
                    attempts: int = 5000) -> dict:
    for _ in range(attempts):
        question = family.draw(rng)
        key = semantic_key(family, question)
        if key_split(key, seed) != split:
            continue
        record = {**family.render(question, rng), "task": family.name, "key": key}
        record = {name: record[name] for name in ("instruction", "input", "output", "task", "check", "key")}
        if placement.accepts(record, split):
            placement.add(record, split)
            return record
    raise UserError(f"builtin: cannot make another distinct {family.name} example for the {split} split; "
                    "ask for fewer examples")


def generate_builtin(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[dict]:
    """N records in blocks that hold one record of every family (each block in a seeded random
    order), every record drawn from the keys of the split its position falls in."""
    if count < 2 * len(FAMILIES):
        raise UserError(f"builtin:{count}: ask for at least {2 * len(FAMILIES)} examples")
    rng = random.Random(seed)
    placement = _Placement(split_sizes(count))
    return in_blocks(count, FAMILIES, rng, lambda family, split: _draw_for_split(family, split, rng, seed, placement))


def in_blocks(count: int, families: list, rng: random.Random, draw) -> list[dict]:
    """`count` records in blocks that hold one record of every family (each block in a seeded
    random order); `draw(family, split)` makes each for the split its position falls in."""
    sizes = split_sizes(count)
    boundaries = [("train", sizes["train"]), ("test", sizes["train"] + sizes["test"]), ("val", count)]
    records: list[dict] = []
    while len(records) < count:
        block = list(families)
        rng.shuffle(block)
        for family in block[: count - len(records)]:
            split = next(name for name, end in boundaries if len(records) < end)
            records.append(draw(family, split))
    return records


def parse_builtin_spec(source: str) -> tuple[int, int] | None:
    """'builtin' -> (1100, 0); 'builtin:N' -> (N, 0); 'builtin:N:SEED' -> (N, SEED); else None."""
    if source != "builtin" and not source.startswith("builtin:"):
        return None
    parts = source.split(":")[1:]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"{source}: expected builtin, builtin:N or builtin:N:SEED with whole numbers") from None
    if len(values) > 2 or any(v < 0 for v in values):
        raise UserError(f"{source}: expected builtin, builtin:N or builtin:N:SEED")
    return (values[0] if values else DEFAULT_COUNT, values[1] if len(values) > 1 else DEFAULT_SEED)
