"""Judge-free metrics of responses against reference outputs.

exact match (after stripping), normalised match (lower case, punctuation, articles and extra
whitespace removed, as in SQuAD), ROUGE-L F1 on normalised words, chrF and BLEU (sacrebleu,
corpus level, plus sentence chrF per entry), and response lengths.
"""

from __future__ import annotations

import re
import statistics
import string
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(response: str, reference: str) -> float:
    """ROUGE-L F1 on normalised words."""
    hyp, ref = normalize(response).split(), normalize(reference).split()
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass
class EntryMetrics:
    exact: bool
    normalized: bool
    rouge_l: float
    chrf: float
    response_words: int
    reference_words: int


def entry_metrics(response: str, reference: str) -> EntryMetrics:
    from sacrebleu.metrics import CHRF

    return EntryMetrics(
        exact=response.strip() == reference.strip(),
        normalized=normalize(response) == normalize(reference),
        rouge_l=rouge_l(response, reference),
        chrf=CHRF().sentence_score(response, [reference]).score,
        response_words=len(response.split()),
        reference_words=len(reference.split()),
    )


def summarize(responses: list[str], references: list[str]) -> tuple[dict, list[EntryMetrics]]:
    from sacrebleu.metrics import BLEU, CHRF

    entries = [entry_metrics(r, ref) for r, ref in zip(responses, references)]
    n = len(entries)
    lengths = [e.response_words for e in entries]
    summary = {
        "entries": n,
        "exact_match": sum(e.exact for e in entries) / n,
        "normalized_match": sum(e.normalized for e in entries) / n,
        "rouge_l": sum(e.rouge_l for e in entries) / n,
        "chrf": CHRF().corpus_score(responses, [references]).score,
        "bleu": BLEU().corpus_score(responses, [references]).score,
        "empty_responses": sum(1 for r in responses if not r.strip()),
        "response_words_mean": statistics.fmean(lengths),
        "response_words_median": statistics.median(lengths),
        "reference_words_mean": statistics.fmean(e.reference_words for e in entries),
    }
    return summary, entries
