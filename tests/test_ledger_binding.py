"""Issue 11 items 3-6 as attacks on a real federation's ledgers: reset, headless, swapped and rolled back.

Each test tampers with its own copy of the session's trained federation (``copy_of_trained``) the way a
careless steward, a curious coordinator or an outsider would, and shows the agency or the auditor
refuses it with the documented exit code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from conftest import TrainedFederation, invoke

from agencyfl.exit_codes import ExitCode
from agencyfl.privacy.coordinator_ledger import RoundSummary
from agencyfl.privacy.keys import load_signing_key
from agencyfl.privacy.ledger import HEAD_FILE, LEDGER_FILE, Ledger, LedgerEvent, verify_ledger


def verify(fed: TrainedFederation, ledgers: list[Path], *extra: object) -> tuple[int, dict[str, Any]]:
    result = invoke("audit", "verify", *ledgers, "--format", "json", *extra)
    return result.exit_code, json.loads(result.stdout)


def kinds(report: dict[str, Any]) -> set[str]:
    found = {f["kind"] for row in report["agencies"] for f in row["findings"]}
    found |= {f["kind"] for f in report["cross_check"]}
    if report["coordinator"]:
        found |= {f["kind"] for f in report["coordinator"]["findings"]}
    return found


def signing_key(fed: TrainedFederation, agency: str) -> Path:
    return fed.work / "agencies" / agency / "keys" / "ledger-signing.key"


def test_the_trained_federation_verifies_with_spec_chain_keyring_and_registry(trained: TrainedFederation) -> None:
    code, report = verify(
        trained, trained.ledgers, "--coordinator", trained.chain, "--keyring", trained.keyring,
        "--spec", trained.spec, "--registry", trained.work / "registry",
    )  # fmt: skip
    assert code == 0, report
    chain = verify_ledger(trained.chain, event_type=RoundSummary)
    assert chain.genesis is not None and chain.genesis.party == "coordinator"
    for row in report["agencies"]:
        check = verify_ledger(trained.ledger(row["agency"]))
        assert check.genesis is not None and check.genesis.party == row["agency"] and not row["legacy"]
        # the chain recorded each agency's ledger origin in every round
        assert {r.origin for e in chain.events for r in e.agencies if r.agency == row["agency"]} == {check.origin}


# ---------------------------------------------------------------- item 4: empty or headless ledgers
def test_an_empty_ledger_without_a_head_is_its_own_finding(copy_of_trained: TrainedFederation) -> None:
    fed = copy_of_trained
    victim = fed.ledger("hrss")
    (victim / LEDGER_FILE).write_bytes(b"")
    (victim / HEAD_FILE).unlink()
    code, report = verify(fed, [victim], "--keyring", fed.keyring)
    assert code == ExitCode.LEDGER_HEADLESS, report
    assert report["agencies"][0]["findings"][0]["kind"] == "headless"
    (victim / "ledger.pub").unlink()  # also with the folder's key gone: the keyring's is used
    assert verify(fed, [victim], "--keyring", fed.keyring)[0] == ExitCode.LEDGER_HEADLESS
    (victim / LEDGER_FILE).unlink()  # no file at all
    assert verify(fed, [victim], "--keyring", fed.keyring)[0] == ExitCode.LEDGER_HEADLESS
    report_cmd = invoke("audit", "report", victim, "--keyring", fed.keyring)
    assert report_cmd.exit_code == ExitCode.LEDGER_UNVERIFIED and "headless" in report_cmd.stdout


def test_a_ledger_whose_head_was_deleted_is_headless(copy_of_trained: TrainedFederation) -> None:
    fed = copy_of_trained
    (fed.ledger("tax") / HEAD_FILE).unlink()
    code, report = verify(fed, fed.ledgers, "--coordinator", fed.chain, "--keyring", fed.keyring)
    assert code == ExitCode.LEDGER_HEADLESS, report


def test_a_ledger_line_that_is_json_but_not_an_object_is_one_altered_line(copy_of_trained: TrainedFederation) -> None:
    fed = copy_of_trained
    victim = fed.ledger("tax")
    entries = (victim / LEDGER_FILE).read_bytes().splitlines(keepends=True)
    entries[1] = b"[1, 2, 3]\n"
    (victim / LEDGER_FILE).write_bytes(b"".join(entries))
    result = invoke("audit", "verify", victim, "--keyring", fed.keyring)
    assert result.exit_code == ExitCode.LEDGER_UNVERIFIED, result.output
    assert "Traceback" not in result.output and "line 2: unreadable entry (TypeError)" in result.stdout


# ---------------------------------------------------------------- item 5: ledgers bound to parties
def test_a_ledger_folder_replaced_by_a_copy_of_another_agencys_is_caught(copy_of_trained: TrainedFederation) -> None:
    fed = copy_of_trained
    shutil.rmtree(fed.ledger("hrss"))
    shutil.copytree(fed.ledger("tax"), fed.ledger("hrss"))
    code, report = verify(fed, fed.ledgers, "--coordinator", fed.chain, "--keyring", fed.keyring)
    assert code == ExitCode.LEDGER_PARTY_MISMATCH, report
    messages = [f["message"] for f in report["cross_check"] if f["kind"] == "party"]
    assert any("2 ledgers belong to 'tax'" in m for m in messages)
    assert any("no ledger was given for 'hrss'" in m for m in messages)
    # without the chain, the spec names the agencies
    code, _ = verify(fed, fed.ledgers, "--keyring", fed.keyring, "--spec", fed.spec)
    assert code == ExitCode.LEDGER_PARTY_MISMATCH


def test_leaving_an_agency_out_is_caught(copy_of_trained: TrainedFederation) -> None:
    fed = copy_of_trained
    given = [p for p in fed.ledgers if p.parent.name != "hrss"]
    code, report = verify(fed, given, "--coordinator", fed.chain, "--keyring", fed.keyring)
    assert code == ExitCode.LEDGER_PARTY_MISMATCH, report
    assert [f["party"] for f in report["cross_check"]] == ["hrss"]
    code, report = verify(fed, given, "--keyring", fed.keyring, "--spec", fed.spec)
    assert code == ExitCode.LEDGER_PARTY_MISMATCH and report["cross_check"][0]["party"] == "hrss"


def test_a_ledger_signed_with_another_partys_key_is_caught(copy_of_trained: TrainedFederation) -> None:
    # tax, holding its own key, writes a ledger that claims to be hrss's (genesis and entries say hrss)
    fed = copy_of_trained
    victim = fed.ledger("hrss")
    events = verify_ledger(victim).events
    shutil.rmtree(victim)
    forged = Ledger(victim, load_signing_key(signing_key(fed, "tax")), party="hrss")
    for event in events:
        forged.append(event)
    check = verify_ledger(victim)
    assert check.ok and check.party == "hrss"  # consistent on its own
    code, report = verify(fed, fed.ledgers, "--coordinator", fed.chain, "--keyring", fed.keyring)
    assert code == ExitCode.LEDGER_UNVERIFIED, report  # hrss's key does not sign it ...
    hrss = next(r for r in report["agencies"] if r["agency"] == "hrss")
    assert hrss["findings"][0] == {"kind": "party", "message": "the ledger names 'hrss' but is signed with 'tax''s key"}
    assert "party" in kinds(report)  # ... and the auditor is told whose key does


# ---------------------------------------------------------------- item 6: the coordinator's chain rolled back
def test_a_chain_rolled_back_by_one_job_is_caught(copy_of_trained: TrainedFederation) -> None:
    fed = copy_of_trained
    key = load_signing_key(fed.work / "coordinator" / "keys" / "ledger-signing.key")
    job = fed.summary["job"]
    kept = [e for e in verify_ledger(fed.chain, event_type=RoundSummary).events if e.job != job]
    (fed.chain / LEDGER_FILE).unlink()
    (fed.chain / HEAD_FILE).unlink()
    older = Ledger(fed.chain, key, RoundSummary, party="coordinator")
    older.ensure_genesis()
    for entry in kept:  # the chain as it stood before the job: consistent and signed
        older.append(entry)
    assert verify_ledger(fed.chain, event_type=RoundSummary).ok
    code, report = verify(fed, fed.ledgers, "--coordinator", fed.chain, "--keyring", fed.keyring)
    assert code == ExitCode.CHAIN_ROLLED_BACK, report
    rolled = [f for f in report["cross_check"] if f["kind"] == "rollback"]
    assert {f["party"] for f in rolled} == set(fed.summary["agencies"])
    assert all(job in f["message"] and "3 trained round(s)" in f["message"] for f in rolled)
    registry = fed.work / "registry"
    code, report = verify(
        fed, fed.ledgers, "--coordinator", fed.chain, "--keyring", fed.keyring, "--registry", registry
    )
    assert any(f["party"] == "coordinator" and "is not in the chain" in f["message"] for f in report["cross_check"])
    assert code == ExitCode.CHAIN_ROLLED_BACK
    result = invoke("audit", "report", *fed.ledgers, "--coordinator", fed.chain, "--registry", registry)
    assert result.exit_code != 0 and "rollback" in result.stdout


# ---------------------------------------------------------------- item 3: a restarted ledger
def test_a_fresh_home_is_refused_by_the_agency_and_recorded_by_the_coordinator(
    copy_of_trained: TrainedFederation,
) -> None:
    """A second real federation on the copy (about 30 s): hrss's steward starts over with a fresh home."""
    fed = copy_of_trained
    shutil.rmtree(fed.work / "agencies" / "hrss")  # ledger, key and the key's memory all gone
    result = invoke("run", "--spec", fed.spec, "--workdir", fed.work, "--format", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    hrss = summary["agencies"]["hrss"]
    assert hrss["rounds_trained"] == 0 and hrss["refusals"] == 4  # 3 rounds and the final evaluation
    assert "restarted or replaced" in hrss["last_reason"]
    assert all(summary["agencies"][a]["rounds_trained"] == 3 for a in ("tax", "civil-affairs", "environment"))
    new_ledger = verify_ledger(fed.ledger("hrss"))
    assert [e.kind for e in new_ledger.events] == ["refusal"] * 4  # spent nothing, released nothing
    chain = verify_ledger(fed.chain, event_type=RoundSummary).events
    refused = [r for e in chain if e.job == summary["job"] for r in e.agencies if r.agency == "hrss"]
    assert len(refused) == 4 and not any(r.accepted for r in refused) and not any(r.releases for r in refused)
    code, report = verify(fed, fed.ledgers, "--coordinator", fed.chain)
    assert code == ExitCode.LEDGER_RESTARTED, report


def test_the_coordinator_refuses_a_reply_whose_lifetime_epsilon_went_down(copy_of_trained: TrainedFederation) -> None:
    """Keeps the key and its memory, but puts back an older (shorter) copy of ledger and head."""
    from agencyfl.clients.rounds import TrainRequest, train_round
    from agencyfl.clients.site import AgencySite
    from agencyfl.federation.spec import load_spec
    from agencyfl.server.app import ServerSettings, known_ledgers

    fed = copy_of_trained
    loaded = load_spec(fed.spec)
    settings = ServerSettings(loaded=loaded, workdir=fed.work, job="job-next", min_available=4)
    known = known_ledgers(settings)
    assert set(known) == set(fed.summary["agencies"])
    victim = fed.ledger("tax")
    events = verify_ledger(victim).events
    shutil.rmtree(victim)
    older = Ledger(victim, load_signing_key(signing_key(fed, "tax")), party="tax")
    for event in events[:1]:  # an older copy: one round instead of three and the release
        older.append(event)
    site = AgencySite(agency="tax", spec_path=fed.spec, data_path=loaded.data_path("tax"), home=victim.parent)
    from agencyfl.clients.admission import initial_arrays

    record = known["tax"]
    before = (victim / LEDGER_FILE).read_bytes()
    reply = train_round(site, TrainRequest("job-next", 1, 3, loaded.sha256, initial_arrays(loaded), 3.0, record))
    assert reply.status == "refused" and "entries are missing" in (reply.reason or ""), reply.reason
    assert reply.arrays == [] and reply.dataset == "" and reply.num_examples == 0
    after = verify_ledger(victim).events
    assert (victim / LEDGER_FILE).read_bytes().startswith(before) and [e.kind for e in after[1:]] == ["refusal"]


def test_old_ledgers_without_a_genesis_still_verify_with_a_note(tmp_path: Path) -> None:
    # A ledger as the code before the genesis wrote it: entry 0 is an event (same hashing and signing).
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agencyfl.privacy.keys import public_pem
    from agencyfl.privacy.ledger import GENESIS, now_utc

    def canonical(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    key = Ed25519PrivateKey.generate()
    directory = tmp_path / "ledger"
    directory.mkdir()
    (directory / "ledger.pub").write_bytes(public_pem(key.public_key()))
    prev, lines = GENESIS, []
    for seq in range(2):
        event = LedgerEvent(
            kind="refusal", agency="tax", job="old", round=seq + 1, noise_multiplier=1.0, sample_rate=0.02,
            steps=0, max_grad_norm=1.0, delta=1e-5, epsilon_job=0.0, epsilon_lifetime=0.0, epsilon_job_cap=3.0,
            budget=10.0, dataset="x", time=now_utc(), reason="budget",
        ).model_dump(exclude={"federation"})  # fmt: skip
        body = {"seq": seq, "prev": prev, **event}
        digest = hashlib.sha256(canonical(body)).hexdigest()
        lines.append(canonical({**body, "hash": digest, "sig": key.sign(bytes.fromhex(digest)).hex()}) + b"\n")
        prev = digest
    (directory / LEDGER_FILE).write_bytes(b"".join(lines))
    head_sig = key.sign(f"agencyfl-ledger-head:1:{prev}".encode()).hex()
    (directory / HEAD_FILE).write_bytes(canonical({"seq": 1, "hash": prev, "sig": head_sig}))
    check = verify_ledger(directory)
    assert check.ok and check.legacy and check.genesis is None and check.party == "tax"
    result = invoke("audit", "verify", directory, "--format", "json")
    assert result.exit_code == 0, result.stdout
    notes = json.loads(result.stdout)["notes"]
    assert any("no signed genesis" in n for n in notes)
