from __future__ import annotations

import numpy as np
import pytest

from agencyfl.federation.metrics import exact_metrics, metrics_from_histograms, score_histograms


def brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_exact_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.3).astype(int)
    scores = np.round(rng.random(400) * 0.5 + 0.4 * labels, 2)  # many ties
    m = exact_metrics(scores, labels)
    assert m.auc == pytest.approx(brute_auc(scores, labels), abs=1e-12)
    assert m.accuracy == pytest.approx(((scores >= 0.5) == labels).mean())
    assert m.brier == pytest.approx(np.mean((scores - labels) ** 2))


def test_pooled_histograms_match_exact_metrics_on_the_pooled_records() -> None:
    rng = np.random.default_rng(1)
    parts = []
    for shift in (0.1, 0.3, -0.1):  # three agencies with different score distributions
        labels = (rng.random(3000) < 0.25).astype(int)
        scores = np.clip(rng.normal(0.3 + shift + 0.3 * labels, 0.15), 0, 1)
        parts.append((scores, labels))
    hists = [score_histograms(s, y) for s, y in parts]
    pooled = metrics_from_histograms(
        np.sum([h[0] for h in hists], axis=0), np.sum([h[1] for h in hists], axis=0), sum(h[2] for h in hists)
    )
    exact = exact_metrics(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    assert pooled.auc == pytest.approx(exact.auc, abs=1e-3)
    assert pooled.brier == pytest.approx(exact.brier, rel=1e-12)
    assert pooled.n == exact.n and pooled.positives == exact.positives
    assert pooled.accuracy == pytest.approx(exact.accuracy, abs=1e-12)
