"""Fairness through a real federation: noised, accounted counts; the card; audit fairness; evaluate with reasons."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TrainedFederation, invoke

from agencyfl.clients.rounds import fairness_round
from agencyfl.clients.site import AgencySite
from agencyfl.exit_codes import ExitCode
from agencyfl.federation.model import build_model
from agencyfl.federation.reasons import contributions
from agencyfl.federation.spec import ModelSection, load_spec
from agencyfl.privacy.ledger import verify_ledger
from agencyfl.synth import SynthResult


def with_fairness(small_fed: SynthResult, extra: str, name: str) -> Path:
    text = small_fed.spec.read_text()
    text = re.sub(r"(\[fairness\]\n)", rf"\1{extra}\n", text)
    spec = small_fed.spec.parent / name
    spec.write_text(text)
    return spec


def test_noised_release_is_accounted_and_verifies(trained: TrainedFederation) -> None:
    for ledger in trained.summary["ledgers"].values():
        events = verify_ledger(ledger).events
        # each round: the noised evaluation of the model it starts from, then the round; at the end the
        # final model's evaluation and the fairness counts
        assert [e.kind for e in events] == ["release", "round"] * 3 + ["release", "release"]
        assert [e.release for e in events if e.kind == "release"] == ["evaluation"] * 4 + ["fairness"]
        release = events[-1]
        assert release.noise_multiplier == 5.0 and release.sample_rate == 1.0 and release.steps == 1
        assert events[-2].epsilon_job < release.epsilon_job <= 3.0  # the release fits in the job's epsilon
    verified = invoke("audit", "verify", *trained.ledgers, "--coordinator", trained.chain, "--format", "json")
    assert verified.exit_code == 0, verified.stdout  # releases recomputed, and cross-checked with the chain
    card = json.loads((trained.model / "card.json").read_text())
    assert card["fairness"]["release"].startswith("noised counts")
    assert set(card["fairness"]["agencies"].values()) == {"noised"}


def test_card_ships_as_markdown_and_html_with_the_fairness_table(trained: TrainedFederation) -> None:
    card = json.loads((trained.model / "card.json").read_text())
    markdown = (trained.model / "card.md").read_text()
    html = (trained.model / "card.html").read_text()
    for text in (markdown, html):
        assert "Intended use" in text and "Known limitations" in text and "region_type" in text
        for agency in card["agencies"]:
            assert agency["name"] in text
    assert "<table>" in html and "coverage of eligible (TPR)" in html
    mitigation = card["mitigation"]
    assert mitigation["attribute"] == "region_type" and set(mitigation["thresholds"]) == {"urban", "rural", "unknown"}


def test_audit_fairness_reports_pass_or_fail_with_its_exit_code(trained: TrainedFederation, tmp_path: Path) -> None:
    result = invoke("audit", "fairness", "--model", trained.model, "--format", "json")
    report = json.loads(result.stdout)
    assert result.exit_code == (ExitCode.OK if report["fairness"]["passed"] else ExitCode.FAIRNESS_GAP_EXCEEDED)
    gaps = report["fairness"]["attributes"]["region_type"]["gaps"]["tpr"]
    assert gaps["tolerance"] == 0.1 and (gaps["passed"] is None or gaps["passed"] == (gaps["gap"] <= 0.1))
    table = invoke("audit", "fairness", "--model", trained.model)
    assert "coverage of eligible" in table.stdout and ("pass" in table.stdout or "FAIL" in table.stdout)
    page = tmp_path / "fairness.html"
    html = invoke("audit", "fairness", "--model", trained.model, "--format", "html", "--out", page)
    assert html.exit_code == result.exit_code and "<table>" in page.read_text()


def with_tolerance(model: Path, target: Path, gap: float) -> Path:
    """A copy of the registered model whose spec sets every fairness tolerance to ``gap``."""
    shutil.copytree(model, target)
    spec = target / "spec.toml"
    text = re.sub(r"max_(tpr|fpr)_gap = [0-9.]+\n", "", spec.read_text())
    text = text.replace(
        "[fairness]\n", f"[fairness]\nmax_tpr_gap = {gap}\nmax_fpr_gap = {gap}\nmax_selection_gap = {gap}\n"
    )
    spec.write_text(text)
    return target


def test_a_strict_tolerance_fails_and_a_loose_one_passes(
    small_fed: SynthResult, trained: TrainedFederation, tmp_path: Path
) -> None:
    # The same model judged on the held-out file: only the tolerance in its spec differs, and decides the exit code.
    verdicts = {}
    for name, gap in [("strict", 0.0), ("loose", 1.0)]:
        model = with_tolerance(trained.model, tmp_path / name, gap)
        result = invoke("audit", "fairness", "--model", model, "--data", small_fed.test, "--format", "json")
        report = json.loads(result.stdout)
        assert report["with_group_thresholds"] is not None  # the card's thresholds applied to the file
        gaps = report["fairness"]["attributes"]["region_type"]["gaps"]["tpr"]
        assert gaps["tolerance"] == gap and gaps["gap"] is not None  # groups large enough to judge
        verdicts[name] = (result.exit_code, report["fairness"]["failures"])
    strict_code, strict_failures = verdicts["strict"]
    assert strict_code == ExitCode.FAIRNESS_GAP_EXCEEDED and strict_failures
    assert any("region_type: tpr gap" in f for f in strict_failures)
    assert verdicts["loose"] == (ExitCode.OK, [])


def test_evaluate_writes_decisions_with_reasons(
    trained: TrainedFederation, small_fed: SynthResult, tmp_path: Path
) -> None:
    out = tmp_path / "decisions.csv"
    result = invoke(
        "evaluate", "--model", trained.model, "--spec", trained.spec, "--data", small_fed.test, "--out", out,
        "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    decisions = pd.read_csv(out)
    assert len(decisions) == report["scored"] and report["group_thresholds"]
    assert set(decisions["decision"]) <= {"eligible", "not eligible"}
    schema = load_spec(trained.spec).spec.schema
    labels = [schema.plain_label(f.name) for f in schema.features]
    reasons = decisions["reasons"].dropna()
    assert len(reasons) > 0.9 * len(decisions)
    assert all(
        any(part.startswith(label + " (") for label in labels) for r in reasons.head(50) for part in r.split("; ")
    )
    assert report["fairness"]["threshold"] == 0.5


def test_release_refused_when_the_budget_is_spent(small_fed: SynthResult, tmp_path: Path) -> None:
    # A ledger with no room left: the agency records the refusal and releases nothing.
    spec = with_fairness(small_fed, "noise_multiplier = 2.0", "tight-fair.toml")
    spec.write_text(re.sub(r"budget = [0-9.]+", "budget = 3.0", spec.read_text()))
    loaded = load_spec(spec)
    site = AgencySite(agency="tax", spec_path=spec, data_path=loaded.data_path("tax"), home=tmp_path / "tax")
    model = build_model(loaded.spec.model, 40)
    arrays = [p.detach().numpy() for p in model.parameters()]
    first = fairness_round(site, arrays, "job-1", seed=1)
    assert first.status == "noised" and first.counts.shape[0] > 0
    spent = verify_ledger(site.ledger_dir).events
    assert [e.kind for e in spent] == ["release"]
    again = [fairness_round(site, arrays, "job-1", seed=s) for s in range(2, 4)]
    refused = [r for r in again if r.status == "refused"]
    assert refused and refused[0].counts.size == 0 and "fairness release refused" in (refused[0].reason or "")
    events = verify_ledger(site.ledger_dir).events
    assert events[-1].kind == "refusal" and max(e.epsilon_job for e in events) <= 3.0


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_contributions_add_up_to_the_logit_against_the_reference(kind: str) -> None:
    section = ModelSection(kind=kind, hidden=[8] if kind == "mlp" else [], activation="relu")
    model = build_model(section, 6, seed=3)
    x = np.random.default_rng(0).uniform(-1, 1, (20, 6)).astype(np.float32)
    contrib = contributions(model, x)
    with torch.no_grad():
        logit = model(torch.as_tensor(x)).squeeze(-1).numpy() - model(torch.zeros(1, 6)).squeeze(-1).numpy()
    tolerance = 1e-5 if kind == "logistic" else 2e-2  # exact vs integrated gradients' quadrature
    assert np.allclose(contrib.sum(1), logit, atol=tolerance)
