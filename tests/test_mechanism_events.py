"""Mechanism events in the ledger (issue 14): the mapping onto dp_accounting, the independent
recomputation in the audit, old-format ledgers, and the lies an agency could write into its own ledger."""

from __future__ import annotations

import json
import math
from html import escape as html_escape
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dp_accounting import dp_event as dpe

from agencyfl.privacy.accounting import StepRecord, epsilon_for
from agencyfl.privacy.audit import FederationAudit, audit_ledger
from agencyfl.privacy.events import (
    NEIGHBOURING,
    Composed,
    GaussianEvent,
    LaplaceEvent,
    PoissonSampled,
    RandomizedResponse,
    SelfComposed,
    UnaccountedMechanism,
    dp_sgd_steps,
    gaussian_releases,
    step_records,
    to_dp_event,
)
from agencyfl.privacy.independent import PLD_INTERVAL, PLD_SLACK, RDP_TOLERANCE, Recomputed
from agencyfl.privacy.ledger import Ledger, LedgerEvent, verify_ledger
from agencyfl.report_html import render_report
from tests.conftest import TrainedFederation, invoke

FIXTURES = Path(__file__).parent / "fixtures"


def test_events_map_one_to_one_onto_dp_accounting() -> None:
    gaussian = GaussianEvent(sensitivity=2.0, std=3.0)
    assert to_dp_event(gaussian) == dpe.GaussianDpEvent(1.5)  # dp_accounting carries sigma / sensitivity
    assert to_dp_event(LaplaceEvent(sensitivity=2.0, scale=5.0)) == dpe.LaplaceDpEvent(2.5)
    assert to_dp_event(RandomizedResponse(noise_parameter=0.3, num_buckets=4)) == dpe.RandomizedResponseDpEvent(0.3, 4)
    tree = Composed(events=[dp_sgd_steps(1.1, 0.01, 300, 1.0), gaussian_releases(40.0, math.sqrt(2), 4)])
    assert to_dp_event(tree) == dpe.ComposedDpEvent(
        [
            dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(0.01, dpe.GaussianDpEvent(1.1)), 300),
            dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(pytest.approx(40.0)), 4),
        ]
    )
    # frozen, versioned, and round-trips through the ledger's JSON
    again = Composed.model_validate(json.loads(tree.model_dump_json()))
    assert again == tree
    with pytest.raises(ValueError):
        GaussianEvent(sensitivity=0.0, std=1.0)
    with pytest.raises(ValueError):
        Composed(events=[])


def test_the_enforcing_accountant_reads_events_and_refuses_what_it_cannot_analyse() -> None:
    tree = Composed(events=[dp_sgd_steps(1.1, 0.01, 300, 2.0), gaussian_releases(40.0, math.sqrt(2), 4)])
    assert step_records(tree) == [StepRecord(1.1, 0.01, 300), StepRecord(pytest.approx(40.0), 1.0, 4)]
    for unanalysed in (
        LaplaceEvent(sensitivity=1.0, scale=1.0),
        SelfComposed(event=RandomizedResponse(noise_parameter=0.5, num_buckets=2), count=3),
        PoissonSampled(sampling_probability=0.1, event=LaplaceEvent(sensitivity=1.0, scale=1.0)),
    ):
        with pytest.raises(UnaccountedMechanism):
            step_records(unanalysed)


def test_old_format_ledger_still_verifies_and_reports_with_the_independent_figures() -> None:
    """tests/fixtures/ledger-format-2 was written by the code before mechanism events (flat entries)."""
    ledger = FIXTURES / "ledger-format-2"
    raw = [json.loads(line) for line in (ledger / "ledger.jsonl").read_text().splitlines()]
    assert all("mechanism" not in entry for entry in raw)  # really the old format
    assert verify_ledger(ledger).ok
    row = audit_ledger(ledger)
    assert row.verified and row.findings == []
    life = row.independent["epsilon_lifetime"]
    assert life["ours"] == pytest.approx(raw[-1]["epsilon_lifetime"], rel=1e-9)
    assert life["ours_rdp"] == life["ours"]  # DP-SGD (subsampled): RDP alone
    assert math.isclose(life["dp_accounting_rdp"], life["ours"], rel_tol=RDP_TOLERANCE)
    assert 0 < life["dp_accounting_pld"] <= life["ours"] + PLD_SLACK


