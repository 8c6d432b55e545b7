"""Evaluation metrics, exact and from score histograms.

In federated evaluation each agency sends only per-label histograms of its validation scores and the
sum of squared errors; the coordinator computes pooled AUC, accuracy and Brier score from those
aggregates, so no per-record score leaves an agency. With ``BINS`` bins the AUC differs from the
exact value only through ties inside a bin (counted as half, as in the Mann-Whitney statistic).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BINS = 1000  # an even number, so that 0.5 is a bin edge and accuracy at 0.5 is exact


@dataclass(frozen=True)
class Metrics:
    """AUC, accuracy at threshold 0.5, Brier score, and the counts behind them."""

    auc: float
    accuracy: float
    brier: float
    n: int
    positives: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict, for JSON."""
        return asdict(self)


def score_histograms(scores: np.ndarray, labels: np.ndarray, bins: int = BINS) -> tuple[list[int], list[int], float]:
    """Per-label histograms of ``scores`` in [0, 1] over ``bins`` equal bins, and the squared-error sum."""
    idx = np.clip((np.asarray(scores) * bins).astype(int), 0, bins - 1)
    labels = np.asarray(labels).astype(bool)
    pos = np.bincount(idx[labels], minlength=bins)
    neg = np.bincount(idx[~labels], minlength=bins)
    brier_sum = float(np.sum((np.asarray(scores) - labels) ** 2))
    return pos.astype(int).tolist(), neg.astype(int).tolist(), brier_sum


def metrics_from_histograms(pos: np.ndarray, neg: np.ndarray, brier_sum: float) -> Metrics:
    """Pooled metrics from summed histograms (see ``score_histograms``; any even number of bins).

    Noised histograms (DP releases) are clipped at zero first: post-processing, no privacy cost.
    """
    pos = np.clip(np.asarray(pos, dtype=np.float64), 0.0, None)
    neg = np.clip(np.asarray(neg, dtype=np.float64), 0.0, None)
    brier_sum = max(0.0, float(brier_sum))
    n_pos, n_neg = pos.sum(), neg.sum()
    n = int(round(n_pos + n_neg))
    if n == 0 or n_pos + n_neg <= 0:
        return Metrics(float("nan"), float("nan"), float("nan"), 0, 0)
    # P(score_pos > score_neg) + 0.5 P(tie), ties = same bin.
    neg_below = np.cumsum(neg) - neg
    auc = float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg)) if n_pos and n_neg else float("nan")
    half = len(pos) // 2
    correct = pos[half:].sum() + neg[:half].sum()
    total = n_pos + n_neg
    return Metrics(auc, float(correct / total), float(min(1.0, brier_sum / total)), n, int(round(n_pos)))


def exact_metrics(scores: np.ndarray, labels: np.ndarray) -> Metrics:
    """Metrics from per-record scores (for a file scored locally), AUC by the rank statistic."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n, n_pos = len(scores), int(labels.sum())
    n_neg = n - n_pos
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(n, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    auc = float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)) if n_pos and n_neg else float("nan")
    accuracy = float(((scores >= 0.5) == labels).mean()) if n else float("nan")
    brier = float(np.mean((scores - labels) ** 2)) if n else float("nan")
    return Metrics(auc, accuracy, brier, n, n_pos)
