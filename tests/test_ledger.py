from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agencyfl.federation.errors import LedgerError
from agencyfl.privacy.audit import audit_ledger
from agencyfl.privacy.ledger import HEAD_FILE, LEDGER_FILE, Ledger, LedgerEvent, now_utc, verify_ledger


def event(round_: int, kind: str = "round", job: str = "j1", eps: float = 0.0, life: float = 0.0) -> LedgerEvent:
    return LedgerEvent(
        kind=kind,
        agency="tax",
        job=job,
        round=round_,
        noise_multiplier=1.0,
        sample_rate=0.02,
        steps=50 if kind == "round" else 0,
        max_grad_norm=1.0,
        delta=1e-5,
        epsilon_job=eps,
        epsilon_lifetime=life,
        epsilon_job_cap=3.0,
        budget=10.0,
        dataset="ab" * 32,
        time=now_utc(),
    )


@pytest.fixture()
def ledger_dir(tmp_path: Path) -> Path:
    ledger = Ledger(tmp_path / "ledger", Ed25519PrivateKey.generate())
    for r in range(1, 6):
        ledger.append(event(r))
    assert verify_ledger(ledger.directory).ok
    return ledger.directory


def lines(d: Path) -> list[bytes]:
    return (d / LEDGER_FILE).read_bytes().splitlines(keepends=True)


def test_clean_ledger_verifies_and_reads_back(ledger_dir: Path) -> None:
    check = verify_ledger(ledger_dir)
    assert check.ok and [e.round for e in check.events] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("offset", [10, 60, 200, 330])
def test_a_flipped_byte_is_detected(ledger_dir: Path, offset: int) -> None:
    data = bytearray((ledger_dir / LEDGER_FILE).read_bytes())
    data[offset] ^= 0x01
    (ledger_dir / LEDGER_FILE).write_bytes(bytes(data))
    check = verify_ledger(ledger_dir)
    assert not check.ok and check.findings[0].kind == "altered"


def test_a_deleted_entry_is_detected(ledger_dir: Path) -> None:
    kept = lines(ledger_dir)
    del kept[2]
    (ledger_dir / LEDGER_FILE).write_bytes(b"".join(kept))
    check = verify_ledger(ledger_dir)
    assert not check.chain_ok and [f.kind for f in check.findings] == ["deleted"]


def test_reordered_entries_are_detected(ledger_dir: Path) -> None:
    kept = lines(ledger_dir)
    kept[1], kept[3] = kept[3], kept[1]
    (ledger_dir / LEDGER_FILE).write_bytes(b"".join(kept))
    check = verify_ledger(ledger_dir)
    assert not check.chain_ok and {f.kind for f in check.findings} == {"reordered"}


def test_truncation_is_detected(ledger_dir: Path) -> None:
    whole = (ledger_dir / LEDGER_FILE).read_bytes()
    (ledger_dir / LEDGER_FILE).write_bytes(b"".join(lines(ledger_dir)[:3]))  # whole entries cut off
    check = verify_ledger(ledger_dir)
    assert not check.head_ok and [f.kind for f in check.findings] == ["truncated"]
    assert "removed from the end" in check.problems[0]
    (ledger_dir / LEDGER_FILE).write_bytes(whole[:-40])  # cut mid-entry
    check = verify_ledger(ledger_dir)
    assert not check.ok and {f.kind for f in check.findings} == {"truncated"}