def test_a_ledger_enforced_by_rdp_alone_still_verifies_and_is_now_counted_exactly() -> None:
    """tests/fixtures/ledger-rdp-releases was written by the code of a7f0f78, when RDP alone enforced: a
    vertical job's Hessian and three gradient releases (Gaussian, no sampling), no ``accountant`` field."""
    ledger = FIXTURES / "ledger-rdp-releases"
    raw = [json.loads(line) for line in (ledger / "ledger.jsonl").read_text().splitlines()]
    assert all("accountant" not in entry for entry in raw)  # really written before
    events = verify_ledger(ledger).events
    assert [e.accountant for e in events] == ["rdp"] * 4
    row = audit_ledger(ledger)
    assert row.verified and row.findings == [], row.findings
    records = [r for e in events for r in e.step_records()]
    assert raw[-1]["epsilon_lifetime"] == pytest.approx(epsilon_for(records, 1e-5, "rdp"), rel=1e-12)
    # the headline figure is today's accountant's: the exact one, lower, and PLD agrees with it from above
    life = row.independent["epsilon_lifetime"]
    assert row.epsilon_lifetime == life["ours"] == epsilon_for(records, 1e-5) < 0.95 * raw[-1]["epsilon_lifetime"]
    assert life["ours"] - PLD_SLACK <= life["dp_accounting_pld"] <= life["ours"] + PLD_INTERVAL
    assert [t["epsilon_lifetime"] for t in row.timeline][-1] == row.epsilon_lifetime


def test_the_agency_does_not_take_its_exact_figure_for_missing_entries() -> None:
    """The chain recorded this ledger's lifetime when RDP alone counted it: the ledger's own check compares RDP
    with it and goes on; with the last entry gone it still refuses."""
    from agencyfl.clients.admission import _check_record
    from agencyfl.federation.messages import LedgerRecord

    ledger = FIXTURES / "ledger-rdp-releases"
    events = verify_ledger(ledger).events
    origin = verify_ledger(ledger).origin
    recorded = LedgerRecord(origin=origin, epsilon_lifetime=events[-1].epsilon_lifetime)  # RDP's, 0.2523
    assert epsilon_for([r for e in events for r in e.step_records()], 1e-5) < 0.95 * recorded.epsilon_lifetime
    assert _check_record(events, origin, recorded) is None
    assert "entries are missing" in (_check_record(events[:-1], origin, recorded) or "")


def test_an_entry_claiming_the_exact_accountant_with_another_figure_is_caught(tmp_path: Path) -> None:
    # Gaussian releases: RDP's figure recorded under "rdp+gdp" (or the exact one under "rdp") disagrees
    sigma = 28.9
    mechanism = SelfComposed(event=GaussianEvent(sensitivity=1.0, std=sigma), count=3)
    records = [StepRecord(sigma, 1.0, 3)]
    rdp, exact = epsilon_for(records, 1e-5, "rdp"), epsilon_for(records, 1e-5)
    release = {"kind": "release", "noise_multiplier": sigma, "sample_rate": 1.0, "steps": 3, "mechanism": mechanism}
    cases = (("rdp+gdp", exact, True), ("rdp", rdp, True), ("rdp+gdp", rdp, False), ("rdp", exact, False))
    for accountant, eps, ok in cases:
        entry = _entry(**release, epsilon_job=eps, epsilon_lifetime=eps, accountant=accountant)
        row = audit_ledger(_ledger_of(tmp_path / f"{accountant}-{eps}", entry))
        assert row.verified is ok, (accountant, eps, row.findings)
        if not ok:
            assert any("disagrees with the recomputed" in f.message for f in row.findings)


