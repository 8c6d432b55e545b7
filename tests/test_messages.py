"""The typed messages (``federation.messages``): one model per report, the only place wire keys are spelled.

Round trips through Flower's records, and the abuse: a reply that smuggles an extra field, lies about
its status or carries a histogram that is not float64 bytes is not taken as a report; the coordinator
counts it as a failed reply and leaves it out of the average; an agency refuses a request it cannot
read, records the refusal, and spends nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.common import Code, ConfigRecord, FitRes, Status, ndarrays_to_parameters
from hypothesis import given
from hypothesis import strategies as st

from agencyfl.federation.messages import (
    FairnessRelease,
    LedgerRecord,
    MessageError,
    NoisedEvaluation,
    Refusal,
    ReleaseReport,
    RoundRequest,
    TrainReport,
)
from agencyfl.server.strategy import AgencyFedAvg, JobPlan

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
histogram = st.lists(finite, min_size=1, max_size=12).map(tuple)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
epsilons = st.floats(min_value=0, max_value=100, allow_nan=False)


@given(names, epsilons, epsilons, histogram, histogram, finite, st.integers(1, 10_000))
def test_a_train_report_survives_flowers_config_record(
    agency: str,
    eps_job: float,
    eps_life: float,
    pos: tuple[float, ...],
    neg: tuple[float, ...],
    brier: float,
    steps: int,
) -> None:
    report = TrainReport(
        agency=agency, dataset="d" * 64, epsilon_job=eps_job, epsilon_lifetime=eps_life, origin="o" * 64,
        steps=steps, noise_multiplier=1.3, evaluation=NoisedEvaluation(hist_pos=pos, hist_neg=neg, brier_sum=brier),
    )  # fmt: skip
    wire = dict(ConfigRecord(report.to_metrics()))  # what Flower carries
    assert TrainReport.from_metrics(wire) == report
    assert "epsilon-job" in wire and "epsilon_job" not in wire  # one spelling on the wire


def test_a_release_report_and_a_refusal_round_trip() -> None:
    release = ReleaseReport(
        agency="tax", epsilon_job=1.0, epsilon_lifetime=2.0, origin="a" * 64,
        evaluation=NoisedEvaluation(hist_pos=(1.5, 2.0), hist_neg=(0.5, -0.25), brier_sum=3.0),
        fairness=FairnessRelease(status="noised", counts=(1.0, 2.0, 3.0)),
    )  # fmt: skip
    assert ReleaseReport.from_metrics(dict(ConfigRecord(release.to_metrics()))) == release
    assert release.releases == ["evaluation", "fairness"]
    refusal = Refusal(agency="tax", reason="budget", epsilon_job=1.0, epsilon_lifetime=2.0)
    assert set(refusal.to_metrics()) == {
        "agency",
        "status",
        "reason",
        "epsilon-job",
        "epsilon-lifetime",
        "epsilon-lifetime-rdp",  # the same lifetime by RDP alone (the coordinator's "never down" check)
        "ledger-origin",
    }
    assert TrainReport.from_metrics(refusal.to_metrics()) == refusal == ReleaseReport.from_metrics(refusal.to_metrics())


def test_a_round_request_round_trips_through_a_config_record() -> None:
    request = RoundRequest(
        job="job-1", round=2, rounds=3, spec_sha256="s" * 64, max_weight=1000, epsilon=3.0,
        ledger_records={"tax": LedgerRecord(origin="a" * 64, epsilon_lifetime=1.5)}, plan_signature="sig",
    )  # fmt: skip
    config = dict(ConfigRecord(request.to_config()))
    assert RoundRequest.from_config(config) == request
    assert config["spec-sha256"] == "s" * 64 and config["max-weight"] == 1000


TRAINED: dict[str, Any] = TrainReport(
    agency="tax", dataset="d" * 64, epsilon_job=1.0, epsilon_lifetime=2.0, steps=20, noise_multiplier=1.0,
    evaluation=NoisedEvaluation(hist_pos=(1.0,), hist_neg=(2.0,), brier_sum=0.5),
).to_metrics()  # fmt: skip


@pytest.mark.parametrize(
    ("tampered", "why"),
    [
        (TRAINED | {"rows": 1234}, "rows"),  # smuggles an extra field
        (TRAINED | {"status": "exact"}, "status"),  # a status no party sends
        (TRAINED | {"hist-pos": b"\x00" * 7}, "float64 bytes"),  # a histogram that is not float64
        ({k: v for k, v in TRAINED.items() if k != "steps"}, "steps"),  # a trained round that states no steps
        (TRAINED | {"noise-multiplier": 0.0}, "noise-multiplier"),  # "trained" without noise
        (TRAINED | {"epsilon-lifetime": -1.0}, "epsilon-lifetime"),
    ],
)
def test_a_malformed_reply_is_not_a_report(tampered: dict[str, Any], why: str) -> None:
    with pytest.raises(MessageError, match=why):
        TrainReport.from_metrics(tampered)


def test_the_coordinator_counts_a_malformed_reply_as_a_failure_and_leaves_it_out() -> None:
    events: list[dict[str, Any]] = []
    strategy = AgencyFedAvg(
        JobPlan("job", 3, "s" * 64, 100000), [np.zeros(2)], min_agencies=2, min_available=3, secure=False,
        on_event=events.append,
    )  # fmt: skip

    def reply(metrics: dict[str, Any], update: float) -> tuple[Any, FitRes]:
        return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(2, update)]), 100, metrics)

    results = [
        reply(TRAINED | {"agency": "hrss"}, 1.0),
        reply(TRAINED | {"agency": "environment"}, 3.0),
        reply(TRAINED | {"agency": "tax", "rows": 5}, 100.0),  # malformed: must not move the model
    ]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    assert parameters is not None
    from flwr.common import parameters_to_ndarrays

    assert np.allclose(parameters_to_ndarrays(parameters)[0], 2.0)  # the mean of the two well-formed replies
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and "rows" in errors[0]["reason"]
    assert set(strategy.log.agencies) == {"hrss", "environment"}
