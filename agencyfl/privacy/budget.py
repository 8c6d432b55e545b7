"""Budget enforcement: before a round, compute the epsilon it would leave behind; refuse if over.

Validate first, then commit: a refused round trains nothing and spends nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agencyfl.privacy.accounting import StepRecord, calibrate_noise, epsilon_for
from agencyfl.privacy.ledger import LedgerEvent, spend_records

if TYPE_CHECKING:
    from agencyfl.federation.spec import FederationSpec


def lifetime_rdp(events: list[LedgerEvent]) -> float:
    """A ledger's lifetime epsilon by RDP alone: the figure ``LedgerRecord.lost_spend`` compares, which never
    falls below one recorded for a prefix of the ledger under either accountant."""
    return epsilon_for(spend_records(events), events[-1].delta, "rdp") if events else 0.0


def planned_release(spec: FederationSpec) -> StepRecord | None:
    """The job's noisy fairness release, if the spec asks for one (one Gaussian release, q = 1)."""
    fairness = spec.fairness
    if fairness is None or fairness.noise_multiplier <= 0:
        return None
    return StepRecord(fairness.noise_multiplier, 1.0, 1)


def evaluation_release(spec: FederationSpec, count: int = 1) -> StepRecord:
    """``count`` noisy releases of validation histograms (``[evaluation]``; Gaussian, q = 1)."""
    return StepRecord(spec.evaluation.noise_multiplier, 1.0, count)


def planned_releases(spec: FederationSpec) -> tuple[StepRecord, ...]:
    """Every release a job of ``spec`` makes besides DP-SGD: ``rounds + 1`` evaluations, the fairness counts."""
    fairness = planned_release(spec)
    evaluations = evaluation_release(spec, spec.training.rounds + 1)
    return (evaluations, fairness) if fairness else (evaluations,)


def job_noise_multiplier(spec: FederationSpec, steps: int) -> float:
    """DP-SGD noise for a job of ``steps`` steps, leaving room in the per-job epsilon for its releases."""
    return calibrate_noise(
        spec.privacy.epsilon, spec.privacy.delta, spec.training.sample_rate, steps, planned_releases(spec)
    )


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a planned round fits, and the epsilons it would leave (job and lifetime)."""

    allowed: bool
    epsilon_job_after: float
    epsilon_lifetime_after: float
    reason: str | None = None


def check_round(
    events: list[LedgerEvent],
    job: str,
    planned: StepRecord,
    delta: float,
    job_cap: float,
    lifetime_cap: float,
    also: Sequence[StepRecord] = (),
) -> BudgetDecision:
    """Decide whether ``planned`` steps may run, given everything the ledger already holds.

    Parameters
    ----------
    events
        The agency's verified ledger events (all jobs).
    job
        The current job's id: the per-job cap composes only its rounds.
    planned
        The round's mechanism: noise multiplier, sample rate and number of steps.
    delta, job_cap, lifetime_cap
        The (epsilon, delta) caps per job and over the dataset's lifetime.
    also
        Other mechanisms the same request runs (the evaluation release of a fit round): decided together.
    """
    job_eps = epsilon_for([*spend_records(events, job), planned, *also], delta)
    life_eps = epsilon_for([*spend_records(events), planned, *also], delta)
    reasons = []
    if job_eps > job_cap:
        reasons.append(f"epsilon for this job would reach {job_eps:.3f} > per-job cap {job_cap:g}")
    if life_eps > lifetime_cap:
        reasons.append(f"lifetime epsilon would reach {life_eps:.3f} > budget {lifetime_cap:g}")
    return BudgetDecision(not reasons, job_eps, life_eps, "; ".join(reasons) or None)