def test_new_entries_record_their_mechanism_and_every_epsilon_is_recomputed_independently(
    trained: TrainedFederation,
) -> None:
    spec = trained.spec.read_text()
    for path in trained.ledgers:
        entries = [json.loads(line) for line in (path / "ledger.jsonl").read_text().splitlines()][1:]
        spending = [e for e in entries if e["kind"] != "refusal"]
        assert spending and all(e["neighbouring"] == NEIGHBOURING for e in entries)
        for e in spending:
            mechanism = e["mechanism"]
            assert mechanism["type"] == "self_composed" and mechanism["count"] == e["steps"]
            if e["kind"] == "round":  # DP-SGD: Poisson sampling, clip norm as sensitivity, std = sigma * C
                step = mechanism["event"]
                assert step["sampling_probability"] == e["sample_rate"]
                assert step["event"]["sensitivity"] == e["max_grad_norm"]
                assert step["event"]["std"] == pytest.approx(e["noise_multiplier"] * e["max_grad_norm"])
            else:  # a release: counts of sensitivity > 1 (evaluation sqrt 2, fairness sqrt(attributes + 1))
                gaussian = mechanism["event"]
                assert gaussian["type"] == "gaussian" and gaussian["sensitivity"] > 1
                assert gaussian["std"] == pytest.approx(e["noise_multiplier"] * gaussian["sensitivity"])
    assert "fairness" in spec
    result = invoke("audit", "report", *trained.ledgers, "--format", "json")
    assert result.exit_code == 0, result.output
    for row in json.loads(result.stdout)["agencies"]:
        for name in ("epsilon_last_job", "epsilon_lifetime"):
            figures = row["independent"][name]
            assert figures["ours"] == pytest.approx(row[name], rel=1e-12)
            assert math.isclose(figures["dp_accounting_rdp"], figures["ours"], rel_tol=RDP_TOLERANCE), (row, name)
            assert 0 < figures["dp_accounting_pld"] <= figures["ours"] + PLD_SLACK, (row, name)


def _entry(**changes: object) -> LedgerEvent:
    sigma, q, steps = 1.1, 0.01, 300
    eps = epsilon_for([StepRecord(sigma, q, steps)], 1e-5)
    base = LedgerEvent(
        kind="round", agency="tax", job="j1", round=1, noise_multiplier=sigma, sample_rate=q, steps=steps,
        max_grad_norm=1.0, delta=1e-5, epsilon_job=eps, epsilon_lifetime=eps, epsilon_job_cap=3.0, budget=10.0,
        dataset="ab" * 32, time="2026-12-02T10:00:00Z", federation="mla",
        mechanism=dp_sgd_steps(sigma, q, steps, 1.0), mechanism_format=1, neighbouring=NEIGHBOURING,
    )  # fmt: skip
    return base.model_copy(update=changes)


def _ledger_of(tmp_path: Path, *entries: LedgerEvent) -> Path:
    ledger = Ledger(tmp_path / "ledger", Ed25519PrivateKey.generate())
    ledger.ensure_genesis("tax")
    for entry in entries:
        ledger.append(entry)
    return ledger.directory


