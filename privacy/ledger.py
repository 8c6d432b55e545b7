"""The privacy ledger: an append-only, hash-chained, Ed25519-signed list of events per agency.

Layout of a ledger folder (it lives in the agency's domain):

- ``ledger.jsonl``: one JSON entry per line. Each entry holds an event, ``seq`` (0, 1, ...), ``prev``
  (the previous entry's hash, 64 zeros for the first), ``hash`` (SHA-256 of the canonical JSON of
  everything else) and ``sig`` (the agency's Ed25519 signature of the hash).
- ``head.json``: the signed sequence number and hash of the last entry, so that cutting entries off
  the end is detected too.
- ``ledger.pub``: the agency's public key (PEM), for auditors.

Spend is computed from the events (``privacy.accounting``), never stored as a running total that
could drift: the ledger is replayable, in the manner of ``dp_accounting``'s DpEvent lists.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from federation.errors import LedgerError
from privacy.accounting import StepRecord
from privacy.keys import key_id, load_public_key, public_pem

GENESIS = "0" * 64
LEDGER_FILE = "ledger.jsonl"
HEAD_FILE = "head.json"
PUBLIC_KEY_FILE = "ledger.pub"


class LedgerEvent(BaseModel):
    """What happened in one round for one agency: a DP-SGD spend, or a refusal that spent nothing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["round", "refusal"]
    agency: str
    job: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    epsilon_job: float
    epsilon_lifetime: float
    epsilon_job_cap: float
    budget: float
    dataset: str
    time: str
    reason: str | None = None

    def step_record(self) -> StepRecord:
        """The accountant's view of this event (no steps for a refusal)."""
        steps = self.steps if self.kind == "round" else 0
        return StepRecord(self.noise_multiplier, self.sample_rate, steps)


