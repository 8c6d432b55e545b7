"""Empirical privacy: a lower bound on epsilon from a membership-inference game with canaries.

The one-run audit of Steinke, Nasr and Jagielski ("Privacy Auditing with One (1) Training Run",
NeurIPS 2023): ``m`` canaries are each included in training independently with probability 1/2; the
auditor scores every canary, guesses "in" for the ``k+`` highest scores and "out" for the ``k-``
lowest, and counts the ``v`` correct guesses out of ``r = k+ + k-``. If training is (epsilon, delta)-DP,
the number of correct guesses is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to a
delta term (their Theorem 3 and Appendix D), so an observed ``v`` that would be too unlikely under
that law refutes epsilon at the chosen confidence. The largest epsilon so refuted is the lower bound.

Independent training runs with disjoint canaries are one mechanism over all their canaries (each
canary touches one run only), so ``m`` counts the canaries of every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ``v`` or more correct guesses out of ``r`` if training is (epsilon, delta)-DP.

    Steinke, Nasr, Jagielski 2023, Appendix D: the Binomial tail plus ``2 m delta`` times the largest
    average of the Binomial's mass just below ``v``.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0:
        return min(tail, 1.0)
    worst, mass = 0.0, 0.0
    for i in range(1, v + 1):
        mass += float(stats.binom.pmf(v - i, r, q))
        worst = max(worst, mass / i)
    return min(tail + worst * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct guesses of ``r`` refute at ``confidence`` (0 if none)."""
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < alpha:
        high *= 2
        if high > 100:
            return high
    for _ in range(60):  # bisection: p_value grows with epsilon
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < alpha:
            low = mid
        else:
            high = mid
    return low


def clopper_pearson(v: int, r: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided confidence interval of a proportion ``v / r``."""
    alpha = 1.0 - confidence
    lo = 0.0 if v == 0 else float(stats.beta.ppf(alpha / 2, v, r - v + 1))
    hi = 1.0 if v == r else float(stats.beta.ppf(1 - alpha / 2, v + 1, r - v))
    return lo, hi


def _implied_epsilon(accuracy: float) -> float:
    """The epsilon of randomised response with this accuracy (0 at or below chance)."""
    if accuracy <= 0.5:
        return 0.0
    if accuracy >= 1.0:
        return math.inf
    return math.log(accuracy / (1.0 - accuracy))


@dataclass(frozen=True)
class GuessOutcome:
    """What the guessing game gave: counts, the lower bound, and the interval around the accuracy."""

    canaries: int
    guesses: int
    correct: int
    confidence: float
    epsilon_lower_bound: float
    accuracy: float
    accuracy_interval: tuple[float, float]
    epsilon_interval: tuple[float, float]  # implied by the accuracy interval (delta ignored)


def guess_and_bound(
    scores: list[float], included: list[bool], delta: float, guess_fraction: float = 0.25, confidence: float = 0.95
) -> GuessOutcome:
    """Guess membership from scores (top ``guess_fraction / 2`` in, bottom as many out) and bound epsilon.

    Parameters
    ----------
    scores
        One per canary; higher means "more likely trained on".
    included
        Whether each canary was in fact in training (decided by a fair coin before training).
    delta
        The delta of the claim being audited.
    guess_fraction
        The share of canaries guessed on (the rest abstain), split evenly between "in" and "out".
        Fixed before looking at the scores: choosing it afterwards would need a correction.
    """
    m = len(scores)
    k = max(1, int(m * guess_fraction / 2))
    order = sorted(range(m), key=lambda i: scores[i])
    correct = sum(included[i] for i in order[-k:]) + sum(not included[i] for i in order[:k])
    r = 2 * k
    lo, hi = clopper_pearson(correct, r, confidence)
    return GuessOutcome(
        canaries=m,
        guesses=r,
        correct=correct,
        confidence=confidence,
        epsilon_lower_bound=epsilon_lower_bound(m, r, correct, delta, confidence),
        accuracy=correct / r,
        accuracy_interval=(lo, hi),
        epsilon_interval=(_implied_epsilon(lo), _implied_epsilon(hi)),
    )
