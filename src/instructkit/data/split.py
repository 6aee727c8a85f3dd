"""Train / test / validation split.

The default is the chapter's: in file order, train = first int(0.85 n), test = next int(0.1 n),
validation = the rest (935 / 110 / 55 for the chapter's 1,100 records).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from instructkit.errors import UserError

SPLIT_NAMES = ("train", "test", "val")


@dataclass(frozen=True)
class Splits:
    train: list[dict]
    test: list[dict]
    val: list[dict]

    def by_name(self, name: str) -> list[dict]:
        if name not in SPLIT_NAMES:
            raise UserError(f"unknown split {name!r} (choose from: {', '.join(SPLIT_NAMES)})")
        return getattr(self, name)


def split_records(
    records: list[dict],
    *,
    train_fraction: float = 0.85,
    test_fraction: float = 0.10,
    shuffle_seed: int | None = None,
) -> Splits:
    if not (0 < train_fraction < 1 and 0 <= test_fraction < 1 and train_fraction + test_fraction <= 1):
        raise UserError(f"invalid split fractions: train {train_fraction}, test {test_fraction}")
    ordered = list(records)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(ordered)
    # The same arithmetic as the chapter, so the sizes match it exactly.
    train_end = int(len(ordered) * train_fraction)
    test_end = train_end + int(len(ordered) * test_fraction)
    return Splits(train=ordered[:train_end], test=ordered[train_end:test_end], val=ordered[test_end:])
