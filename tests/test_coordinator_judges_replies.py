"""Issue 11 item 3, the coordinator's side: a reply from a ledger that restarted, or whose lifetime epsilon went
down since the coordinator's chain last recorded it, is refused and left out of the average.

Driven through the strategy's public Flower entry point (``aggregate_fit``) with replies as Flower
delivers them; without secure aggregation, so the average shows whose update was used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from agencyfl.federation.messages import LedgerRecord, TrainReport
from agencyfl.privacy.coordinator_ledger import AgencyReport
from agencyfl.server.strategy import AgencyFedAvg, JobPlan

KNOWN = {
    "tax": LedgerRecord(origin="a" * 64, epsilon_lifetime=2.0),
    "hrss": LedgerRecord(origin="b" * 64, epsilon_lifetime=2.0),
    "environment": LedgerRecord(origin="c" * 64, epsilon_lifetime=2.0),
}


def reply(agency: str, update: float, origin: str, epsilon_lifetime: float) -> tuple[Any, FitRes]:
    metrics = TrainReport(
        agency=agency, dataset="d" * 64, epsilon_job=1.0, epsilon_lifetime=epsilon_lifetime, origin=origin,
        steps=20, noise_multiplier=1.0,
    ).to_metrics()  # fmt: skip
    params = ndarrays_to_parameters([np.full(2, update)])
    return None, FitRes(Status(Code.OK, ""), params, 100, metrics)


@pytest.mark.parametrize(
    ("origin", "epsilon", "why"),
    [("a" * 64, 1.5, "lifetime epsilon went down"), ("f" * 64, 2.5, "ledger restarted")],
)
def test_a_reply_from_a_reset_ledger_is_refused_and_left_out(origin: str, epsilon: float, why: str) -> None:
    closed: list[tuple[int, list[AgencyReport], bool]] = []
    strategy = AgencyFedAvg(
        JobPlan("job", 3, "s" * 64, 100000),
        [np.zeros(2)],
        min_agencies=2,
        min_available=3,
        secure=False,
        known=KNOWN,
        round_closed=lambda r, reports, weights, aggregated: closed.append((r, reports, aggregated)),
    )
    results = [
        reply("tax", 100.0, origin, epsilon),
        reply("hrss", 1.0, "b" * 64, 2.2),
        reply("environment", 3.0, "c" * 64, 2.3),
    ]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    assert parameters is not None
    assert np.allclose(parameters_to_ndarrays(parameters)[0], 2.0)  # the mean of hrss and environment only
    ((_, reports, aggregated),) = closed
    tax = next(r for r in reports if r.agency == "tax")
    assert aggregated and tax.accepted is False and why in (tax.reason or "")
    assert all(r.accepted for r in reports if r.agency != "tax")
    assert strategy.log.agencies["tax"].refusals == 1 and strategy.log.agencies["tax"].rounds_trained == 0


def test_when_the_exact_accounting_took_over_a_lower_lifetime_is_not_a_lost_spend() -> None:
    """A chain record from RDP alone (0.2523) of a ledger of Gaussian releases that now counts 0.2282 exactly:
    the reply's RDP figure (0.2523 or more) is compared, not the enforced one, so it is accepted; a reply whose
    RDP figure is below the record (entries removed) is still refused, and so is one from an agency that does
    not report RDP's figure and whose lifetime fell."""
    known = {**KNOWN, "tax": LedgerRecord(origin="a" * 64, epsilon_lifetime=0.2523)}

    def judged(epsilon_lifetime: float, rdp: float) -> str | None:
        strategy = AgencyFedAvg(JobPlan("job", 3, "s" * 64, 100000), [np.zeros(2)], min_agencies=2,
                                min_available=3, secure=False, known=known)  # fmt: skip
        return strategy._judge("tax", "a" * 64, epsilon_lifetime, rdp)

    assert judged(0.2282, 0.2523) is None
    assert judged(0.30, 0.33) is None
    assert "went down" in (judged(0.2282, 0.20) or "")
    assert "went down" in (judged(0.2282, 0.0) or "")  # no RDP figure: the enforced one is compared
    # a record that carries RDP's figure is compared with RDP's, whatever the enforced one was
    later = LedgerRecord(origin="a" * 64, epsilon_lifetime=0.2282, epsilon_lifetime_rdp=0.2523)
    assert later.lost_spend(0.2300, 0.2600) is None and later.lost_spend(0.2300, 0.2500) == (0.25, 0.2523)
    # and its enforced figure with the enforced one: a lower one with an inflated RDP figure is still refused
    assert later.lost_spend(0.2200, 0.2600) == (0.22, 0.2282)


def test_a_vertical_job_s_ledger_that_lost_releases_is_caught_after_the_exact_accounting() -> None:
    """A vertical job's chain record now holds the exact figure and RDP's; a ledger rolled back from 51 releases
    to 44 (its RDP figure still above the recorded exact one) is refused on both counts."""
    from agencyfl.privacy.accounting import StepRecord, epsilon_for

    full, rolled_back = [StepRecord(26.64, 1.0, 51)], [StepRecord(26.64, 1.0, 44)]
    record = LedgerRecord(origin="a" * 64, epsilon_lifetime=epsilon_for(full, 1e-5),
                          epsilon_lifetime_rdp=epsilon_for(full, 1e-5, "rdp"))  # fmt: skip
    now, now_rdp = epsilon_for(rolled_back, 1e-5), epsilon_for(rolled_back, 1e-5, "rdp")
    assert now_rdp > record.epsilon_lifetime  # RDP's figure alone against the exact record would pass
    assert record.lost_spend(now, now_rdp) is not None
    assert record.lost_spend(epsilon_for(full, 1e-5), epsilon_for(full, 1e-5, "rdp")) is None
