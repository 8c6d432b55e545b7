"""Privacy accounting: epsilon from recorded steps, and noise calibration.

Every DP-SGD step or noisy release an agency makes is recorded in its ledger as ``(noise_multiplier,
sample_rate, steps)``; epsilon is always recomputed from all those records, so composition across
rounds, process restarts and jobs is exactly that of one accountant that saw every step. No accountant
object is restored from the ledger: nothing here writes into an accountant's state.

The enforced epsilon (``ACCOUNTANT``, "rdp+gdp") is the smaller of two bounds that each hold:

- Opacus' RDP analysis (the pure functions ``compute_rdp`` and ``get_privacy_spent`` an Opacus
  ``RDPAccountant`` itself calls, on its orders; Mironov 2017, "Renyi Differential Privacy"; Mironov,
  Talwar, Zhang 2019 for the Poisson-subsampled Gaussian, which is the sampling the training loader uses);
- when every record is a Gaussian release without sampling (q = 1: a vertical job's gradients and Hessian,
  fairness counts, validation histograms), the exact one: adaptively composed Gaussian mechanisms of noise
  multipliers sigma_i are together mu-GDP with mu = sqrt(sum_i steps_i / sigma_i^2), and mu-GDP is
  (epsilon, delta)-DP exactly when delta >= Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2)
  (Dong, Roth, Su 2022, "Gaussian differential privacy", Corollary 2.13 and Theorem 3.2; Balle and Wang 2018,
  the analytic Gaussian mechanism). That hockey-stick divergence is dp_accounting's
  ``GaussianPrivacyLoss.get_delta_for_epsilon``. RDP's conversion to (epsilon, delta) is not tight: at
  epsilon 1 and delta 1e-5 it needs 8% more noise for the same guarantee.

Ledger entries written before entries named their accountant (commit bcd2896) were enforced by RDP alone
(``accountant`` "rdp").
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting.mechanism_calibration import ExplicitBracketInterval, calibrate_dp_mechanism
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
from dp_accounting.privacy_accountant import NeighboringRelation, PrivacyAccountant
from scipy.optimize import brentq

from agencyfl.privacy.steps import ACCOUNTANT, Accountant, StepRecord

__all__ = ["ACCOUNTANT", "Accountant", "StepRecord"]  # StepRecord re-exported: where it lived before


ORDERS: tuple[float, ...] = tuple(1 + x / 10.0 for x in range(1, 100)) + tuple(float(a) for a in range(12, 64))
"""The RDP orders of Opacus' ``RDPAccountant.DEFAULT_ALPHAS`` (tests/test_accounting.py checks they agree)."""


def _opacus_rdp_analysis() -> ModuleType:
    """Opacus' RDP analysis, ``opacus/accountants/analysis/rdp.py`` (NumPy and SciPy), unchanged.

    Importing it by name runs ``opacus/__init__``, which imports torch: 2.6 s of CPU in every process
    that accounts without training (a vertical job's party, a screening, a dry run; each Flower message is
    a process of its own in deployment). So it is executed from its file under a private name, unless
    Opacus is already imported, and then it is Opacus' own module.
    """
    loaded = sys.modules.get("opacus.accountants.analysis.rdp")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("opacus")  # finds the package without importing it
    if package is None or package.origin is None:  # pragma: no cover - Opacus is a dependency
        raise ImportError("Opacus is not installed")
    path = Path(package.origin).parent / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("agencyfl._opacus_rdp_analysis", path)
    if spec is None or spec.loader is None:  # pragma: no cover - Opacus' layout changed
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_RDP = _opacus_rdp_analysis()
compute_rdp, get_privacy_spent = _RDP.compute_rdp, _RDP.get_privacy_spent


# Opacus warns when the best RDP order is the largest or the smallest of its orders (a release with much
# noise, very little spent, PRV's domain bound at a tiny delta; calibration's probe at the least noise): the
# epsilon is the least of bounds that each hold, only perhaps not the tightest, so it is not a reader's
# concern (it reached auditors' terminals from `audit verify`). One filter, for that message from that file
# only, set once: a `catch_warnings` around each call would reset Python's record of warnings already
# shown, and every other warning of the process would then be printed again each time.
warnings.filterwarnings(
    "ignore",
    message="Optimal order is the (largest|smallest) alpha",
    category=UserWarning,
    module=r"(opacus\.accountants\.analysis\.rdp|agencyfl\._opacus_rdp_analysis)$",
)


