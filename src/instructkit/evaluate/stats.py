"""Statistics for scores: bootstrap confidence intervals and agreement between two judges."""

from __future__ import annotations

import numpy as np


def bootstrap_mean_ci(values: list[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and a percentile bootstrap interval."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(data.mean()), float(low), float(high)


def pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def _ranks(values) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    values = np.asarray(values, dtype=np.float64)
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    return pearson(_ranks(a), _ranks(b))


def kendall_tau_b(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    upper = np.triu_indices(len(a), k=1)
    da, db = da[upper], db[upper]
    concordant_minus_discordant = float((da * db).sum())
    pairs_a, pairs_b = float((da != 0).sum()), float((db != 0).sum())
    return concordant_minus_discordant / np.sqrt(pairs_a * pairs_b) if pairs_a and pairs_b else float("nan")
