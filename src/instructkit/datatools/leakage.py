"""`instructkit leakage`: test records that are (nearly) training records.

Checked for every test record against every training record (a conversation as its joined user
turns and joined answers), each leak listed with its indices:
  - exact: the whole record, and the instruction alone, after normalisation;
  - near: the instruction, and the input where either record has one, each at or above a cutoff by
    rapidfuzz's `cdist` (the normalised Indel ratio, 0-100) or by the TF-IDF cosine
    (`--method tfidf`). Both parts must be near: a templated instruction with another input
    ("Rewrite the sentence using a simile." for another sentence) is another question;
  - n-gram: outputs sharing a run of 13 words (the contamination check of GPT-3 and its successors).

The split that prevents such leaks is data/split.py's grouped split (`--group-near-duplicates`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from instructkit.data.conversations import comparison_fields
from instructkit.data.similarity import normalize

NGRAM = 13


@dataclass
class Leaks:
    train: int
    test: int
    exact_record: list[tuple[int, int]] = field(default_factory=list)
    exact_instruction: list[tuple[int, int]] = field(default_factory=list)
    near: list[tuple[int, int, float]] = field(default_factory=list)
    ngram: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def leaked_test_records(self) -> set[int]:
        """Test records with an exact, near or 13-gram twin in training. The same instruction alone
        (a task with other content) is listed, not counted."""
        return {t for t, _ in self.exact_record} | {t for t, _, _ in self.near} | {t for t, _, _ in self.ngram}

    def summary(self) -> dict:
        return {"train": self.train, "test": self.test, "exact_record": len(self.exact_record),
                "exact_instruction": len(self.exact_instruction), "near": len(self.near), "ngram_13": len(self.ngram),
                "leaked_test_records": len(self.leaked_test_records)}


def prompt_text(record: dict) -> str:
    return record.get("instruction", "") + ("\n" + record["input"] if record.get("input") else "")


def _ngrams(text: str) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    return {tuple(words[k : k + NGRAM]) for k in range(len(words) - NGRAM + 1)}


def _similarity(test_texts: list[str], train_texts: list[str], method: str, chunk: int) -> np.ndarray:
    """(test, train) similarities: rapidfuzz's ratio (0-100) or the TF-IDF cosine (0-1)."""
    if method == "rapidfuzz":
        from rapidfuzz import fuzz, process

        return process.cdist(test_texts, train_texts, scorer=fuzz.ratio, dtype=np.float32, workers=-1)
    from instructkit.data.similarity import tfidf

    matrix = tfidf(train_texts + test_texts)
    train_rows, test_rows = matrix[: len(train_texts)], matrix[len(train_texts):]
    return np.vstack([(test_rows[s : s + chunk] @ train_rows.T).toarray() for s in range(0, len(test_texts), chunk)]
                     or [np.zeros((0, len(train_texts)), dtype=np.float32)])


def find_leaks(train: list[dict], test: list[dict], *, cutoff: float = 90.0, method: str = "rapidfuzz",
               chunk: int = 256) -> Leaks:
    """Every (test index, train index) leak. `cutoff` is rapidfuzz's 0-100 ratio, or a cosine in
    (0, 1] with method "tfidf"."""
    train, test = [comparison_fields(r) for r in train], [comparison_fields(r) for r in test]
    leaks = Leaks(len(train), len(test))
    full = {normalize(prompt_text(r) + "\n" + r.get("output", "")): i for i, r in enumerate(train)}
    instruction = {normalize(r.get("instruction", "")): i for i, r in enumerate(train)}
    for t, record in enumerate(test):
        if (i := full.get(normalize(prompt_text(record) + "\n" + record.get("output", "")))) is not None:
            leaks.exact_record.append((t, i))
        if (i := instruction.get(normalize(record.get("instruction", "")))) is not None:
            leaks.exact_instruction.append((t, i))
    near = np.ones((len(test), len(train)), dtype=bool)
    scores = np.zeros((len(test), len(train)), dtype=np.float32)
    for name in ("instruction", "input"):
        train_texts = [normalize(r.get(name, "") or "") for r in train]
        test_texts = [normalize(r.get(name, "") or "") for r in test]
        similarity = _similarity(test_texts, train_texts, method, chunk)
        if name == "input":  # two empty inputs agree; one empty and one not differ
            both_empty = np.outer([not t for t in test_texts], [not t for t in train_texts])
            similarity = np.where(both_empty, 100.0 if method == "rapidfuzz" else 1.0, similarity)
        near &= similarity >= cutoff
        scores = similarity if name == "instruction" else np.minimum(scores, similarity)
    for t, i in zip(*np.nonzero(near)):
        leaks.near.append((int(t), int(i), float(scores[t, i])))
    owner: dict[tuple[str, ...], int] = {}
    for i, record in enumerate(train):
        for gram in _ngrams(record.get("output", "")):
            owner.setdefault(gram, i)
    for t, record in enumerate(test):
        for gram in _ngrams(record.get("output", "")):
            if gram in owner:
                leaks.ngram.append((t, owner[gram], " ".join(gram)))
                break
    return leaks