def _spent(rdp: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of an RDP curve on ``ORDERS``: Opacus' ``get_privacy_spent``."""
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    # callers pass Python floats: a NumPy float32 equals, as a cache key, the float64 of the same value, and
    # its curve (computed in float32) would be served for both
    if noise_multiplier * noise_multiplier == 0.0:  # no noise, or so little that its square underflows (Opacus
        return np.full(len(ORDERS), np.inf)  # would divide by zero): no guarantee at any order
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ORDERS))


def _gdp_term(record: StepRecord) -> float | None:
    """steps / sigma^2 of a Gaussian release without sampling; None where the exact figure does not apply (a
    subsampled record, or a noise multiplier that is not finite and positive: RDP's figure decides)."""
    sigma = float(record.noise_multiplier)
    if record.sample_rate < 1.0 or not (math.isfinite(sigma) and sigma > 0.0):
        return None
    term = record.steps / sigma / sigma  # not sigma**2: that underflows to 0 below about 1e-162
    return term if math.isfinite(term) else None


def gaussian_mu(records: Iterable[StepRecord]) -> float | None:
    """mu of the records' composition as Gaussian DP when every spending record is a Gaussian release without
    sampling (q = 1): sqrt(sum steps / sigma^2); None if any record is not (RDP alone applies)."""
    total = 0.0
    for r in records:
        if r.steps > 0:
            term = _gdp_term(r)
            if term is None:
                return None
            total += term
    return math.sqrt(total) if math.isfinite(total) else None


@lru_cache(maxsize=4096)
def gdp_epsilon(mu: float, delta: float, upper: float) -> float:
    """The least epsilon at which mu-GDP is (epsilon, delta)-DP, to within 1e-10 relative and never below it.

    ``upper`` is an epsilon known to hold (the RDP bound): the root of dp_accounting's exact hockey-stick
    divergence of the Gaussian (decreasing in epsilon) is found in [0, upper] (Brent's method), then moved up
    until the divergence at it is at most ``delta``, so the figure is always on the safe side of the exact one.
    """
    mu, delta, upper = float(mu), float(delta), float(upper)  # Python floats: NumPy scalars compute otherwise
    if mu <= 0.0:
        return 0.0
    divergence = GaussianPrivacyLoss(standard_deviation=1.0 / mu, sensitivity=1.0).get_delta_for_epsilon
    if divergence(0.0) <= delta:
        return 0.0
    if not upper > 0.0 or not math.isfinite(upper) or divergence(upper) > delta:
        return upper  # pragma: no cover - RDP's bound always holds; guards a numerical surprise
    epsilon = float(brentq(lambda e: divergence(e) - delta, 0.0, upper, xtol=1e-12, rtol=1e-10))
    for _ in range(100):  # Brent's answer lies within its tolerance of the root, on either side
        if divergence(epsilon) <= delta:
            return min(epsilon, upper)
        epsilon += max(1e-12, 1e-10 * epsilon)
    return upper  # pragma: no cover - the loop ends long before


def _enforced(rdp_epsilon: float, mu: float | None, delta: float, accountant: Accountant) -> float:
    if accountant == "rdp" or mu is None:
        return rdp_epsilon
    return min(rdp_epsilon, gdp_epsilon(mu, delta, rdp_epsilon))


def epsilon_rdp(records: Iterable[StepRecord], delta: float) -> float:
    """Epsilon at ``delta`` of all ``records`` composed by Opacus' RDP analysis; 0.0 when nothing was spent.

    The same computation as ``RDPAccountant.get_epsilon`` over the same history (RDP composes
    additively and is linear in the number of steps), with each mechanism's per-step RDP curve
    cached: auditors recompute the spend after every ledger entry.
    """
    rdp = np.zeros(len(ORDERS))
    spent = False
    for r in records:
        if r.steps > 0:
            rdp = rdp + r.steps * _rdp_per_step(float(r.sample_rate), float(r.noise_multiplier))
            spent = True
    if not spent:
        return 0.0
    return _spent(rdp, delta)


def epsilon_for(records: Iterable[StepRecord], delta: float, accountant: Accountant = ACCOUNTANT) -> float:
    """The enforced epsilon at ``delta`` of all ``records`` composed (0.0 when nothing was spent): RDP's, or
    the exact GDP figure when every record is a Gaussian release without sampling and that is smaller."""
    records = list(records)
    return _enforced(epsilon_rdp(records, delta), gaussian_mu(records), delta, accountant)


