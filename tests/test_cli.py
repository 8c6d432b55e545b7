"""Every CLI command through typer's CliRunner, including a real 2-round federation of 4 agencies."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import TrainedFederation, invoke

from agencyfl.clients.admission import initial_arrays
from agencyfl.exit_codes import HELP, ExitCode
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.metrics import exact_metrics
from agencyfl.federation.model import build_model, model_from_arrays, predict_proba
from agencyfl.federation.spec import load_spec
from agencyfl.federation.table import load_table
from agencyfl.privacy.accounting import StepRecord, epsilon_for
from agencyfl.privacy.keys import generate_signing_key
from agencyfl.privacy.ledger import LEDGER_FILE, Ledger, LedgerEvent, now_utc, verify_ledger
from agencyfl.server.registry import RegisteredModel
from agencyfl.synth import SynthResult


def test_run_trains_registers_and_reports(trained: TrainedFederation, small_fed: SynthResult) -> None:
    summary = trained.summary
    assert summary["rounds_aggregated"] == 3
    assert set(summary["agencies"]) == {"civil-affairs", "hrss", "tax", "environment"}
    for name, agency in summary["agencies"].items():
        assert agency["rounds_trained"] == 3 and agency["refusals"] == 0
        # the rounds leave room for the noised evaluation and fairness releases; with them the job uses
        # its epsilon of 3, and the summary reports the epsilon after the last release
        events = verify_ledger(trained.ledger(name)).events
        assert events[-1].kind == "release" and events[-1].release == "fairness"
        assert max(e.epsilon_job for e in events if e.kind == "round") < events[-1].epsilon_job
        assert agency["epsilon_job"] == pytest.approx(events[-1].epsilon_job)
        assert 2.9 < events[-1].epsilon_job <= 3.0
    assert 0.0 <= summary["metrics"]["auc"] <= 1.0  # pooled from noised releases; the model is judged below
    # round 0 is the initial model (evaluated by round 1's replies); later rounds the model after them
    assert [h["round"] for h in summary["history"]] == [0, 1, 2, 3]
    # the model learned: on held-out households it beats the model every job starts from
    loaded = load_spec(trained.spec)
    test = load_table(small_fed.test, loaded.spec.schema).valid
    x, y = FeatureEncoder(loaded.spec.schema).encode(test), test["eligible"].to_numpy()
    start = build_model(loaded.spec.model, x.shape[1])
    model_from_arrays(start, initial_arrays(loaded))
    final = RegisteredModel(trained.model).model
    assert exact_metrics(predict_proba(final, x), y).auc > exact_metrics(predict_proba(start, x), y).auc + 0.1
    card = json.loads((trained.model / "card.json").read_text())
    assert card["secure_aggregation"] is True  # on by default
    assert card["purpose"] == "eligibility-identification"
    assert {a["name"] for a in card["agencies"]} == set(summary["agencies"])
    assert all(a["epsilon"] <= 3.0 and len(a["dataset_sha256"]) == 64 for a in card["agencies"])
    assert card["spec_sha256"] and card["code_version"] and card["metrics"]["auc"] == summary["metrics"]["auc"]


def test_evaluate_scores_the_held_out_file(trained: TrainedFederation, small_fed: SynthResult) -> None:
    model = trained.model
    result = invoke("evaluate", "--model", model, "--spec", trained.spec, "--data", small_fed.test, "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scored"] == small_fed.rows["test"] and report["auc"] > 0.75
    assert 0 < report["brier"] < 0.25
    table = invoke("evaluate", "--model", model, "--spec", trained.spec, "--data", small_fed.test)
    assert f"AUC {report['auc']:.4f}" in table.stdout
    missing = invoke("evaluate", "--model", trained.work, "--spec", trained.spec, "--data", small_fed.test)
    assert missing.exit_code == ExitCode.MODEL_INVALID and "not a registered model" in missing.stderr


def test_audit_report_verifies_and_detects_tampering(trained: TrainedFederation, tmp_path: Path) -> None:
    ledgers = trained.ledgers
    result = invoke("audit", "report", *ledgers, "--format", "json")
    assert result.exit_code == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["ok"] and len(report["agencies"]) == 4
    for row in report["agencies"]:
        assert row["verified"] and row["within_budget"] and row["rounds_last_job"] == 3
        assert 0 < row["epsilon_lifetime_prv"] < row["epsilon_lifetime"]
        events = verify_ledger(trained.ledger(row["agency"])).events
        assert row["epsilon_lifetime"] == pytest.approx(events[-1].epsilon_lifetime)  # the releases included
        assert row["epsilon_lifetime"] == pytest.approx(trained.summary["agencies"][row["agency"]]["epsilon_lifetime"])
    table = invoke("audit", "report", *ledgers)
    assert "all ledgers verified" in table.stdout and "civil-affairs" in table.stdout

    copy = tmp_path / "ledger"
    shutil.copytree(ledgers[0], copy)
    data = bytearray((copy / LEDGER_FILE).read_bytes())
    data[100] ^= 0x04
    (copy / LEDGER_FILE).write_bytes(bytes(data))
    broken = invoke("audit", "report", copy, *ledgers[1:])
    assert broken.exit_code == ExitCode.LEDGER_UNVERIFIED
    assert "BROKEN" in broken.stdout or "unreadable" in broken.stdout


def test_second_job_is_refused_by_the_lifetime_budget(copy_of_trained: TrainedFederation) -> None:
    # The same agencies, now with a lifetime budget of 3.1: the first job spent ~3, so every round is refused.
    spec = copy_of_trained.spec.parent / "second-job-tight.toml"
    spec.write_text(re.sub(r"budget = [0-9.]+", "budget = 3.1", copy_of_trained.spec.read_text()))
    result = invoke("run", "--spec", spec, "--workdir", copy_of_trained.work)
    assert result.exit_code == ExitCode.FEDERATION_FAILED
    assert "no round aggregated a model" in result.stderr
    assert "refused" in result.stderr and "lifetime epsilon would reach" in result.stderr
    report = json.loads(invoke("audit", "report", *copy_of_trained.ledgers, "--format", "json").stdout)
    assert report["ok"]
    for row in report["agencies"]:
        # three refused rounds; with no round trained in the job there is no final evaluation to ask for
        assert row["refusals"] == 3 and row["rounds_total"] == 3 and row["jobs"] == 2, (row, result.stderr)
        assert row["epsilon_lifetime"] <= 3.1
    for ledger in copy_of_trained.ledgers:
        second = [e for e in verify_ledger(ledger).events if e.job != copy_of_trained.summary["job"]]
        assert [(e.kind, e.round) for e in second] == [("refusal", 1), ("refusal", 2), ("refusal", 3)]
        assert "lifetime epsilon would reach" in (second[0].reason or "")
        assert all("must start at round 1" in (e.reason or "") for e in second[1:])  # no new job mid-way


def test_audit_report_exit_code_for_overspend(tmp_path: Path) -> None:
    # A signed, internally consistent ledger written by an agent that did not enforce its budget.
    ledger = Ledger(tmp_path / "ledger", generate_signing_key(tmp_path / "k.key"))
    records: list[StepRecord] = []
    for r in range(1, 4):
        records.append(StepRecord(0.8, 0.05, 100))
        eps = epsilon_for(records, 1e-5)
        ledger.append(
            LedgerEvent(
                kind="round",
                agency="tax",
                job="j",
                round=r,
                noise_multiplier=0.8,
                sample_rate=0.05,
                steps=100,
                max_grad_norm=1.0,
                delta=1e-5,
                epsilon_job=eps,
                epsilon_lifetime=eps,
                epsilon_job_cap=100.0,
                budget=5.0,
                dataset="x",
                time=now_utc(),
            )
        )
    result = invoke("audit", "report", ledger.directory)
    assert result.exit_code == ExitCode.BUDGET_EXCEEDED
    assert "exceeds the budget 5" in result.stdout


def test_steward_check_reports_and_quarantines(small_fed: SynthResult) -> None:
    data = small_fed.agency_files["civil-affairs"]
    result = invoke(
        "steward", "check", "--spec", small_fed.spec, "--agency", "civil-affairs", "--data", data, "--format", "json"
    )
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["quarantined"] == 6 and report["valid"] + 6 == report["rows"] == small_fed.rows["civil-affairs"]
    assert Path(report["quarantine_file"]).exists()
    assert report["missing_share"]["pollution_index"] == 1.0  # civil affairs does not know it
    table = invoke("steward", "check", "--spec", small_fed.spec, "--agency", "civil-affairs", "--data", data)
    assert "6 quarantined" in table.stdout and "is not a number" in table.stdout


def test_bad_inputs_give_one_line_and_their_exit_code(small_fed: SynthResult, tmp_path: Path) -> None:
    bad_spec = tmp_path / "bad.toml"
    bad_spec.write_text(small_fed.spec.read_text().replace("epsilon = 3.0", "epsilon = -3"))
    result = invoke("steward", "check", "--spec", bad_spec, "--agency", "tax", "--data", small_fed.test)
    assert result.exit_code == ExitCode.SPEC_INVALID
    assert "privacy.epsilon" in result.stderr and "-3" in result.stderr
    assert "Traceback" not in result.output
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    result = invoke("steward", "check", "--spec", small_fed.spec, "--agency", "tax", "--data", empty)
    assert result.exit_code == ExitCode.DATA_UNUSABLE and "is empty" in result.stderr
    result = invoke("steward", "check", "--spec", small_fed.spec, "--agency", "police", "--data", empty)
    assert result.exit_code == ExitCode.SPEC_INVALID and "not in the spec" in result.stderr
    result = invoke("run", "--spec", tmp_path / "nope.toml")
    assert result.exit_code == ExitCode.SPEC_INVALID and "cannot read spec" in result.stderr


def test_data_synth_writes_a_population(tmp_path: Path) -> None:
    result = invoke("data", "synth", "--out", tmp_path, "--households", 500, "--seed", 9, "--format", "json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert set(report["files"]) == {"civil-affairs", "hrss", "tax", "environment", "test"}
    assert all(Path(p).exists() for p in report["files"].values())
    again = invoke("data", "synth", "--out", tmp_path / "b", "--households", 500, "--seed", 9, "--format", "json")
    assert Path(json.loads(again.stdout)["files"]["tax"]).read_bytes() == Path(report["files"]["tax"]).read_bytes()
    assert invoke("data", "synth", "--out", tmp_path, "--households", 5).exit_code == ExitCode.USAGE


def test_every_exit_code_has_help_text() -> None:
    assert set(HELP) == set(ExitCode)
    assert all(len(text) > 20 for text in HELP.values())
    listed = json.loads(invoke("exit-codes", "--format", "json").stdout)
    assert {int(k) for k in listed} == {int(c) for c in ExitCode}


def test_the_vertical_demo_tells_the_cross_agency_story(tmp_path: Path) -> None:
    result = invoke("demo", "--workdir", tmp_path / "demo", "--households", 3000, "--seed", 4, "--rounds", 3)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "3 iterations" in out and "each ledger verified: yes" in out
    invite = re.search(r"invite to apply \S+ candidates\): ([\d,]+) households, ([\d,]+) truly eligible", out)
    assert invite is not None
    with (tmp_path / "demo" / "worklists" / "worklist.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    listed = [r["household"] for r in rows if r["category"] == "invite"]
    assert int(invite.group(1).replace(",", "")) == len(listed)
    with (tmp_path / "demo" / "data" / "truth" / "households.csv").open() as fh:
        truly = {r["head_id"] for r in csv.DictReader(fh) if r["eligible"] == "1"}
    assert int(invite.group(2).replace(",", "")) == sum(h in truly for h in listed)  # checked against the truth
    duplicates = re.search(r"([\d,]+) of the ([\d,]+) planted duplicate enrolments", out)
    assert duplicates is not None and duplicates.group(1) == duplicates.group(2) != "0"
    assert out.count("epsilon 3.000 for this job") == 4


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = invoke("demo", "--topology", "horizontal", "--workdir", tmp_path / "demo", "--households", 3000,
                    "--seed", 4, "--rounds", 2)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "What happened" in result.stdout and "chain ok, signatures ok" in result.stdout
    planned = re.search(r"(\d+) rounds stay within epsilon", result.stdout)
    assert planned is not None and planned.group(1) == "2"  # --rounds reaches the spec
    test_auc = re.search(r"AUC (\d\.\d+), accuracy \S+, Brier \S+ on \d+ households", result.stdout)
    # held-out test file: well above chance. At 3,000 households the DP noise (OS entropy) spreads the
    # AUC widely: 0.71-0.81 over 7 runs, the code before this floor's change included (0.756, 0.805).
    assert test_auc is not None and float(test_auc.group(1)) > 0.65
    assert len(list((tmp_path / "demo" / "work" / "registry").rglob("card.json"))) == 1
    assert len(list((tmp_path / "demo" / "data").glob("*.quarantine.csv"))) == 4
    assert "fairness across groups" in result.stdout and "coverage gap" in result.stdout
    assert "agencyfl audit verify" in result.stdout and "--coordinator" in result.stdout


def test_too_few_trained_updates_release_nothing(small_fed: SynthResult, tmp_path: Path) -> None:
    """min_agencies = 4 and one agency out of budget: SecAgg+ stops before unmasking, every round."""
    shutil.copytree(small_fed.spec.parent, tmp_path / "data")
    spec = tmp_path / "data" / "all-four.toml"
    spec.write_text(small_fed.spec.read_text().replace("rounds = 3\n", "rounds = 2\nmin_agencies = 4\n"))
    workdir = tmp_path / "work"
    home = workdir / "agencies" / "environment"
    ledger = Ledger(home / "ledger", generate_signing_key(home / "keys" / "ledger-signing.key"))
    spent = [StepRecord(0.87, 0.05, 400)]  # an earlier job left too little of the budget for this one
    eps = epsilon_for(spent, 1e-5)
    assert 9.8 < eps < 10.0  # any further round crosses the budget of 10
    ledger.append(
        LedgerEvent(
            kind="round", agency="environment", job="earlier", round=1, noise_multiplier=0.87, sample_rate=0.05,
            steps=400, max_grad_norm=1.0, delta=1e-5, epsilon_job=eps, epsilon_lifetime=eps,
            epsilon_job_cap=10.0, budget=10.0, dataset="x", time=now_utc(),
        )
    )  # fmt: skip
    result = invoke("run", "--spec", spec, "--workdir", workdir, "--format", "json")
    assert result.exit_code == ExitCode.FEDERATION_FAILED, result.output
    assert not list((workdir / "registry").glob("*/v*")), "no model may be registered"
    assert not list((workdir / "registry").glob("*/checkpoints/*/round-*.npz")), "no aggregate may be released"
    summary = json.loads(next((workdir / "runs").glob("*/summary.json")).read_text())
    assert summary["rounds_aggregated"] == 0 and summary["agencies"]["environment"]["refusals"] == 2
