"""Two response files on the same references, side by side, with a paired bootstrap.

For each metric the difference (ours - other) is computed on the same resampled items for both
systems, 2,000 times, and its 2.5th and 97.5th percentiles are the 95% interval: when the whole
interval is above zero, ours is better on that metric beyond what the choice of these 110 items
explains. Corpus metrics (chrF, BLEU) are recomputed from sacrebleu's per-sentence statistics on
every resample, as sacrebleu's own significance test does; ROUGE-L is a mean over items.
"""

from __future__ import annotations

import numpy as np

from instructkit.errors import UserError
from instructkit.evaluate.metrics import rouge_l

METRICS = ("rouge_l", "chrf", "bleu")


def _corpus_statistics(metric, responses: list[str], references: list[str]) -> np.ndarray:
    return np.asarray(metric._extract_corpus_statistics(responses, [references]), dtype=np.float64)


def _corpus_score(metric, statistics: np.ndarray) -> float:
    return metric._compute_score_from_stats(list(statistics.sum(axis=0))).score


def paired_bootstrap(ours: list[str], other: list[str], references: list[str], *, resamples: int = 2000,
                     seed: int = 0) -> dict[str, dict]:
    """{metric: {"ours", "other", "difference", "ci95": [low, high], "share_ours_better"}}."""
    from sacrebleu.metrics import BLEU, CHRF

    n = len(references)
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, n, size=(resamples, n))
    result = {}
    rouge_ours = np.array([rouge_l(r, ref) for r, ref in zip(ours, references)])
    rouge_other = np.array([rouge_l(r, ref) for r, ref in zip(other, references)])
    per_resample = {"rouge_l": (rouge_ours[samples].mean(axis=1), rouge_other[samples].mean(axis=1))}
    full = {"rouge_l": (float(rouge_ours.mean()), float(rouge_other.mean()))}
    for name, metric in (("chrf", CHRF()), ("bleu", BLEU())):
        stats_ours, stats_other = _corpus_statistics(metric, ours, references), _corpus_statistics(metric, other, references)
        full[name] = (_corpus_score(metric, stats_ours), _corpus_score(metric, stats_other))
        per_resample[name] = (np.array([_corpus_score(metric, stats_ours[s]) for s in samples]),
                              np.array([_corpus_score(metric, stats_other[s]) for s in samples]))
    for name in METRICS:
        difference = per_resample[name][0] - per_resample[name][1]
        low, high = np.percentile(difference, [2.5, 97.5])
        result[name] = {"ours": full[name][0], "other": full[name][1], "difference": full[name][0] - full[name][1],
                        "ci95": [float(low), float(high)], "share_ours_better": float((difference > 0).mean())}
    return result


def compare_entries(ours: list[dict], other: list[dict], *, top: int = 5) -> dict:
    """The paired bootstrap, per-item wins and losses (ROUGE-L), and the largest differences."""
    if len(ours) != len(other) or any((a["instruction"], a.get("input", ""), a["output"]) !=
                                      (b["instruction"], b.get("input", ""), b["output"]) for a, b in zip(ours, other)):
        raise UserError("the two response files must hold the same entries (instruction, input, output) in the same order")
    references = [entry["output"] for entry in ours]
    mine, theirs = [e["model_response"] for e in ours], [e["model_response"] for e in other]
    bootstrap = paired_bootstrap(mine, theirs, references)
    per_item = [rouge_l(a, ref) - rouge_l(b, ref) for a, b, ref in zip(mine, theirs, references)]
    order = np.argsort(per_item)
    pick = lambda index: {"index": int(index), "instruction": ours[index]["instruction"], "reference": references[index],  # noqa: E731
                          "ours": mine[index], "other": theirs[index], "rouge_l_difference": per_item[index]}
    return {"n": len(references), "metrics": bootstrap,
            "wins": sum(d > 0 for d in per_item), "ties": sum(d == 0 for d in per_item), "losses": sum(d < 0 for d in per_item),
            "largest_gains": [pick(i) for i in order[::-1][:top] if per_item[i] > 0],
            "largest_losses": [pick(i) for i in order[:top] if per_item[i] < 0]}
