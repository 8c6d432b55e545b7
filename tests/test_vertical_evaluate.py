"""Issue 16 part 2: ``evaluate`` of a vertical model on a joined labelled file, and ``run --dry-run``.

Every test reads the session's ``vertical_job`` (3,000 households, 3 iterations, per-job epsilon 3,
lifetime budget 4); a test that runs anything that writes works on ``copy_vertical``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import VerticalJob, copy_vertical, invoke

from agencyfl.exit_codes import ExitCode
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.resident_id import InvalidResidentId, normalize
from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
from agencyfl.federation.table import load_table
from agencyfl.privacy.accounting import epsilon_for
from agencyfl.privacy.ledger import spend_records, verify_ledger
from agencyfl.vertical.encoding import feature_block, label_block, register_frame
from agencyfl.vertical.evaluate import score_joined
from agencyfl.vertical.model import RegisteredVerticalModel, load_part
from agencyfl.vertical.optim import clip_scores


def _loaded(job: VerticalJob) -> LoadedVerticalSpec:
    loaded = load_any_spec(job.spec)
    assert isinstance(loaded, LoadedVerticalSpec)
    return loaded


def _parts(job: VerticalJob) -> dict[str, np.ndarray]:
    """Each part straight from its agency's folder (the path the manifest gives), no hash check."""
    manifest = json.loads((job.model / "manifest.json").read_text())
    return {name: np.load(job.work / name / part["path"]) for name, part in manifest["parts"].items()}


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def _independent_scores(job: VerticalJob, data: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Scores of the joined file from its raw text, the encoder and the parts, in plain numpy."""
    spec = _loaded(job).spec
    raw = pd.read_csv(data, dtype=str, keep_default_na=False)
    typed = load_table(data, spec.schema_, write_quarantine=False).valid
    assert len(typed) == len(raw)
    parts = _parts(job)
    clip = json.loads((job.model / "manifest.json").read_text())["score_clip"]  # each holder clips its part
    logits = np.zeros(len(raw))
    held: dict[str, np.ndarray] = {}
    for name, columns in spec.feature_blocks().items():
        encoder = FeatureEncoder(spec.block_schema(name))
        holds = (raw[list(columns)].apply(lambda c: c.str.strip()) != "").any(axis=1).to_numpy()
        x = np.zeros((len(raw), encoder.width + 1))
        x[holds, :-1] = encoder.encode(typed[list(columns)])[holds]
        x[~holds, -1] = 1.0
        norms = np.sqrt((x**2).sum(axis=1))
        x = x / np.maximum(norms, 1.0)[:, None]
        w = parts[name]
        part = x @ w[: encoder.width + 1]
        if name == spec.label_agency.name:
            assert len(w) == encoder.width + 2
            part += w[-1]
        logits += np.clip(part, -clip, clip)
        held[name] = holds
    return 1 / (1 + np.exp(-logits)), held


def test_evaluate_a_vertical_model_on_the_joined_test_file(vertical_job: VerticalJob, tmp_path: Path) -> None:
    data = vertical_job.data / "test.csv"
    out = tmp_path / "decisions.csv"
    result = invoke("evaluate", "--model", vertical_job.model, "--spec", vertical_job.spec, "--data", data,
                    "--out", out, "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["topology"] == "vertical" and report["model_version"] == vertical_job.summary["model_version"]
    assert report["workdir"] == str(vertical_job.work.resolve())
    assert report["quarantined"] == 0 and report["scored"] == report["rows"] > 400
    assert report["auc"] > 0.7, report

    # the same scores, computed independently from the raw file and the parts
    expected, held = _independent_scores(vertical_job, data)
    decisions = pd.read_csv(out, dtype={"head_id": str})
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    raw_ids = pd.read_csv(data, dtype=str)["head_id"].to_numpy()
    assert (decisions["head_id"].to_numpy() == raw_ids).all()
    assert np.allclose(decisions["score"].to_numpy(), expected, atol=1e-6)
    labels = decisions["label"].to_numpy()
    assert report["auc"] == pytest.approx(_auc(expected, labels), abs=1e-9)
    assert report["brier"] == pytest.approx(np.mean((expected - labels) ** 2), abs=1e-9)
    assert report["held"] == {name: int(h.sum()) for name, h in held.items()}
    assert report["held"]["civil-affairs"] == report["scored"] > report["held"]["tax"]

    # coverage, mean score and eligible rate agree with the per-household file, overall and for complete households
    eligible = decisions["decision"].to_numpy() == "eligible"
    scores, cutoffs = decisions["score"].to_numpy(), decisions["cutoff"].to_numpy()
    clear = np.abs(scores - cutoffs) > 1e-6  # the file rounds scores: a score on the cutoff cannot tell
    assert clear.mean() > 0.95 and (eligible == (scores >= cutoffs))[clear].all()
    assert report["threshold"] == 0.5 and report["group_thresholds"] is None
    assert report["eligible"] == eligible.sum()
    assert report["eligible_rate"] == pytest.approx(eligible.mean(), abs=1e-12)
    assert report["coverage_of_eligible"] == pytest.approx(eligible[labels == 1].mean(), abs=1e-12)
    assert report["mean_score"] == pytest.approx(decisions["score"].mean(), abs=1e-6)
    complete = decisions["complete"].to_numpy() == 1
    assert (complete == np.logical_and.reduce(list(held.values()))).all()
    assert (complete == decisions["not_held_by"].isna().to_numpy()).all()
    sub = report["complete"]
    assert sub["households"] == complete.sum() > 50
    assert sub["coverage_of_eligible"] == pytest.approx(eligible[complete & (labels == 1)].mean(), abs=1e-12)
    assert sub["eligible_rate"] == pytest.approx(eligible[complete].mean(), abs=1e-12)
    assert sub["mean_score"] == pytest.approx(decisions["score"][complete].mean(), abs=1e-6)
    assert sub["auc"] == pytest.approx(_auc(expected[complete], labels[complete]), abs=1e-9)
    assert report["fairness"] is not None and report["fairness"]["release"] == "exact counts on test.csv"

    table = invoke("evaluate", "--model", vertical_job.model, "--spec", vertical_job.spec, "--data", data)
    assert table.exit_code == 0, table.output
    assert "coverage of the eligible" in table.stdout and "complete households" in table.stdout


def test_evaluate_scores_a_household_as_training_scores_its_register_position(vertical_job: VerticalJob) -> None:
    """Register households joined from the agencies' own files score as the training blocks score them."""
    loaded = _loaded(vertical_job)
    spec, work = loaded.spec, vertical_job.work
    holder = spec.label_agency.name
    model = RegisteredVerticalModel(vertical_job.model)
    parts = {a.name: load_part(work, a.name, model.manifest) for a in spec.agencies}
    blocks = {a.name: feature_block(loaded, a.name, work) for a in spec.agencies if a.name != holder}
    blocks[holder] = label_block(loaded, work)[0]
    clip = model.manifest.score_clip
    assert clip is not None  # each holder clips its own part's score: evaluate must clip it the same way
    raw = {n: b.x @ parts[n][: b.width] + (parts[holder][-1] if n == holder else 0.0) for n, b in blocks.items()}
    trained = sum(clip_scores(u, clip)[0] for u in raw.values())

    households = register_frame(loaded, work)["household"].to_numpy()
    joined = pd.DataFrame({spec.schema_.id: households})
    for a in spec.agencies:
        valid = load_table(loaded.data_path(a.name), spec.block_schema(a.name), require_label=False,
                           write_quarantine=False).valid  # fmt: skip

        def canonical(raw: str) -> str | None:
            try:
                return normalize(raw)
            except InvalidResidentId:
                return None

        valid.index = pd.Index([canonical(i) for i in valid[spec.schema_.id]])
        valid = valid[valid.index.notna() & ~valid.index.duplicated(keep=False)]
        for column in spec.feature_blocks()[a.name]:
            joined[column] = valid[column].reindex(households).to_numpy()
    logits, held = score_joined(spec, parts, joined, clip)

    blank = np.zeros(len(households), dtype=bool)  # held, but every field of the block unrecorded: reads as not held
    for name, block in blocks.items():
        differs = held[name] != block.held
        assert not (held[name] & ~block.held).any()
        blank |= differs
    assert blank.mean() < 0.05
    assert np.allclose(logits[~blank], trained[~blank], atol=1e-9)


def test_a_model_folder_outside_its_workdir_is_exit_8(vertical_job: VerticalJob, tmp_path: Path) -> None:
    loose = tmp_path / "models" / vertical_job.model.name
    shutil.copytree(vertical_job.model, loose)
    result = invoke("evaluate", "--model", loose, "--spec", vertical_job.spec, "--data",
                    vertical_job.data / "test.csv")  # fmt: skip
    assert result.exit_code == ExitCode.MODEL_INVALID
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "inside a workdir" in result.stderr and result.stdout == ""


def _tree_sha256(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _dry_run(job: VerticalJob) -> dict[str, Any]:
    result = invoke("run", "--spec", job.spec, "--workdir", job.work, "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_dry_run_plans_what_the_run_then_records(vertical_job: VerticalJob, tmp_path: Path) -> None:
    job = copy_vertical(vertical_job, tmp_path)
    iterations = job.summary["rounds_planned"]
    before = _tree_sha256(job.work)
    assert any("/ledger/" in p for p in before)

    # with a larger budget than the fixture's 4 the job fits: the dry run's figures are what the real run records
    job.spec.write_text(re.sub(r"budget = [0-9.]+", "budget = 10.0", job.spec.read_text()))
    report = _dry_run(job)
    assert _tree_sha256(job.work) == before  # nothing aligned, trained or recorded
    assert report["would_run"] is True and report["stops_at"] is None
    assert report["releases"]["count"] == iterations + 2  # block Newton's Hessian, the iterations, fairness
    kinds = {r["release"]: r for r in report["releases"]["by_kind"]}
    assert kinds["vertical-gradient"]["count"] == iterations and kinds["fairness"]["count"] == 1
    assert kinds["vertical-hessian"]["count"] == 1 and report["plan"]["optimizer"] == "newton"
    assert kinds["vertical-hessian"]["sensitivity"] == pytest.approx(np.sqrt(4 + 2) / 4)
    assert kinds["vertical-hessian"]["noise_multiplier"] == pytest.approx(job.summary["noise_multiplier"])
    assert kinds["vertical-gradient"]["sensitivity"] == pytest.approx(job.summary["sensitivity"])
    assert kinds["vertical-gradient"]["noise_multiplier"] == pytest.approx(job.summary["noise_multiplier"])
    assert report["register"] == {"size": job.summary["alignment"]["register"], "ciphertexts_per_vector": 1,
                                  "source": "the alignment output in the workdir"}  # fmt: skip

    done = invoke("run", "--spec", job.spec, "--workdir", job.work, "--format", "json")
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["plan"] == report["plan"]  # the order, averaging, learning rate and damping it was made with
    assert summary["plan"]["damping"] == 0.5 and summary["plan"]["order"] == "sequential"
    for name, row in summary["agencies"].items():
        planned = report["agencies"][name]
        assert planned["epsilon_job_planned"] == pytest.approx(row["epsilon_job"], rel=1e-9)
        assert planned["epsilon_lifetime_planned"] == pytest.approx(row["epsilon_lifetime"], rel=1e-9)
        assert planned["epsilon_lifetime_after"] == pytest.approx(row["epsilon_lifetime"], rel=1e-9)
        check = verify_ledger(job.work / name / "ledger")
        assert check.ok
        recorded = [e for e in check.events if e.job == summary["job"]]
        assert [e.release for e in recorded] == ["vertical-hessian"] + ["vertical-gradient"] * iterations + ["fairness"]
        assert len(spend_records(check.events)) == planned["ledger_entries"] + iterations + 2
    for party, sent in summary["bytes_per_iteration"].items():
        assert report["bytes_per_iteration"][party] == pytest.approx(sent, rel=0.01), party


def test_dry_run_says_where_a_cap_would_stop_the_job(vertical_job: VerticalJob, tmp_path: Path) -> None:
    """The lifetime budget of 4 leaves room for part of a second job: the run then stops where the dry run said."""
    job = copy_vertical(vertical_job, tmp_path)
    before = _tree_sha256(job.work)
    refused = _dry_run(job)
    assert _tree_sha256(job.work) == before
    stop = refused["stops_at"]
    assert refused["would_run"] is False and 1 <= stop["iteration"] <= job.summary["rounds_planned"]
    assert "lifetime epsilon would reach" in stop["reason"] and stop["refused_by"] == sorted(refused["agencies"])
    for row in refused["agencies"].values():
        assert row["epsilon_lifetime_now"] == pytest.approx(3.0, abs=1e-3)
        assert row["epsilon_lifetime_planned"] > 4.0 >= row["epsilon_lifetime_after"]
        assert row["refused"]["release"] == "vertical-gradient" and row["refused"]["iteration"] == stop["iteration"]
    table = invoke("run", "--spec", job.spec, "--workdir", job.work, "--dry-run")
    assert f"the job would stop before iteration {stop['iteration']}" in table.stdout
    averaged = refused["plan"]["averaged_iterations"]
    assert refused["plan"]["order"] == "sequential" and averaged == -(-refused["plan"]["iterations"] // 2)
    said = " ".join(table.stdout.split())  # the table's lines wrap where the terminal ends
    assert f"agencies step in turn, the model the mean of the last {averaged} iterations" in said

    stopped = invoke("run", "--spec", job.spec, "--workdir", job.work, "--format", "json")
    assert stopped.exit_code == ExitCode.FEDERATION_FAILED, stopped.output
    for name, row in refused["agencies"].items():
        events = verify_ledger(job.work / name / "ledger").events
        new = events[row["ledger_entries"] :]
        # the Hessian release, the iterations before the stop, the refusal
        assert [e.kind for e in new] == ["release"] * stop["iteration"] + ["refusal"]
        assert new[-1].round == stop["iteration"]
        assert epsilon_for(spend_records(events), 1e-5) == pytest.approx(row["epsilon_lifetime_after"], rel=1e-9)
        assert epsilon_for(spend_records(events, new[0].job), 1e-5) == pytest.approx(row["epsilon_job_after"], rel=1e-9)


def test_dry_run_in_a_new_workdir_writes_nothing(vertical_job: VerticalJob, tmp_path: Path) -> None:
    work = tmp_path / "new"
    result = invoke("run", "--spec", vertical_job.spec, "--workdir", work, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not work.exists()
    assert "the job would run" in result.stdout and "civil-affairs's file rows" in result.stdout
    report = json.loads(invoke("run", "--spec", vertical_job.spec, "--workdir", work, "--dry-run", "--format",
                               "json").stdout)  # fmt: skip
    assert not work.exists()
    for row in report["agencies"].values():
        assert row["epsilon_lifetime_now"] == 0.0 and row["ledger_entries"] == 0
        assert row["epsilon_job_planned"] == pytest.approx(3.0, abs=1e-3)
        assert row["epsilon_job_planned"] <= row["epsilon_job_cap"]


def test_dry_run_is_for_vertical_specs(tmp_path: Path) -> None:
    from agencyfl.synth import synthesize

    horizontal = synthesize(tmp_path / "h", households=400, seed=1, rounds=2)
    result = invoke("run", "--spec", horizontal.spec, "--workdir", tmp_path / "work", "--dry-run")
    assert result.exit_code == ExitCode.USAGE
    assert "--dry-run is for vertical specs" in result.stderr
    assert not (tmp_path / "work").exists()
