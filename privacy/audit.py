"""The auditor's view of a ledger: verify it, recompute the spend from its events, compare to caps.

Lifetime epsilon is reported by both RDP (what enforcement uses: the larger, safe-side bound) and PRV
(tighter, numerical), side by side.

Recorded epsilons are not trusted: the spend is recomputed from the recorded mechanisms with the
same accountant and must agree with what the agency wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from privacy.accounting import epsilon_for, epsilon_prv
from privacy.ledger import spend_records, verify_ledger

_AGREE = 1e-6


@dataclass
class AgencyAudit:
    """One row of the audit report."""

    agency: str
    ledger: str
    last_job: str | None
    epsilon_last_job: float
    epsilon_lifetime: float
    epsilon_lifetime_prv: float
    budget: float | None
    epsilon_job_cap: float | None
    delta: float | None
    rounds_last_job: int
    rounds_total: int
    jobs: int
    refusals: int
    last_entry: str | None
    chain_ok: bool
    signatures_ok: bool
    head_ok: bool
    key_id: str
    problems: list[str] = field(default_factory=list)
    overspend: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """Chain, signatures and head verify, and recorded epsilons agree with the recomputation."""
        return self.chain_ok and self.signatures_ok and self.head_ok and not self.problems

    @property
    def within_budget(self) -> bool:
        """No cap is exceeded (lifetime budget, and each job's cap)."""
        if self.budget is None:
            return not self.overspend
        return self.epsilon_lifetime <= self.budget + _AGREE and not self.overspend


def audit_ledger(directory: str | Path) -> AgencyAudit:
    """Verify one agency's ledger folder and summarise its spend."""
    check = verify_ledger(directory)
    events = check.events
    problems = list(check.problems)
    overspend: list[str] = []
    agencies = sorted({e.agency for e in events})
    if len(agencies) > 1:
        problems.append(f"entries of several agencies in one ledger: {agencies!r}")
    jobs: list[str] = []
    for e in events:
        if e.job not in jobs:
            jobs.append(e.job)
    last_job = jobs[-1] if jobs else None
    delta = events[-1].delta if events else None
    for index, e in enumerate(events):
        if e.kind != "round":
            continue
        so_far = events[: index + 1]
        life = epsilon_for(spend_records(so_far), e.delta)
        job = epsilon_for(spend_records(so_far, e.job), e.delta)
        if not (
            math.isclose(life, e.epsilon_lifetime, rel_tol=_AGREE, abs_tol=_AGREE)
            and math.isclose(job, e.epsilon_job, rel_tol=_AGREE, abs_tol=_AGREE)
        ):
            problems.append(
                f"entry {index}: recorded epsilon ({e.epsilon_job:.6f} job, {e.epsilon_lifetime:.6f} "
                f"lifetime) disagrees with the recomputed ({job:.6f}, {life:.6f})"
            )
        if job > e.epsilon_job_cap + _AGREE:
            overspend.append(
                f"entry {index}: job {e.job} at epsilon {job:.4f} exceeds its per-job cap {e.epsilon_job_cap:g}"
            )
    eps_job = epsilon_for(spend_records(events, last_job), delta) if last_job and delta else 0.0
    eps_life = epsilon_for(spend_records(events), delta) if delta else 0.0
    return AgencyAudit(
        agency=agencies[0] if agencies else Path(directory).resolve().parent.name,
        ledger=str(directory),
        last_job=last_job,
        epsilon_last_job=eps_job,
        epsilon_lifetime=eps_life,
        epsilon_lifetime_prv=epsilon_prv(spend_records(events), delta) if delta else 0.0,
        budget=events[-1].budget if events else None,
        epsilon_job_cap=events[-1].epsilon_job_cap if events else None,
        delta=delta,
        rounds_last_job=sum(1 for e in events if e.kind == "round" and e.job == last_job),
        rounds_total=sum(1 for e in events if e.kind == "round"),
        jobs=len(jobs),
        refusals=sum(1 for e in events if e.kind == "refusal"),
        last_entry=events[-1].time if events else None,
        chain_ok=check.chain_ok,
        signatures_ok=check.signatures_ok,
        head_ok=check.head_ok,
        key_id=check.key_id,
        problems=problems,
        overspend=overspend,
    )