class SpendTally:
    """A running composition: add records one at a time, read epsilon at any point.

    The same arithmetic as ``epsilon_for`` (RDP adds up per order; GDP's mu^2 adds up), kept as one vector and
    one number, so that an auditor's epsilon after every ledger entry costs one addition per entry, not a
    recomputation of the whole prefix (linear instead of quadratic in the ledger's length).
    """

    def __init__(self) -> None:
        self._rdp = np.zeros(len(ORDERS))
        self._spent = False
        self._mu_squared: float | None = 0.0  # None once a subsampled record is added

    def add(self, record: StepRecord) -> None:
        """Compose ``record`` in."""
        if record.steps > 0:
            curve = _rdp_per_step(float(record.sample_rate), float(record.noise_multiplier))
            self._rdp = self._rdp + record.steps * curve
            self._spent = True
            term = _gdp_term(record)
            if term is None:
                self._mu_squared = None
            elif self._mu_squared is not None:
                self._mu_squared += term

    def epsilon(self, delta: float, accountant: Accountant = ACCOUNTANT) -> float:
        """Epsilon at ``delta`` of everything added so far (0.0 when nothing was spent)."""
        if not self._spent:
            return 0.0
        mu_squared = self._mu_squared
        mu = math.sqrt(mu_squared) if mu_squared is not None and math.isfinite(mu_squared) else None
        return _enforced(_spent(self._rdp, delta), mu, delta, accountant)


def _merged(records: Iterable[StepRecord]) -> list[tuple[float, float, int]]:
    """``(noise_multiplier, sample_rate, steps)`` with the steps of each distinct mechanism added up
    (composition commutes).

    The PRV composition builds one privacy random variable per entry: a ledger of 8,000 rounds of one
    mechanism is one mechanism run 8,000 x steps times, not 8,000 of them.
    """
    steps: dict[tuple[float, float], int] = {}
    for r in records:
        if r.steps > 0:
            key = (r.noise_multiplier, r.sample_rate)
            steps[key] = steps.get(key, 0) + r.steps
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def epsilon_prv(records: Iterable[StepRecord], delta: float, eps_error: float = 0.01) -> float:
    """Epsilon by the PRV accountant (Gopi, Lee, Wutschitz 2021): tighter than RDP, for reporting.

    Enforcement uses ``epsilon_for`` (RDP, or the exact GDP figure for releases without sampling): its bound
    holds exactly, where PRV is a numerical estimate with error ``eps_error``.

    The computation of ``PRVAccountant.get_epsilon`` (Opacus 1.6) over the merged history, written with
    the building blocks Opacus ships in ``opacus.accountants.analysis.prv`` instead of writing the
    history into an accountant: the same safe domain (Gopi et al.), mesh, truncation, discretization,
    FFT composition, and the upper end of the estimate's interval (a guarantee, not an estimate).
    """
    from opacus.accountants.analysis.prv import (  # imports torch (Opacus' package): only where PRV is reported
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        compute_safe_domain_size,
        discretize,
    )

    history = _merged(records)
    if not history:
        return 0.0
    delta_error = delta / 1000  # Opacus' default
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [steps for _, _, steps in history]
    with np.errstate(divide="ignore"):  # a release (q = 1) takes log(1 - q) = -inf in Opacus' PRV domain: handled
        size = compute_safe_domain_size(
            prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta_error
        )
        mesh = eps_error / np.sqrt(sum(counts) * np.log(12 / delta_error) / 2)
        domain = Domain.create_aligned(-size, size, mesh)
        dprvs = [discretize(TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max), domain) for prv in prvs]
        composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
        _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(upper)


MAX_NOISE_MULTIPLIER = 100.0  # beyond this no model learns anything; refuse instead
MIN_NOISE_MULTIPLIER = 0.01  # the lower end of the calibration bracket