def test_a_writer_stopped_mid_write_goes_on_and_nothing_signed_is_cut(tmp_path: Path) -> None:
    """A stop mid-write leaves a partial line the head never recorded, or a whole line whose head never
    moved: a chain whose writer must go on (vertical receipts) finishes its own write; a cut into a recorded
    entry, or a newline lost, stays a finding with its bytes kept."""
    key = Ed25519PrivateKey.generate()
    ledger = Ledger(tmp_path / "l", key)
    for r in (1, 2, 3):
        ledger.append(event(r))
    whole = ledger.path.read_bytes()
    head = (ledger.directory / HEAD_FILE).read_bytes()
    line = lines(ledger.directory)[-1]
    for cut in (20, len(line) * 3 // 4, len(line) - 2):  # torn early, past its "prev", just short of whole
        ledger.path.write_bytes(whole + line[:cut])
        check = verify_ledger(ledger.directory)
        assert not check.ok and check.ok_but_torn and len(check.events) == 3
        assert ledger.recover_after_stop() == "cut off a line torn while it was written"
        assert ledger.path.read_bytes() == whole
    ledger.append(event(4))
    assert [e.round for e in ledger.events()] == [1, 2, 3, 4]
    # stopped after the line, before the head moved
    (ledger.directory / HEAD_FILE).write_bytes(head)
    assert not verify_ledger(ledger.directory).ok
    assert ledger.recover_after_stop() == "moved the head to the last whole entry"
    assert verify_ledger(ledger.directory).ok
    after = ledger.path.read_bytes()
    for damaged in (after[:-40], after[:-1], after[:-300]):  # into the recorded entry 4; its newline lost
        ledger.path.write_bytes(damaged)
        assert not verify_ledger(ledger.directory).ok_but_torn and ledger.recover_after_stop() is None
        assert ledger.path.read_bytes() == damaged  # left for the steward: nothing signed is cut
    # a genesis torn (no whole line, no head), or whole with no head yet: the writer starts or goes on
    fresh = Ledger(tmp_path / "fresh", key, party="tax")
    fresh.ensure_genesis()
    genesis = fresh.path.read_bytes()
    (fresh.directory / HEAD_FILE).unlink()
    fresh.path.write_bytes(genesis[:30])
    assert fresh.recover_after_stop() == "removed a ledger file with no whole entry and no head"
    fresh.path.write_bytes(genesis)
    assert fresh.recover_after_stop() == "moved the head to the last whole entry"
    fresh.append(event(1))
    assert verify_ledger(fresh.directory).ok


def test_entries_past_python_s_limits_are_findings_not_crashes(ledger_dir: Path) -> None:
    kept = lines(ledger_dir)
    surrogate = json.dumps(json.loads(kept[2]) | {"prev": "\ud800"}).encode() + b"\n"  # valid JSON, not UTF-8
    for bad in (b'{"seq": 1e400, "hash": "00", "sig": "00"}\n', surrogate, b"[" * 100_000 + b"]" * 100_000 + b"\n"):
        (ledger_dir / LEDGER_FILE).write_bytes(b"".join([*kept[:2], bad, *kept[3:]]))
        check = verify_ledger(ledger_dir)
        assert not check.ok and check.findings[0].kind == "altered"
    (ledger_dir / HEAD_FILE).write_bytes(b'{"seq": 1e400, "hash": "00", "sig": "00"}')
    assert not verify_ledger(ledger_dir).head_ok


def test_a_reforged_entry_without_the_key_is_detected(ledger_dir: Path) -> None:
    kept = lines(ledger_dir)
    entry = json.loads(kept[1])
    entry["epsilon_lifetime"] = 5.0
    kept[1] = (json.dumps(entry) + "\n").encode()
    (ledger_dir / LEDGER_FILE).write_bytes(b"".join(kept))
    assert not verify_ledger(ledger_dir).ok


def test_a_ledger_resigned_by_another_key_is_detected(ledger_dir: Path, tmp_path: Path) -> None:
    other = Ledger(tmp_path / "other", Ed25519PrivateKey.generate())
    other.append(event(1))
    (ledger_dir / LEDGER_FILE).write_bytes((other.directory / LEDGER_FILE).read_bytes())
    (ledger_dir / HEAD_FILE).write_bytes((other.directory / HEAD_FILE).read_bytes())
    assert not verify_ledger(ledger_dir).signatures_ok


def test_the_agency_refuses_to_append_to_a_broken_ledger(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    ledger = Ledger(tmp_path / "l", key)
    ledger.append(event(1))
    ledger.append(event(2))
    (ledger.directory / LEDGER_FILE).write_bytes(lines(ledger.directory)[1])
    with pytest.raises(LedgerError, match="does not verify"):
        ledger.append(event(3))
    with pytest.raises(LedgerError, match="another key"):
        Ledger(tmp_path / "l", Ed25519PrivateKey.generate())


def test_audit_recomputes_epsilon_and_flags_disagreement(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l", Ed25519PrivateKey.generate())
    ledger.append(event(1, eps=0.01, life=0.01))  # signed, but the recorded epsilon is a fiction
    row = audit_ledger(ledger.directory)
    assert row.chain_ok and row.signatures_ok
    assert not row.verified and "disagrees with the recomputed" in row.problems[0]
