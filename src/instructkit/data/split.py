"""Train / test / validation split.

The default is the chapter's: in file order, train = first int(0.85 n), test = next int(0.1 n),
validation = the rest (935 / 110 / 55 for the chapter's 1,100 records). `grouped_split` keeps
near-duplicate prompts together (see its docstring), so no test prompt has a near twin in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from instructkit.data.conversations import user_text
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


def grouped_split(records: list[dict], *, threshold: float = 0.8, train_fraction: float = 0.85,
                  test_fraction: float = 0.10) -> Splits:
    """The chapter's split, but with clusters of near-duplicate prompts kept on one side."""
    from instructkit.data.similarity import chunked_pairs, normalize, tfidf, UnionFind

    prompts = [user_text(r) for r in records]
    clusters = UnionFind(len(records))
    seen: dict[str, int] = {}
    for index, prompt in enumerate(prompts):
        key = normalize(prompt)
        if key in seen:
            clusters.union(seen[key], index)
        else:
            seen[key] = index
    for i, j, _ in chunked_pairs(tfidf(prompts), threshold):
        clusters.union(i, j)
    groups: dict[int, list[int]] = {}
    for index in range(len(records)):
        groups.setdefault(clusters.find(index), []).append(index)
    train_size = int(len(records) * train_fraction)
    test_size = int(len(records) * test_fraction)
    parts: dict[str, list[dict]] = {"train": [], "test": [], "val": []}
    for members in sorted(groups.values(), key=lambda g: g[0]):  # in file order of each cluster's first record
        side = "train" if len(parts["train"]) < train_size else "test" if len(parts["test"]) < test_size else "val"
        parts[side] += [records[i] for i in members]
    return Splits(parts["train"], parts["test"], parts["val"])
