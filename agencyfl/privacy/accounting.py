"""DP-SGD privacy accounting: epsilon from recorded steps, and noise calibration.

Every DP-SGD step an agency takes is recorded in its ledger as ``(noise_multiplier, sample_rate,
steps)``; epsilon is always recomputed by ONE Opacus ``RDPAccountant`` over all those records, so
composition across rounds, process restarts and jobs is exactly that of one accountant that saw
every step (Mironov 2017, "Renyi Differential Privacy"; Mironov, Talwar, Zhang 2019 for the
Poisson-subsampled Gaussian, which is the sampling the training loader uses).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier


@dataclass(frozen=True)
class StepRecord:
    """``steps`` steps of the Poisson-subsampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def accountant_for(records: Iterable[StepRecord]) -> RDPAccountant:
    """An RDP accountant whose history is exactly ``records`` (restored, e.g., from a ledger)."""
    accountant = RDPAccountant()
    accountant.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in records if r.steps > 0]
    return accountant


@lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    orders = RDPAccountant.DEFAULT_ALPHAS
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))


def epsilon_for(records: Iterable[StepRecord], delta: float) -> float:
    """Epsilon at ``delta`` of all ``records`` composed; 0.0 when nothing was spent.

    The same computation as ``RDPAccountant.get_epsilon`` over the same history (RDP composes
    additively and is linear in the number of steps), with each mechanism's per-step RDP curve
    cached: auditors recompute the spend after every ledger entry.
    """
    rdp = np.zeros(len(RDPAccountant.DEFAULT_ALPHAS))
    spent = False
    for r in records:
        if r.steps > 0:
            rdp = rdp + r.steps * _rdp_per_step(r.sample_rate, r.noise_multiplier)
            spent = True
    if not spent:
        return 0.0
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


class RdpTally:
    """A running composition: add records one at a time, read epsilon at any point.

    The same arithmetic as ``epsilon_for`` (RDP adds up per order), kept as one vector, so that an
    auditor's epsilon after every ledger entry costs one addition per entry, not a recomputation of
    the whole prefix (linear instead of quadratic in the ledger's length).
    """

    def __init__(self) -> None:
        self._rdp = np.zeros(len(RDPAccountant.DEFAULT_ALPHAS))
        self._spent = False

    def add(self, record: StepRecord) -> None:
        """Compose ``record`` in."""
        if record.steps > 0:
            self._rdp = self._rdp + record.steps * _rdp_per_step(record.sample_rate, record.noise_multiplier)
            self._spent = True

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything added so far (0.0 when nothing was spent)."""
        if not self._spent:
            return 0.0
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=self._rdp, delta=delta)
        return float(eps)


def _merged(records: Iterable[StepRecord]) -> list[tuple[float, float, int]]:
    """The history with the steps of each distinct mechanism added up (composition commutes).

    Opacus' PRV accountant builds one privacy random variable per history entry: a ledger of 8,000
    rounds of one mechanism is one mechanism run 8,000 x steps times, not 8,000 of them.
    """
    steps: dict[tuple[float, float], int] = {}
    for r in records:
        if r.steps > 0:
            key = (r.noise_multiplier, r.sample_rate)
            steps[key] = steps.get(key, 0) + r.steps
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def epsilon_prv(records: Iterable[StepRecord], delta: float, eps_error: float = 0.01) -> float:
    """Epsilon by the PRV accountant (Gopi, Lee, Wutschitz 2021): tighter than RDP, for reporting.

    Enforcement uses RDP (``epsilon_for``): its bound is the larger, so refusing by it is the safe
    side, and it is exact arithmetic where PRV is a numerical estimate with error ``eps_error``.
    """
    history = _merged(records)
    if not history:
        return 0.0
    accountant = PRVAccountant()
    accountant.history = history
    with np.errstate(divide="ignore"):  # a release (q = 1) takes log(1 - q) = -inf in Opacus' PRV domain: handled
        return float(accountant.get_epsilon(delta=delta, eps_error=eps_error))


MAX_NOISE_MULTIPLIER = 100.0  # beyond this no model learns anything; refuse instead


@lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, also: tuple[StepRecord, ...] = ()
) -> float:
    """The noise multiplier for ``steps`` steps at ``sample_rate`` to reach at most ``target_epsilon``.

    ``also`` are other mechanisms the same job will run (a noisy fairness release): the steps' noise
    is then calibrated so that everything together stays within the target. Opacus' binary search
    (used when ``also`` is empty) returns the upper end of its bracket, i.e. the larger (safer) sigma;
    ours does the same. The result is checked again so an overshoot can never pass silently.

    Raises
    ------
    ValueError
        If the target cannot be met (budget too small for the planned steps), or ``steps`` is not positive.
    """
    if steps <= 0:  # at once: a search over zero steps never converges
        raise ValueError(f"steps must be positive to calibrate noise (got {steps!r})")
    with warnings.catch_warnings():  # at sigma 100 the optimal RDP order is the largest: a loose bound, fine here
        warnings.simplefilter("ignore", UserWarning)
        floor = epsilon_for([StepRecord(MAX_NOISE_MULTIPLIER, sample_rate, steps), *also], delta)
    if floor > target_epsilon:  # checked first: Opacus' own search takes ~40 s to give up
        raise ValueError(
            f"epsilon {target_epsilon:g} cannot be met with {steps} steps at sample rate {sample_rate:g}: "
            f"even noise multiplier {MAX_NOISE_MULTIPLIER:g} gives {floor:.4g}"
        )
    with warnings.catch_warnings():  # Opacus' search visits sigmas whose optimal order is the largest: fine
        warnings.simplefilter("ignore", UserWarning)
        if also:
            sigma = _bisect_sigma(target_epsilon, delta, sample_rate, steps, also)
        else:
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                    epsilon_tolerance=0.005,
                )
            )
    achieved = epsilon_for([StepRecord(sigma, sample_rate, steps), *also], delta)
    if achieved > target_epsilon:  # pragma: no cover - guards a change in Opacus' search
        raise ValueError(f"calibration overshot: epsilon {achieved} > target {target_epsilon}")
    return sigma


def _bisect_sigma(target: float, delta: float, q: float, steps: int, also: tuple[StepRecord, ...]) -> float:
    """The smallest sigma (to within 0.5% of epsilon) whose composition with ``also`` meets ``target``."""
    low, high = 0.0, MAX_NOISE_MULTIPLIER  # epsilon falls as sigma grows; keep high feasible
    while high - low > 1e-4:
        mid = (low + high) / 2
        if mid > 0 and epsilon_for([StepRecord(mid, q, steps), *also], delta) <= target:
            high = mid
        else:
            low = mid
        if high < MAX_NOISE_MULTIPLIER and target - epsilon_for([StepRecord(high, q, steps), *also], delta) < 0.005:
            break
    return high
