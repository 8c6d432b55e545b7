"""`agencyfl screen eligible`: encrypted population scores, worklists for people, every use on the record.

One screening of the shared vertical job (on its own copy, with tax explaining at the ``agency`` level
and environment at the ``feature`` level) serves most checks; the attacks each work on their own copy.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
from conftest import VerticalJob, copy_vertical, invoke

from agencyfl.exit_codes import ExitCode
from agencyfl.federation.errors import ScreeningRefusedError
from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
from agencyfl.privacy.ledger import verify_ledger
from agencyfl.screening.records import ModelUse
from agencyfl.screening.run import disclose, score_register
from agencyfl.screening.worklist import categorize, cause_of
from agencyfl.server.tokens import TokenStore
from agencyfl.vertical.encoding import label_block, register_frame
from agencyfl.vertical.model import RegisteredVerticalModel

HOLDER = "civil-affairs"
PURPOSE = "eligibility-identification"


def _explaining(spec: Path, share: float = 1.0) -> None:
    """Tax explains its contribution, environment its top inputs (for up to ``share`` of the register: the
    3-iteration model's lists are long and vary with the DP noise); HRSS keeps the default (none)."""
    text = spec.read_text()
    text = re.sub(r"\nexplain = .*\nexplain_max = .*\n", "\n", text)
    text = text.replace('name = "tax"\n', f'name = "tax"\nexplain = "agency"\nexplain_max = {share}\n')
    text = text.replace('name = "environment"\n', f'name = "environment"\nexplain = "feature"\nexplain_max = {share}\n')
    spec.write_text(text)


def _loaded(spec: Path) -> LoadedVerticalSpec:
    loaded = load_any_spec(spec)
    assert isinstance(loaded, LoadedVerticalSpec)
    return loaded


def _token(work: Path, purposes: tuple[str, ...] = (PURPOSE,)) -> str:
    return TokenStore(work / "coordinator" / "tokens.json").issue("civil-affairs-caseworkers", purposes)


def _screen(job: VerticalJob, out: Path, token: str, *extra: object) -> Any:
    return invoke("screen", "eligible", "--workdir", job.work, "--model", job.model, "--out", out,
                  "--token", token, "--format", "json", *extra)  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _uses(work: Path, party: str) -> list[ModelUse]:
    check = verify_ledger(work / party / "uses-ledger", event_type=ModelUse)
    assert check.ok, check.problems
    return list(check.events)


@pytest.fixture(scope="module")
def screened(vertical_job: VerticalJob, tmp_path_factory: pytest.TempPathFactory) -> tuple[VerticalJob, dict, Path]:
    job = copy_vertical(vertical_job, tmp_path_factory.mktemp("screened"))
    _explaining(job.spec)
    register_before = _sha(job.data / f"{HOLDER}.csv")
    out = job.work.parent / "lists"
    done = _screen(job, out, _token(job.work))
    assert done.exit_code == 0, done.output
    assert _sha(job.data / f"{HOLDER}.csv") == register_before  # no command changes an enrolment
    report = json.loads(done.stdout)
    assert report["aligned_again"] is False  # no party's file changed since `agencyfl run` aligned
    return job, report, out


def test_the_encrypted_scores_are_the_models_and_only_the_requester_can_read_them(
    screened: tuple[VerticalJob, dict, Path],
) -> None:
    job, _, _ = screened
    loaded = _loaded(job.spec)
    model = RegisteredVerticalModel(job.model)
    logits, parties = score_register(loaded, job.work, model, "scr-test", PURPOSE)
    plain = parties.requester.own_logits() + sum(
        np.clip(c.block.x @ c.weights, -c.score_clip, c.score_clip) for c in parties.contributors.values()
    )  # each holder clips its own part (the model's C)
    assert np.max(np.abs(logits - plain)) < 1e-4  # CKKS error only
    for name, contributor in parties.contributors.items():  # an agency receives a public key, nothing else
        assert [(r.sender, r.content) for r in contributor.received] == [(HOLDER, "public-context")], name
    relay = parties.relay  # the coordinator: one ciphertext set per agency, under a key it does not hold
    assert sorted(r.sender for r in relay.received) == sorted(parties.contributors)
    assert {r.content for r in relay.received} == {"score-ciphertexts"}
    request = parties.requester.request("scr-test", loaded.spec.federation.name, model.version, PURPOSE)
    part = next(iter(parties.contributors.values())).partial_scores(request)
    public = ts.context_from(request.public_context)
    assert not public.has_secret_key()
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(public, part.ciphertexts[0]).decrypt()
    assert [(r.sender, r.content) for r in parties.requester.received] == [("coordinator", "score-ciphertexts")]


def test_worklists_are_private_follow_the_decision_rule_and_change_nothing(
    screened: tuple[VerticalJob, dict, Path],
) -> None:
    job, report, out = screened
    for name in ("worklist.csv", "worklist.html", "screening.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    rows = _rows(out / "worklist.csv")
    counts = {c: sum(r["category"] == c for r in rows) for c in report["counts"]}
    assert counts == report["counts"] and sum(counts.values()) > 0
    frame = register_frame(_loaded(job.spec), job.work)
    assert report["households_scored"] == len(frame)
    band = report["review_band"]
    checked = 0
    for row in rows:  # each row's category is the rule's, from its own score, cutoff and enrolment
        score, cutoff = float(row["score"]), float(row["cutoff"])
        if min(abs(score - edge) for edge in (cutoff - band, cutoff, cutoff + band)) < 1e-4:
            continue  # the CSV rounds scores to 4 decimals: on a boundary the rounded score cannot tell
        got = categorize(np.array([score]), np.array([cutoff]), np.array([row["enrolled"] == "1"]), band)[0]
        assert got == row["category"], row
        checked += 1
    assert checked > 0.95 * len(rows)
    assert all(r["enrolled"] == "0" for r in rows if r["category"] == "invite")
    assert all(r["enrolled"] == "1" for r in rows if r["category"] == "review-enrolment")
    enrolled = dict(zip(frame["household"], frame["enrolled"], strict=True))
    assert all(enrolled[r["household"]] == (r["enrolled"] == "1") for r in rows)  # civil affairs' own record
    html = (out / "worklist.html").read_text()
    assert not re.search(r"<script|<link|(src|href)=\"(https?:)?//", html)
    assert "邀请申请" in html and "No enrolment is changed" in html


def test_reasons_only_from_agencies_that_chose_to_explain_and_recorded_before_sending(
    screened: tuple[VerticalJob, dict, Path],
) -> None:
    job, report, out = screened
    rows = _rows(out / "worklist.csv")
    assert report["disclosures"] == {"hrss": "none", "tax": "agency", "environment": "feature"}
    for row in rows:
        reasons = row["reasons"].split(" | ")
        assert [r.split(":")[0] for r in reasons] == ["tax", "environment"], row
        assert re.search(r"tax: (contribution [+-]\d\.\d\d to the score|no record of this household)", reasons[0])
    environment_reasons = " ".join(r["reasons"] for r in rows)
    assert "pollution" in environment_reasons  # plain labels, not column names
    for agency in ("tax", "environment"):
        disclosures = [u for u in _uses(job.work, agency) if u.kind == "disclosure"]
        assert len(disclosures) == 1 and disclosures[0].screening == report["screening"]
        assert disclosures[0].households == len(rows) == len(set(disclosures[0].positions or []))
    assert not [u for u in _uses(job.work, "hrss") if u.kind == "disclosure"]


def test_every_use_is_recorded_and_the_coordinator_commits_to_the_requesters_entry(
    screened: tuple[VerticalJob, dict, Path], tmp_path: Path
) -> None:
    job, report, _ = screened
    own = [u for u in _uses(job.work, HOLDER) if u.kind == "screening"]
    assert own[-1].counts == report["counts"] and own[-1].token_id == report["token_id"]
    assert own[-1].households == report["households_scored"] and own[-1].purpose == PURPOSE
    coordinator = [u for u in _uses(job.work, "coordinator") if u.kind == "screening"]
    assert coordinator[-1].counts is None  # the caseload's counts stay at civil affairs
    assert coordinator[-1].requester_entry_sha256
    for agency in ("hrss", "tax", "environment"):
        assert any(u.kind == "screening-contribution" and u.screening == report["screening"]
                   for u in _uses(job.work, agency))  # fmt: skip
    audit = invoke("audit", "uses", job.work, "--format", "json")
    assert audit.exit_code == 0, audit.output
    listed = json.loads(audit.stdout)["uses"]
    assert {(u["party"], u["kind"]) for u in listed} >= {
        (HOLDER, "screening"),
        ("coordinator", "screening"),
        ("tax", "disclosure"),
        ("hrss", "screening-contribution"),
    }
    ledgers = [job.work / a / "ledger" for a in ("civil-affairs", "hrss", "tax", "environment")]
    report = invoke("audit", "report", *ledgers, "--uses", job.work, "--format", "json")
    assert report.exit_code == 0, report.output
    in_report = json.loads(report.stdout)["uses"]
    assert in_report["verified"] and len(in_report["uses"]) == len(listed)
    page = tmp_path / "report.html"
    html = invoke("audit", "report", *ledgers, "--uses", job.work, "--format", "html", "--out", page)
    assert html.exit_code == 0, html.output
    assert page.read_text().count('data-use="disclosure"') == 2  # tax and environment, each once
    copy = copy_vertical(job, tmp_path / "copy")  # the requester's ledger gone: the coordinator's commitment dangles
    for path in (copy.work / HOLDER / "uses-ledger").iterdir():
        path.unlink()
    (copy.work / HOLDER / "uses-ledger").rmdir()
    broken = invoke("audit", "uses", copy.work, "--format", "json")
    assert broken.exit_code == ExitCode.ROUND_MISSING
    assert any(f["kind"] == "missing" for f in json.loads(broken.stdout)["findings"])


def test_a_hostile_requester_is_refused_on_the_record_and_gets_nothing(
    screened: tuple[VerticalJob, dict, Path], tmp_path: Path
) -> None:
    job = copy_vertical(screened[0], tmp_path / "copy")
    store = TokenStore(job.work / "coordinator" / "tokens.json")
    other = store.issue("someone", ("fraud-detection",))
    wrong_purpose = _screen(job, tmp_path / "a", other, "--purpose", "fraud-detection")
    assert wrong_purpose.exit_code == ExitCode.SCREENING_REFUSED and "registered for purpose" in wrong_purpose.output
    not_for_it = _screen(job, tmp_path / "b", other)
    assert not_for_it.exit_code == ExitCode.SCREENING_REFUSED and "not 'eligibility-identification'" in (
        not_for_it.output
    )
    revoked = _token(job.work)
    store.revoke(store.lookup(revoked).id)  # type: ignore[union-attr]
    assert _screen(job, tmp_path / "c", revoked).exit_code == ExitCode.SCREENING_REFUSED
    assert _screen(job, tmp_path / "d", "not-a-token").exit_code == ExitCode.SCREENING_REFUSED
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing written
    refusals = [u for u in _uses(job.work, "coordinator") if u.kind == "refusal"]
    assert len(refusals) == 4 and all(u.reason for u in refusals)
    # a known token's refusal names it and its holder, so the auditor can tell whose request it was
    assert [u.requester for u in refusals[:2]] == ["someone", "someone"]
    assert refusals[0].token_id == store.lookup(other).id  # type: ignore[union-attr]
    assert refusals[2].token_id is not None and "revoked" in (refusals[2].reason or "")
    assert refusals[3].token_id is None and refusals[3].requester == "(unknown token)"
    # reasons for the whole register: tax explains at most half of it, and says no on the record
    _explaining(job.spec, share=0.5)  # tax explains at most half of the register
    loaded = _loaded(job.spec)
    _, parties = score_register(loaded, job.work, RegisteredVerticalModel(job.model), "scr-greedy", PURPOSE)
    from agencyfl.alignment.sealed import PartyKeys

    tax = parties.contributors["tax"]
    before = len(_uses(job.work, "tax"))
    with pytest.raises(ScreeningRefusedError, match="at most 50%"):
        disclose(job.work, loaded, tax, PartyKeys.generate(HOLDER), "scr-greedy", "m", PURPOSE,
                 list(range(len(tax.block.x))))  # fmt: skip
    added = _uses(job.work, "tax")[before:]
    assert [u.kind for u in added] == ["refusal"] and added[0].positions is None  # nothing disclosed


def test_a_swapped_part_is_refused_before_anything_is_scored(
    screened: tuple[VerticalJob, dict, Path], tmp_path: Path
) -> None:
    job = copy_vertical(screened[0], tmp_path)
    part = job.work / "tax" / "model" / job.model.name / "weights.npy"
    weights = np.load(part)
    weights[0] += 5.0  # a coordinator (or anyone) swapping tax's weights to probe a household
    np.save(part, weights)
    done = _screen(job, tmp_path / "lists", _token(job.work))
    assert done.exit_code == ExitCode.MODEL_INVALID and "does not match the manifest" in done.output
    assert not (tmp_path / "lists").exists()


def test_since_marks_changes_open_reviews_and_outcomes_become_labels(
    screened: tuple[VerticalJob, dict, Path], tmp_path: Path
) -> None:
    job = copy_vertical(screened[0], tmp_path / "copy")
    first = screened[2] / "worklist.csv"
    rows = _rows(first)
    token = _token(job.work)
    invited = next(r["household"] for r in rows if r["category"] == "invite")
    reviewed = next(r["household"] for r in rows if r["category"] != "invite")
    recorded = invoke("screen", "record-outcome", "--workdir", job.work, "--household", invited,
                      "--outcome", "not-reached", "--format", "json")  # fmt: skip
    assert recorded.exit_code == 0, recorded.output
    # the household's facts change: civil affairs enrols the invited household (its own record)
    path = job.data / f"{HOLDER}.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    from agencyfl.federation.resident_id import normalize

    for i, line in enumerate(lines[1:], start=1):
        cells = line.split(",")
        if normalize(cells[0]) == invited:
            cells[header.index("enrolled")] = "1"
            lines[i] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    again = _screen(job, tmp_path / "next", token, "--since", first)
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report["aligned_again"] is True  # civil affairs' file changed: the register is aligned again
    now = {r["household"]: r for r in _rows(tmp_path / "next" / "worklist.csv")}
    assert invited not in now  # enrolled with a high score: on no list
    left = json.loads((tmp_path / "next" / "screening.json").read_text())["left"]
    assert {"household": invited, "previous_category": "invite", "review_status": "not-reached"} in left
    assert now[reviewed]["change"] == "unchanged" and now[reviewed]["review_status"] == "open"
    assert report["since"]["changes"]["unchanged"] == len(now) and report["left"] == 1
    # confirmed outcomes become labels for the next training
    loaded = _loaded(job.spec)
    frame = register_frame(loaded, job.work)
    _, before = label_block(loaded, job.work)
    unassessed = int(np.flatnonzero(~before.assessed & label_block(loaded, job.work)[0].held)[0])
    household = str(frame["household"].iloc[unassessed])
    invoke("screen", "record-outcome", "--workdir", job.work, "--household", household, "--outcome", "not-eligible")
    _, after = label_block(loaded, job.work)
    assert after.assessed[unassessed] and after.y[unassessed] == 0.0
    assert after.assessed.sum() == before.assessed.sum() + 1


def test_bad_outcomes_are_one_line_errors(screened: tuple[VerticalJob, dict, Path]) -> None:
    job = screened[0]
    bad_id = invoke("screen", "record-outcome", "--workdir", job.work, "--household", "12345", "--outcome", "disagreed")
    assert bad_id.exit_code == ExitCode.DATA_UNUSABLE and "not a valid resident identity number" in bad_id.output
    household = _rows(screened[2] / "worklist.csv")[0]["household"]
    bad = invoke("screen", "record-outcome", "--workdir", job.work, "--household", household, "--outcome", "stopped")
    assert bad.exit_code == ExitCode.DATA_UNUSABLE and "confirmed-invited" in bad.output
    assert "Traceback" not in bad.output + bad_id.output


def test_why_a_category_changed() -> None:
    assert cause_of("invite", "human-review", None, same_model=True) == "facts"
    assert cause_of("invite", "human-review", "invite", same_model=False) == "model"
    assert cause_of("invite", "human-review", "human-review", same_model=False) == "facts"
    assert cause_of("invite", "human-review", "", same_model=False) == "facts and model"
    assert cause_of("invite", "human-review", None, same_model=False).startswith("unknown")


def test_building_a_worklist_leaves_the_garbage_collector_as_it_found_it() -> None:
    """The worklist builders pause the cyclic collector for speed and restore it, even when they fail."""
    import gc

    from agencyfl.screening.run import cycle_collection_paused

    @cycle_collection_paused
    def build(fail: bool) -> bool:
        if fail:
            raise ValueError("a failed build")
        return gc.isenabled()

    assert gc.isenabled() and build(False) is False and gc.isenabled()
    with pytest.raises(ValueError):
        build(True)
    assert gc.isenabled()
    gc.disable()
    try:
        build(False)
        assert not gc.isenabled()  # a caller that had paused it keeps it paused
    finally:
        gc.enable()


def test_each_party_reads_its_file_once_and_the_register_frame_keeps_typed_values(
    vertical_job: VerticalJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parties work at once on one machine (one thread each): civil affairs' table, loaded for its
    block, must still be the one its register frame uses, whatever the other parties loaded meanwhile.
    The register frame keeps numbers as numbers (no Python object per value in a register of a million),
    and a register row whose values failed civil affairs' validation (its id aligned) has every feature
    missing: "unknown" in every group, as before."""
    from agencyfl.federation.fairness import group_labels
    from agencyfl.screening.run import screen_eligible
    from agencyfl.vertical import encoding

    job = copy_vertical(vertical_job, tmp_path)
    loaded = _loaded(job.spec)
    encoding.forget_tables()
    reads: list[str] = []
    real = encoding.load_table

    def counted(path: Path, *args: Any, **kwargs: Any) -> Any:
        reads.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(encoding, "load_table", counted)
    result = screen_eligible(loaded, job.work, job.model, tmp_path / "lists", token=_token(job.work), realign=False)
    assert sorted(reads) == sorted(loaded.data_path(a.name).name for a in loaded.spec.agencies)
    assert result.report["households_scored"] == len(result.frame) == len(register_frame(loaded, job.work))

    path = loaded.data_path(HOLDER)
    lines = path.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    cells = lines[1].rstrip("\n").split(",")
    cells[header.index("household_size")] = "99"  # outside [1, 12]: quarantined by validation, not by alignment
    lines[1] = ",".join(cells) + "\n"
    path.write_text("".join(lines))
    frame = register_frame(loaded, job.work)
    assert frame["household_size"].dtype == np.float64 and frame["head_age"].dtype == np.float64
    features = [f.name for f in loaded.spec.block_schema(HOLDER).features]
    missing = frame[features].isna().all(axis=1).to_numpy()
    assert missing[0] and missing.sum() == 1  # the first file row is the register's first household
    section = loaded.spec.fairness
    assert section is not None
    own = section.model_copy(update={"attributes": [a for a in section.attributes if a in features]})
    assert all(labels[0] == "unknown" for labels in group_labels(frame, own, loaded.spec.schema_).values())
