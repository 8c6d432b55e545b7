"""`agencyfl run --spec VERTICAL.toml`: align, then train, every iteration in every agency's ledger before release.

The ledgers are the auditor's: they must verify, record one Gaussian mechanism event per iteration,
agree with dp_accounting, and stop the job (with a recorded refusal) when a release would cross a cap.
Each agency keeps only its own block of the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import VerticalJob, invoke

from agencyfl.privacy.ledger import verify_ledger

AGENCIES = ("civil-affairs", "hrss", "tax", "environment")


@pytest.fixture(scope="module")
def vertical(vertical_job: VerticalJob) -> tuple[VerticalJob, Path, dict]:
    return vertical_job, vertical_job.work, vertical_job.summary


def test_every_iteration_is_in_every_ledger_and_within_the_job_cap(
    vertical: tuple[VerticalJob, Path, dict],
) -> None:
    _, work, summary = vertical
    assert summary["topology"] == "vertical" and summary["rounds_aggregated"] == 3
    assert summary["optimizer"] == "newton" and summary["hessian"]["sensitivity"] == pytest.approx(np.sqrt(6) / 4)
    assert summary["hessian"]["bytes"]["civil-affairs"] > 0  # its sealed Enc(m c / 4) and its packed triangle
    for agency in AGENCIES:
        check = verify_ledger(work / agency / "ledger")
        assert check.ok, check.problems
        releases = [e for e in check.events if e.kind == "release" and e.release != "fairness"]
        # block Newton's Hessian release first (round 0), then one per iteration
        assert [(e.release, e.round) for e in releases] == [("vertical-hessian", 0)] + [
            ("vertical-gradient", i) for i in (1, 2, 3)
        ]
        # sqrt(K + 2) / 4
        hessian = np.sqrt(4 + 2) / 4
        assert releases[0].mechanism == releases[0].mechanism.__class__(
            sensitivity=hessian, std=summary["noise_multiplier"] * hessian
        )
        assert all(e.mechanism is not None and e.mechanism.type == "gaussian" for e in releases)
        assert releases[-1].epsilon_job <= 3.0 + 1e-9
        last = [e for e in check.events if e.kind == "release"][-1]  # the fairness counts' release ends the job
        assert last.release == "fairness" and summary["agencies"][agency]["epsilon_job"] == pytest.approx(
            last.epsilon_job
        )
    report = invoke("audit", "report", *(work / a / "ledger" for a in AGENCIES), "--format", "json")
    assert report.exit_code == 0, report.output
    for row in json.loads(report.stdout)["agencies"]:
        figures = row["independent"]["epsilon_lifetime"]
        assert figures["dp_accounting_rdp"] == pytest.approx(figures["ours_rdp"], rel=1e-2)
        # Gaussian releases without sampling only: the exact GDP figure is enforced, well under RDP's, and
        # dp_accounting's PLD (pessimistic) agrees with it from above
        assert figures["ours"] < 0.95 * figures["ours_rdp"]
        assert figures["ours"] - 1e-6 <= figures["dp_accounting_pld"] <= figures["ours"] + 1e-3


def test_each_agency_keeps_only_its_own_block(vertical: tuple[VerticalJob, Path, dict]) -> None:
    population, work, summary = vertical
    from agencyfl.federation.encoding import FeatureEncoder
    from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec

    loaded = load_any_spec(population.spec)
    assert isinstance(loaded, LoadedVerticalSpec)
    squared = 0.0
    for agency in AGENCIES:
        weights = np.load(work / agency / "model" / "weights.npy")
        squared += float(weights @ weights)
        assert summary["agencies"][agency]["model_block"] == str(work / agency / "model" / "weights.npy")
        # its own encoded inputs, its "not held" term, and (civil affairs) the intercept: nothing of another's
        own = FeatureEncoder(loaded.spec.block_schema(agency)).width + 1 + (agency == "civil-affairs")
        assert weights.shape == (own,)
    assert np.sqrt(squared) <= 20.0 + 1e-6  # the joint bound W on every block and the intercept together


def test_a_job_that_would_cross_the_lifetime_budget_stops_with_its_refusal_recorded(
    vertical: tuple[VerticalJob, Path, dict], tmp_path: Path
) -> None:
    population, shared, _ = vertical
    work = tmp_path / "work"  # its own copy: the suite runs in random order and the other tests read the first job
    shutil.copytree(shared, work)
    before = {a: len(verify_ledger(work / a / "ledger").events) for a in AGENCIES}
    again = invoke("run", "--spec", population.spec, "--workdir", work)
    assert again.exit_code == 7 and "refused iteration" in again.output, again.output
    for agency in AGENCIES:
        check = verify_ledger(work / agency / "ledger")
        new = check.events[before[agency] :]
        assert check.ok and new, agency
        released = [e for e in new if e.kind == "release"]
        assert all(e.epsilon_lifetime <= 4.0 + 1e-9 for e in released)  # nothing released past the budget
    refusals = [e for a in AGENCIES for e in verify_ledger(work / a / "ledger").events if e.kind == "refusal"]
    assert refusals and all("lifetime" in (e.reason or "") or "budget" in (e.reason or "") for e in refusals)


def test_the_fairness_table_on_joined_records_is_a_noised_release_in_every_ledger(
    vertical: tuple[VerticalJob, Path, dict],
) -> None:
    """Civil affairs counts its validation households' outcomes per group, scored through the encrypted path;
    the noised counts depend on every agency's records, so every ledger records the release first."""
    job, work, summary = vertical
    card = json.loads((Path(summary["registry"]) / "card.json").read_text())
    table = card["fairness"]
    assert table["release"] == "noised counts, accounted in each agency's ledger"
    assert set(table["attributes"]) == {"region_type", "disability", "head_age"}
    groups = {g["group"]: g["n"] for g in table["attributes"]["region_type"]["groups"]}
    # the truth: the exact count of civil affairs' validation households (the card's n is a noised one)
    from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
    from agencyfl.vertical.job import label_block

    loaded = load_any_spec(job.spec)
    assert isinstance(loaded, LoadedVerticalSpec)
    _, labels = label_block(loaded, work)
    validation = len(labels.y[labels.validation])
    # each cell is noised with std 5 x sqrt(3 + 1) = 10 and a group's n sums four cells (negative cells read
    # as 0, which can only add): bounds at 4 std. civil affairs holds region_type for every household, so
    # "unknown" is noise only (the horizontal table's groups were mostly unknown: partial records)
    assert abs(sum(groups.values()) - validation) < 4 * 10 * np.sqrt(4 * len(groups))
    assert groups.get("unknown", 0) < 4 * 20
    assert groups["urban"] + groups["rural"] > validation - 4 * 10 * np.sqrt(8)
    # the card's size pools every attribute's cells and the AUC histogram (unclipped, so unbiased): its std
    # is under the region_type sum's alone (10 x sqrt(12)), where the clipped histogram read 60 high
    assert abs(card["metrics"]["n"] - validation) < 4 * 10 * np.sqrt(12)
    for agency in AGENCIES:
        events = verify_ledger(work / agency / "ledger").events
        released = [e for e in events if e.kind == "release" and e.release == "fairness"]
        assert len(released) == 1 and released[0].job == summary["job"]
        assert released[0].mechanism is not None and released[0].mechanism.type == "gaussian"
        assert released[0].mechanism.std / released[0].mechanism.sensitivity == pytest.approx(5.0)
        assert released[0].epsilon_job <= 3.0 + 1e-9  # the iterations' noise was calibrated to leave room
    assert (Path(summary["registry"]) / "card.md").read_text().count("### ") >= 3  # the table, for people


