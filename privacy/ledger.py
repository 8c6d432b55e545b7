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

The chain mechanics are generic over the event model: agencies chain ``LedgerEvent`` (their spend),
the coordinator chains ``RoundSummary`` (``privacy.coordinator_ledger``: what it saw each round).
Verification classifies what it finds (``Finding.kind``) so auditors get one exit code per kind of
tampering.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import TypeVar

from federation.errors import LedgerError
from privacy.accounting import StepRecord
from privacy.keys import key_id, load_public_key, public_pem

GENESIS = "0" * 64
LEDGER_FILE = "ledger.jsonl"
HEAD_FILE = "head.json"
PUBLIC_KEY_FILE = "ledger.pub"


class LedgerEvent(BaseModel):
    """What happened for one agency: a DP-SGD round, a refusal that spent nothing, or a noisy release.

    ``release`` is a Gaussian-noised release of counts (the fairness evaluation): ``steps`` releases at
    ``noise_multiplier`` with ``sample_rate`` 1, accounted by the same RDP accountant as training.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["round", "refusal", "release"]
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
        steps = 0 if self.kind == "refusal" else self.steps
        return StepRecord(self.noise_multiplier, self.sample_rate, steps)


FindingKind = Literal["altered", "deleted", "reordered", "truncated", "missing", "epsilon", "overspend"]
"""What an audit can find, most serious first (``audit verify`` exits with the first kind's code):
altered (bytes changed, bad signature, unreadable, wrong key), deleted (an entry taken out of the middle),
reordered, truncated (entries cut off the end), missing (a round one chain records and the other does not),
epsilon (a recorded epsilon that disagrees with the recomputation or with the coordinator's record),
overspend (a cap crossed)."""

FINDING_ORDER: tuple[FindingKind, ...] = (
    "altered",
    "deleted",
    "reordered",
    "truncated",
    "missing",
    "epsilon",
    "overspend",
)


@dataclass(frozen=True)
class Finding:
    """One problem an audit found, with the kind that decides its exit code."""

    kind: FindingKind
    message: str


EventT = TypeVar("EventT", bound=BaseModel, default=LedgerEvent)


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
class LedgerVerification(Generic[EventT]):
    """What ``verify_ledger`` found. ``ok`` only when the chain, every signature and the head verify."""

    directory: Path
    events: list[EventT] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    chain_ok: bool = True
    signatures_ok: bool = True
    head_ok: bool = True
    key_id: str = ""

    @property
    def problems(self) -> list[str]:
        """Every finding's message."""
        return [f.message for f in self.findings]

    @property
    def ok(self) -> bool:
        """True when nothing was found wrong."""
        return self.chain_ok and self.signatures_ok and self.head_ok and not self.findings

    def fail(self, kind: FindingKind, message: str) -> None:
        """Record a finding (and which part of the check it broke)."""
        self.findings.append(Finding(kind, message))
        if kind == "truncated":
            self.head_ok = False
        elif kind in {"deleted", "reordered"}:
            self.chain_ok = False


def verify_ledger(
    directory: str | Path,
    public_key: Ed25519PublicKey | None = None,
    event_type: type[EventT] = LedgerEvent,  # type: ignore[assignment]
) -> LedgerVerification[EventT]:
    """Check a ledger folder: every line parses, hashes chain, signatures and head verify.

    Parameters
    ----------
    directory
        The ledger folder.
    public_key
        The signer's key as the auditor holds it; by default the folder's ``ledger.pub``.
    event_type
        The entries' event model: ``LedgerEvent`` (an agency's) or ``RoundSummary`` (the coordinator's).

    Returns
    -------
    LedgerVerification
        With every finding, classified: byte flips and bad signatures ("altered"), entries taken out
        ("deleted"), moved ("reordered") or cut off the end ("truncated").
    """
    directory = Path(directory)
    result: LedgerVerification[EventT] = LedgerVerification(directory=directory)
    if public_key is None:
        try:
            public_key = load_public_key(directory / PUBLIC_KEY_FILE)
        except LedgerError as exc:
            result.signatures_ok = False
            result.fail("altered", str(exc))
            return result
    result.key_id = key_id(public_key)
    path = directory / LEDGER_FILE
    if not path.exists():
        result.fail("truncated", f"no {LEDGER_FILE} in {str(directory)!r}")
        return result
    prev, last_seq = GENESIS, -1
    seqs: list[int] = []
    out_of_order: list[str] = []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        result.fail("truncated", "the last line is incomplete (truncated file)")
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            entry = json.loads(line)
            body = {k: v for k, v in entry.items() if k not in {"hash", "sig"}}
            seq, claimed, sig = int(entry["seq"]), str(entry["hash"]), bytes.fromhex(entry["sig"])
            event = event_type.model_validate({k: v for k, v in body.items() if k not in {"seq", "prev"}})
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            if number == len(raw.splitlines()) and not raw.endswith(b"\n"):
                continue  # the cut-off last line, reported above
            result.chain_ok = False
            result.fail("altered", f"line {number}: unreadable entry ({exc.__class__.__name__})")
            prev = ""
            continue
        if _entry_hash(body) != claimed:
            result.chain_ok = False
            result.fail("altered", f"line {number}: content does not match its hash (altered)")
        if seq != last_seq + 1:
            out_of_order.append(f"line {number}: seq {seq} follows {last_seq}")
        elif body.get("prev") != prev and prev:
            result.chain_ok = False
            result.fail("altered", f"line {number}: does not chain to the previous entry")
        try:
            public_key.verify(sig, bytes.fromhex(claimed))
        except (InvalidSignature, ValueError):
            result.signatures_ok = False
            result.fail("altered", f"line {number}: signature does not verify")
        prev, last_seq = claimed, seq
        seqs.append(seq)
        result.events.append(event)
    if out_of_order:
        _classify_sequence(seqs, out_of_order, result)
    _verify_head(directory, public_key, last_seq, prev, result)
    return result


def _classify_sequence(seqs: list[int], where: list[str], result: LedgerVerification[Any]) -> None:
    """Tell entries taken out (gaps in increasing numbers) from entries moved (numbers out of order)."""
    if seqs != sorted(seqs):
        result.fail("reordered", f"entries are out of order ({where[0]})")
    present = set(seqs)
    gaps = [n for n in range(max(seqs) + 1) if n not in present]
    if gaps:
        result.fail("deleted", f"{len(gaps)} entr{'y' if len(gaps) == 1 else 'ies'} deleted (seq {gaps[:5]})")


def _verify_head(
    directory: Path, public_key: Ed25519PublicKey, last_seq: int, last_hash: str, result: LedgerVerification[Any]
) -> None:
    head_path = directory / HEAD_FILE
    if not head_path.exists():
        if last_seq >= 0:
            result.fail("truncated", f"{HEAD_FILE} is missing")
        return
    try:
        head = json.loads(head_path.read_bytes())
        seq, digest = int(head["seq"]), str(head["hash"])
        public_key.verify(bytes.fromhex(head["sig"]), _head_message(seq, digest))
    except (ValueError, KeyError, TypeError, InvalidSignature):
        result.head_ok = False
        result.fail("altered", f"{HEAD_FILE} is unreadable or its signature does not verify")
        return
    if seq > last_seq:
        result.fail(
            "truncated",
            f"{HEAD_FILE} says the last entry is seq {seq}, the file ends at seq {last_seq} "
            "(entries removed from the end, or an older copy of the file)",
        )
    elif seq != last_seq or digest != last_hash:
        result.head_ok = False
        result.fail("altered", f"{HEAD_FILE} says the last entry is seq {seq} ({digest[:12]}), the file disagrees")


class Ledger(Generic[EventT]):
    """A signed chain, opened for appending with its owner's signing key.

    Reading through ``events()`` verifies first and fails closed: an agency never trains on a
    ledger it cannot verify, since its spend would then be unknown.

    Parameters
    ----------
    directory
        The ledger folder (created if needed).
    signing_key
        The owner's Ed25519 key; the folder's ``ledger.pub`` must be its public half.
    event_type
        The entries' event model (default ``LedgerEvent``, an agency's spend).
    """

    def __init__(
        self,
        directory: str | Path,
        signing_key: Ed25519PrivateKey,
        event_type: type[EventT] = LedgerEvent,  # type: ignore[assignment]
    ) -> None:
        self.event_type = event_type
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

    def events(self) -> list[EventT]:
        """All events, after verifying the whole ledger.

        Raises
        ------
        LedgerError
            If the ledger does not verify.
        """
        if not self.path.exists():
            return []
        check = verify_ledger(self.directory, self._key.public_key(), self.event_type)
        if not check.ok:
            raise LedgerError(f"ledger {str(self.directory)!r} does not verify: {check.problems[0]}")
        return check.events

    def append(self, event: EventT) -> str:
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
    return [e.step_record() for e in events if e.kind != "refusal" and (job is None or e.job == job)]