def test_an_agency_signing_lies_into_its_own_ledger_is_caught(tmp_path: Path) -> None:
    """A steward who re-signs entries with the agency's own key: the chain verifies, the maths does not."""
    honest = audit_ledger(_ledger_of(tmp_path / "honest", _entry()))
    assert honest.verified, honest.findings
    other_relation = audit_ledger(_ledger_of(tmp_path / "relation", _entry(neighbouring="replace_one")))
    assert [f.kind for f in other_relation.findings] == ["epsilon"]
    assert "replace_one" in other_relation.findings[0].message
    # the event claims twice the noise the flat fields (and the spend) say: which one was released?
    inflated = audit_ledger(_ledger_of(tmp_path / "noise", _entry(mechanism=dp_sgd_steps(2.2, 0.01, 300, 1.0))))
    assert any("disagrees with its flat fields" in f.message for f in inflated.findings)
    unanalysed = audit_ledger(
        _ledger_of(
            tmp_path / "laplace", _entry(mechanism=SelfComposed(event=LaplaceEvent(sensitivity=1, scale=1), count=300))
        )
    )
    assert any("does not analyse a laplace event" in f.message for f in unanalysed.findings)


def test_the_html_report_shows_the_independent_recomputation_and_epsilon_findings(tmp_path: Path) -> None:
    honest = audit_ledger(_ledger_of(tmp_path / "honest", _entry()))
    lying = audit_ledger(_ledger_of(tmp_path / "relation", _entry(neighbouring="replace_one")))
    lying.agency = "health"  # two sections to tell apart
    html = render_report(FederationAudit([honest, lying], None, [], []), [], 5, "unverified")
    sections = {
        row.agency: html[html.index(f'<section class="agency" data-agency="{row.agency}"') :] for row in (honest, lying)
    }
    sections = {name: text[: text.index("</section>")] for name, text in sections.items()}
    for row in (honest, lying):
        section = sections[row.agency]
        assert "Independent recomputation (Google dp_accounting)" in section
        for key in ("epsilon_last_job", "epsilon_lifetime"):
            figures = row.independent[key]
            assert 0 < figures["dp_accounting_pld"] < figures["ours"]
            line = section[section.index(f'<tr data-figure="{key}">') :]
            line = line[: line.index("</tr>")]
            names = ("ours", "ours_rdp", "dp_accounting_rdp", "dp_accounting_pld")
            cells = [f"<td>{figures[name]:.4f}</td>" for name in names]
            assert all(cell in line for cell in cells), (line, cells)
    assert "j1" in sections["tax"] and '<p class="ok">Agrees' in sections["tax"]
    assert 'data-kind="epsilon"' not in sections["tax"]
    (finding,) = [f for f in lying.findings if f.kind == "epsilon"]
    shown = f'<li class="bad" data-kind="epsilon">health: epsilon: {html_escape(finding.message)}</li>'
    assert shown in sections["health"] and "Agrees" not in sections["health"]
    findings = html[html.index('<ul id="findings">') :]
    assert shown in findings[: findings.index("</ul>")]  # and in the report's list of every finding


def test_disagreement_with_dp_accounting_is_a_finding() -> None:
    assert Recomputed(1.0, 1.0, 1.0 + RDP_TOLERANCE / 2, 0.9).findings("lifetime") == []
    rdp_off = Recomputed(1.0, 1.0, 1.05, 0.9).findings("lifetime")
    assert [f.kind for f in rdp_off] == ["epsilon"] and "RDP" in rdp_off[0].message
    pld_above = Recomputed(1.0, 1.0, 1.0, 1.2).findings("job j1")
    assert [f.kind for f in pld_above] == ["epsilon"] and "under-counted" in pld_above[0].message
    # enforced by the exact GDP figure (below RDP): PLD, pessimistic, must sit at or just above it
    assert Recomputed(0.9146, 1.0, 1.0, 0.9146 + PLD_INTERVAL / 2).findings("lifetime") == []
    for pld in (0.9146 + 2 * PLD_INTERVAL, 0.9146 - 1e-4):
        (gdp_off,) = Recomputed(0.9146, 1.0, 1.0, pld).findings("lifetime")
        assert gdp_off.kind == "epsilon" and "exact GDP" in gdp_off.message
    (above_rdp,) = Recomputed(1.1, 1.0, 1.0, 0.95).findings("lifetime")
    assert "above our RDP figure" in above_rdp.message