def test_a_resumed_iteration_admitted_under_other_noise_is_admitted_again(
    vertical: tuple[VerticalJob, Path, dict], tmp_path: Path
) -> None:
    """An iteration admitted under RDP's calibration (sigma 28.9) but never released, resumed after the exact
    accounting took over (a lower sigma): its old admission is not reused, so the ledger records the noise that
    is released; admitted under the current plan, it is reused."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
    from agencyfl.privacy.ledger import Ledger
    from agencyfl.vertical.job import admit, plan_of

    population, _, _ = vertical
    loaded = load_any_spec(population.spec)
    assert isinstance(loaded, LoadedVerticalSpec)
    plan = plan_of(loaded)
    older = plan.model_copy(update={"epsilon": 0.93 * plan.epsilon})  # another calibration: more noise
    assert older.noise_multiplier > plan.noise_multiplier
    ledger = Ledger(tmp_path / "ledger", Ed25519PrivateKey.generate(), party="tax")
    first = admit(ledger, loaded, older, "job-r", "tax", 1)
    again = admit(ledger, loaded, plan, "job-r", "tax", 1, reuse=True)
    assert again != first and again.mechanism == plan.iteration_event()
    assert len([e for e in ledger.events() if e.kind == "release"]) == 2  # both counted
    assert admit(ledger, loaded, plan, "job-r", "tax", 1, reuse=True) == again  # the current one is reused
    assert len([e for e in ledger.events() if e.kind == "release"]) == 2