def now_utc() -> str:
    """The current time, ISO 8601 in UTC, as ledgers record it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _entry_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(body)).hexdigest()


def _head_message(seq: int, digest: str) -> bytes:
    return f"agencyfl-ledger-head:{seq}:{digest}".encode()


@dataclass
class LedgerVerification:
    """What ``verify_ledger`` found. ``ok`` only when the chain, every signature and the head verify."""

    directory: Path
    events: list[LedgerEvent] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    chain_ok: bool = True
    signatures_ok: bool = True
    head_ok: bool = True
    key_id: str = ""

    @property
    def ok(self) -> bool:
        """True when nothing was found wrong."""
        return self.chain_ok and self.signatures_ok and self.head_ok and not self.problems


def verify_ledger(directory: str | Path, public_key: Ed25519PublicKey | None = None) -> LedgerVerification:
    """Check a ledger folder: every line parses, hashes chain, signatures and head verify.

    Parameters
    ----------
    directory
        The ledger folder.
    public_key
        The agency's key as the auditor holds it; by default the folder's ``ledger.pub``.

    Returns
    -------
    LedgerVerification
        With every problem found (byte flips, deletions, reorders, truncation, bad signatures).
    """
    directory = Path(directory)
    result = LedgerVerification(directory=directory)
    if public_key is None:
        try:
            public_key = load_public_key(directory / PUBLIC_KEY_FILE)
        except LedgerError as exc:
            result.signatures_ok = False
            result.problems.append(str(exc))
            return result
    result.key_id = key_id(public_key)
    path = directory / LEDGER_FILE
    if not path.exists():
        result.chain_ok = False
        result.problems.append(f"no {LEDGER_FILE} in {str(directory)!r}")
        return result
    prev, last_seq = GENESIS, -1
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        result.chain_ok = False
        result.problems.append("the last line is incomplete (truncated file)")
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            entry = json.loads(line)
            body = {k: v for k, v in entry.items() if k not in {"hash", "sig"}}
            seq, claimed, sig = int(entry["seq"]), str(entry["hash"]), bytes.fromhex(entry["sig"])
            event = LedgerEvent.model_validate({k: v for k, v in body.items() if k not in {"seq", "prev"}})
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            result.chain_ok = False
            result.problems.append(f"line {number}: unreadable entry ({exc.__class__.__name__})")
            prev = ""
            continue
        if _entry_hash(body) != claimed:
            result.chain_ok = False
            result.problems.append(f"line {number}: content does not match its hash (altered)")
        if seq != last_seq + 1:
            result.chain_ok = False
            result.problems.append(f"line {number}: seq {seq} follows {last_seq} (deleted or reordered)")
        if body.get("prev") != prev:
            result.chain_ok = False
            result.problems.append(f"line {number}: does not chain to the previous entry")
        try:
            public_key.verify(sig, bytes.fromhex(claimed))
        except (InvalidSignature, ValueError):
            result.signatures_ok = False
            result.problems.append(f"line {number}: signature does not verify")
        prev, last_seq = claimed, seq
        result.events.append(event)
    _verify_head(directory, public_key, last_seq, prev, result)
    return result


def _verify_head(
    directory: Path, public_key: Ed25519PublicKey, last_seq: int, last_hash: str, result: LedgerVerification
) -> None:
    head_path = directory / HEAD_FILE
    if not head_path.exists():
        if last_seq >= 0:
            result.head_ok = False
            result.problems.append(f"{HEAD_FILE} is missing")
        return
    try:
        head = json.loads(head_path.read_bytes())
        seq, digest = int(head["seq"]), str(head["hash"])
        public_key.verify(bytes.fromhex(head["sig"]), _head_message(seq, digest))
    except (ValueError, KeyError, TypeError, InvalidSignature):
        result.head_ok = False
        result.problems.append(f"{HEAD_FILE} is unreadable or its signature does not verify")
        return
    if seq != last_seq or digest != last_hash:
        result.head_ok = False
        result.problems.append(
            f"{HEAD_FILE} says the last entry is seq {seq}, the file ends at seq {last_seq} "
            "(entries removed from the end, or the file replaced)"
        )


class Ledger:
    """An agency's ledger, opened for appending with its signing key.

    Reading through ``events()`` verifies first and fails closed: an agency never trains on a
    ledger it cannot verify, since its spend would then be unknown.
    """

    def __init__(self, directory: str | Path, signing_key: Ed25519PrivateKey) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = signing_key
        pub = self.directory / PUBLIC_KEY_FILE
        pem = public_pem(signing_key.public_key())
        if not pub.exists():
            pub.write_bytes(pem)
        elif pub.read_bytes() != pem:
            raise LedgerError(f"ledger {str(self.directory)!r} belongs to another key ({PUBLIC_KEY_FILE} differs)")

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self.directory / LEDGER_FILE

    def events(self) -> list[LedgerEvent]:
        """All events, after verifying the whole ledger.

        Raises
        ------
        LedgerError
            If the ledger does not verify.
        """
        if not self.path.exists():
            return []
        check = verify_ledger(self.directory, self._key.public_key())
        if not check.ok:
            raise LedgerError(f"ledger {str(self.directory)!r} does not verify: {check.problems[0]}")
        return check.events

    def append(self, event: LedgerEvent) -> str:
        """Append ``event`` (chained, signed, fsynced) and move the head; returns the entry hash."""
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            events = self.events()
            prev = GENESIS
            if events:
                prev = json.loads(self.path.read_bytes().splitlines()[-1])["hash"]
            body = {"seq": len(events), "prev": prev, **event.model_dump()}
            digest = _entry_hash(body)
            entry = {**body, "hash": digest, "sig": self._key.sign(bytes.fromhex(digest)).hex()}
            with self.path.open("ab") as handle:
                handle.write(_canonical(entry) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            head = {
                "seq": body["seq"],
                "hash": digest,
                "sig": self._key.sign(_head_message(body["seq"], digest)).hex(),
            }
            tmp = self.directory / (HEAD_FILE + ".tmp")
            tmp.write_bytes(_canonical(head))
            tmp.replace(self.directory / HEAD_FILE)
        return digest


def spend_records(events: list[LedgerEvent], job: str | None = None) -> list[StepRecord]:
    """The accountant's records of ``events`` (only those of ``job`` when given)."""
    return [e.step_record() for e in events if e.kind == "round" and (job is None or e.job == job)]