def records_of(event: dpe.DpEvent, count: int = 1) -> list[StepRecord]:
    """A dp_accounting event as the enforcing accountant's records (Gaussian, Poisson-sampled Gaussian,
    their compositions).

    Raises
    ------
    ValueError
        For any other event: the enforcing accountant does not analyse it.
    """
    if isinstance(event, dpe.NoOpDpEvent):
        return []
    if isinstance(event, dpe.GaussianDpEvent):
        return [StepRecord(float(event.noise_multiplier), 1.0, count)]
    if isinstance(event, dpe.PoissonSampledDpEvent) and isinstance(event.event, dpe.GaussianDpEvent):
        return [StepRecord(float(event.event.noise_multiplier), float(event.sampling_probability), count)]
    if isinstance(event, dpe.SelfComposedDpEvent):
        return records_of(event.event, count * event.count)
    if isinstance(event, dpe.ComposedDpEvent):
        return [r for e in event.events for r in records_of(e, count)]
    raise ValueError(f"the enforcing accountant does not analyse {type(event).__name__}")


def dp_event_of(record: StepRecord) -> dpe.DpEvent:
    """One record as a dp_accounting event (q = 1: no sampling)."""
    gaussian = dpe.GaussianDpEvent(record.noise_multiplier)
    step = gaussian if record.sample_rate >= 1.0 else dpe.PoissonSampledDpEvent(record.sample_rate, gaussian)
    return dpe.SelfComposedDpEvent(step, record.steps)


class EnforcingAccountant(PrivacyAccountant):  # type: ignore[misc]  # dp_accounting ships no type information
    """The enforcing accountant (``SpendTally``: RDP, or exact GDP for releases without sampling) behind
    dp_accounting's ``PrivacyAccountant`` interface, so that the library's calibration routine searches over exactly the
    figure enforcement checks. Add or remove one household is its relation."""

    def __init__(self) -> None:
        super().__init__(NeighboringRelation.ADD_OR_REMOVE_ONE)
        self._tally = SpendTally()

    def _maybe_compose(
        self, event: dpe.DpEvent, count: int, do_compose: bool
    ) -> PrivacyAccountant.CompositionErrorDetails | None:
        try:
            records = records_of(event, count)
        except ValueError as exc:
            return PrivacyAccountant.CompositionErrorDetails(invalid_event=event, error_message=str(exc))
        if do_compose:
            for record in records:
                self._tally.add(record)
        return None

    def get_epsilon(self, target_delta: float) -> float:
        return self._tally.epsilon(target_delta)

    def get_delta(self, target_epsilon: float) -> float:  # pragma: no cover - nothing asks for delta
        raise NotImplementedError("agencyfl fixes delta per federation and accounts epsilon")


@lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, also: tuple[StepRecord, ...] = ()
) -> float:
    """The noise multiplier for ``steps`` steps at ``sample_rate`` to reach at most ``target_epsilon``.

    ``also`` are other mechanisms the same job will run (its noisy releases): the steps' noise is then
    calibrated so that everything together stays within the target. The search is dp_accounting's
    ``calibrate_dp_mechanism`` over the enforcing accountant (``EnforcingAccountant``): it returns a sigma
    whose epsilon does not exceed the target. The result is checked again so an overshoot can never pass
    silently.

    Raises
    ------
    ValueError
        If the target cannot be met (budget too small for the planned steps), or ``steps`` is not positive.
    """
    if steps <= 0:  # at once: a search over zero steps never converges
        raise ValueError(f"steps must be positive to calibrate noise (got {steps!r})")

    def plan(sigma: float) -> list[StepRecord]:
        return [StepRecord(sigma, sample_rate, steps), *also]

    floor = epsilon_for(plan(MAX_NOISE_MULTIPLIER), delta)
    if floor > target_epsilon:  # checked first: a search would only confirm it
        raise ValueError(
            f"epsilon {target_epsilon:g} cannot be met with {steps} steps at sample rate {sample_rate:g}: "
            f"even noise multiplier {MAX_NOISE_MULTIPLIER:g} gives {floor:.4g}"
        )
    if epsilon_for(plan(MIN_NOISE_MULTIPLIER), delta) <= target_epsilon:
        return MIN_NOISE_MULTIPLIER
    sigma = float(
        calibrate_dp_mechanism(
            EnforcingAccountant,
            lambda s: dpe.ComposedDpEvent([dp_event_of(r) for r in plan(s)]),
            target_epsilon,
            delta,
            ExplicitBracketInterval(MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER),
            tol=1e-5,  # in sigma; at small sigma epsilon is steep in it (1e-3 once left 0.05 of epsilon unspent)
        )
    )
    achieved = epsilon_for(plan(sigma), delta)
    if achieved > target_epsilon:  # pragma: no cover - guards a change in dp_accounting's search
        raise ValueError(f"calibration overshot: epsilon {achieved} > target {target_epsilon}")
    return sigma
