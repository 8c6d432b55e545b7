"""The privacy ledger: an append-only, hash-chained, Ed25519-signed list of events per agency.

Layout of a ledger folder (it lives in the agency's domain):

- ``ledger.jsonl``: one JSON entry per line. Each entry holds an event, ``seq`` (0, 1, ...), ``prev``
  (the previous entry's hash, 64 zeros for the first), ``hash`` (SHA-256 of the canonical JSON of
  everything else) and ``sig`` (the agency's Ed25519 signature of the hash). Entry 0 is the signed
  genesis (``Genesis``): the party the ledger belongs to and the fingerprint of its key. Its hash, the
  ledger's *origin*, is what the coordinator records of each agency's ledger. Ledgers written before
  the genesis existed ("legacy") start with an event; they still verify, and their origin is the
  hash of their first entry.
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
from typing import Any, Generic, Literal, get_args

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import TypeVar

from agencyfl.federation.errors import LedgerError
from agencyfl.privacy.events import Mechanism, step_records
from agencyfl.privacy.keys import key_id, load_public_key, public_pem
from agencyfl.privacy.steps import ACCOUNTANT, Accountant, StepRecord

GENESIS = "0" * 64
LEDGER_FILE = "ledger.jsonl"
HEAD_FILE = "head.json"
PUBLIC_KEY_FILE = "ledger.pub"
TORN_LINE = "the last line is incomplete (truncated file)"
"""The finding for a last line without its newline: cut off by hand, or torn by a stop while being written."""


class Genesis(BaseModel):
    """Entry 0 of a ledger: whose it is. Deterministic (no time, no nonce), so that rewriting a ledger
    with the same key and party keeps its origin, and a new key or a new party gives a new one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["genesis"] = "genesis"
    party: str
    key_id: str
    format: int = 2


class LedgerEvent(BaseModel):
    """What happened for one agency: a DP-SGD round, a refusal that spent nothing, or a noisy release.

    ``release`` is a Gaussian-noised release of counts (validation histograms, ``release="evaluation"``,
    or fairness counts, ``release="fairness"``): ``steps`` releases at ``noise_multiplier`` with
    ``sample_rate`` 1, accounted by the same RDP accountant as training.
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
    federation: str | None = None  # the spec's federation name (None in entries written before it was recorded)
    # what a release released (None: older fairness); vertical-gradient: one iteration of a vertical job;
    # vertical-hessian: block Newton's Hessian release, before the first iteration
    release: Literal["evaluation", "fairness", "vertical-gradient", "vertical-hessian"] | None = None
    # Format 3 (``privacy.events``): the mechanism released, with sensitivity and noise both recorded, and the
    # neighbouring relation the entry is analysed under. Entries written before (format 2 and older) have None:
    # their mechanism is read off the flat fields above (Poisson-sampled Gaussian, or q = 1 for a release).
    mechanism: Mechanism | None = None
    mechanism_format: int | None = None
    neighbouring: str | None = None  # a str, not a Literal: another relation must parse, to be reported
    # how the entry's epsilons were computed (``privacy.accounting``); an entry stored without it was enforced
    # by RDP alone ("rdp": ``_stored_defaults`` fills it in), and is recomputed that way when audited
    accountant: Accountant = ACCOUNTANT

    @property
    def party(self) -> str:
        """Whose ledger this event belongs in."""
        return self.agency

    def flat_record(self) -> StepRecord:
        """The mechanism as the flat fields state it (every format has them; no steps for a refusal)."""
        steps = 0 if self.kind == "refusal" else self.steps
        return StepRecord(self.noise_multiplier, self.sample_rate, steps)

    def step_records(self) -> list[StepRecord]:
        """The enforcing accountant's view of this entry: its mechanism event when recorded (format 3),
        else the flat fields. A refusal spent nothing."""
        if self.kind == "refusal":
            return []
        if self.mechanism is not None:
            return step_records(self.mechanism)
        return [self.flat_record()]


FindingKind = Literal[
    "altered",
    "deleted",
    "reordered",
    "truncated",
    "headless",
    "party",
    "restarted",
    "rollback",
    "missing",
    "epsilon",
    "overspend",
]
"""What an audit can find, most serious first (``audit verify`` exits with the first kind's code):
altered (bytes changed, bad signature, unreadable, wrong key), deleted (an entry taken out of the middle),
reordered, truncated (entries cut off the end), headless (no ledger, an empty one, or no signed head:
nothing anchors it, so "zero spend" would be unverifiable), party (a ledger not bound to its party: a
missing agency, a duplicate, a ledger signed with another party's key or naming another party),
restarted (a ledger whose origin differs from the one the coordinator recorded for that agency, or whose
lifetime epsilon went down), rollback (the coordinator's chain lacks a job the agencies record for its
federation, or a registered model), missing (a round one chain records and the other does not),
epsilon (a recorded epsilon that disagrees with the recomputation or with the coordinator's record),
overspend (a cap crossed)."""

FINDING_ORDER: tuple[FindingKind, ...] = get_args(FindingKind)


@dataclass(frozen=True)
class Finding:
    """One problem an audit found, with the kind that decides its exit code."""

    kind: FindingKind
    message: str


EventT = TypeVar("EventT", bound=BaseModel, default=LedgerEvent)


def now_utc() -> str:
    """The current time, ISO 8601 in UTC, as ledgers record it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def canonical_json(obj: dict[str, Any]) -> bytes:
    """What is hashed and signed: sorted keys, no spaces, UTF-8 (ledger entries and heads, vertical receipts)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _entry_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body)).hexdigest()


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
    genesis: Genesis | None = None
    origin: str = ""  # hash of entry 0 (the genesis; a legacy ledger's first event)
    last_seq: int = -1
    last_hash: str = GENESIS
    torn: bool = False  # the last line, without its newline, did not parse: skipped

    @property
    def legacy(self) -> bool:
        """A ledger with entries but no genesis (written before genesis entries existed)."""
        return self.genesis is None and self.last_seq >= 0

    @property
    def party(self) -> str | None:
        """The party the ledger's signed content names (genesis, else its first event), if any."""
        if self.genesis is not None:
            return self.genesis.party
        first = self.events[0] if self.events else None
        return str(getattr(first, "party", "")) or None if first is not None else None

    @property
    def problems(self) -> list[str]:
        """Every finding's message."""
        return [f.message for f in self.findings]

    @property
    def ok_but_torn(self) -> bool:
        """Whole up to a last line without its newline, which its head does not record: a write a stop tore
        (the head moves only after the line is complete), so nothing that line would have said happened."""
        return self.torn and self.chain_ok and self.signatures_ok and all(f.message == TORN_LINE for f in self.findings)

    @property
    def ok(self) -> bool:
        """True when nothing was found wrong."""
        return self.chain_ok and self.signatures_ok and self.head_ok and not self.findings

    def fail(self, kind: FindingKind, message: str) -> None:
        """Record a finding (and which part of the check it broke)."""
        self.findings.append(Finding(kind, message))
        if kind in {"truncated", "headless"}:
            self.head_ok = False
        elif kind in {"deleted", "reordered"}:
            self.chain_ok = False


def verify_ledger(
    directory: str | Path,
    public_key: Ed25519PublicKey | None = None,
    event_type: type[EventT] = LedgerEvent,  # type: ignore[assignment]
) -> LedgerVerification[EventT]:
    """Check a ledger folder: every line parses, hashes chain, signatures, genesis and head verify.

    One pass over the file (linear in its length).

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
        ("deleted"), moved ("reordered") or cut off the end ("truncated"), and a ledger that is absent,
        empty or has no signed head ("headless").
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
        if (directory / HEAD_FILE).exists():
            result.fail("truncated", f"no {LEDGER_FILE} in {str(directory)!r}, but its {HEAD_FILE} records entries")
        else:
            result.fail("headless", f"no {LEDGER_FILE} in {str(directory)!r}: no signed genesis, nothing to verify")
        return result
    prev, last_seq = GENESIS, -1
    seqs: list[int] = []
    out_of_order: list[str] = []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        result.fail("truncated", TORN_LINE)
    lines = raw.splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise TypeError(f"a JSON {type(entry).__name__}, not an object")
            body = {k: v for k, v in entry.items() if k not in {"hash", "sig"}}
            seq, claimed, sig = int(entry["seq"]), str(entry["hash"]), bytes.fromhex(entry["sig"])
            content = {k: v for k, v in body.items() if k not in {"seq", "prev"}}
            genesis = Genesis.model_validate(content) if content.get("kind") == "genesis" else None
            event = None if genesis is not None else event_type.model_validate(_stored_defaults(event_type, content))
            hashed = _entry_hash(body)
        # ArithmeticError: an integer past float range; RecursionError: JSON nested past Python's stack
        except (ValueError, KeyError, TypeError, ValidationError, ArithmeticError, RecursionError) as exc:
            if number == len(lines) and not raw.endswith(b"\n"):
                result.torn = True
                continue  # the cut-off last line, reported above
            result.chain_ok = False
            result.fail("altered", f"line {number}: unreadable entry ({exc.__class__.__name__})")
            prev = ""
            continue
        if hashed != claimed:
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
        if seq == 0:
            result.origin = claimed
        if genesis is not None:
            if seq != 0:
                result.chain_ok = False
                result.fail("altered", f"line {number}: a genesis entry at seq {seq} (only entry 0 may be one)")
            elif genesis.key_id != result.key_id:
                result.fail("party", f"the genesis names key {genesis.key_id}, the ledger is signed by {result.key_id}")
            else:
                result.genesis = genesis
        elif event is not None:
            result.events.append(event)
        prev, last_seq = claimed, seq
        seqs.append(seq)
    result.last_seq, result.last_hash = last_seq, prev
    if out_of_order:
        _classify_sequence(seqs, out_of_order, result)
    if last_seq < 0:
        result.fail("headless", f"{LEDGER_FILE} in {str(directory)!r} is empty: no signed genesis, nothing to verify")
        return result
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
        result.fail("headless", f"{HEAD_FILE} is missing: nothing signed says where the ledger ends")
        return
    try:
        head = json.loads(head_path.read_bytes())
        seq, digest = int(head["seq"]), str(head["hash"])
        public_key.verify(bytes.fromhex(head["sig"]), _head_message(seq, digest))
    except (ValueError, KeyError, TypeError, InvalidSignature, ArithmeticError, RecursionError):
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
    ledger it cannot verify, since its spend would then be unknown. The first append (or
    ``ensure_genesis``) writes the signed genesis. Verification is remembered per process while the
    file is unchanged, so appends in one process verify only what they add (the whole file is read
    once per process: linear, not quadratic, in the number of entries).

    Parameters
    ----------
    directory
        The ledger folder (created if needed).
    signing_key
        The owner's Ed25519 key; the folder's ``ledger.pub`` must be its public half.
    event_type
        The entries' event model (default ``LedgerEvent``, an agency's spend).
    party
        Whose ledger it is, written into the genesis (default: the first event's ``party``).
    """

    def __init__(
        self,
        directory: str | Path,
        signing_key: Ed25519PrivateKey,
        event_type: type[EventT] = LedgerEvent,  # type: ignore[assignment]
        party: str | None = None,
    ) -> None:
        self.event_type = event_type
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = signing_key
        self.party = party
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

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.path.stat()
            head = (self.directory / HEAD_FILE).stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, head.st_mtime_ns)

    def verification(self) -> LedgerVerification[EventT]:
        """The verified state of the ledger (empty for a fresh folder).

        Raises
        ------
        LedgerError
            If the ledger does not verify, or its file is gone while its head says it had entries.
        """
        cache_key = (str(self.directory.resolve()), key_id(self._key.public_key()), self.event_type.__name__)
        stat = self._stat()
        cached = _VERIFIED.get(cache_key)
        if cached is not None and stat is not None and cached[0] == stat:
            return cached[1]
        if not self.path.exists():
            if (self.directory / HEAD_FILE).exists():
                raise LedgerError(
                    f"ledger {str(self.directory)!r} does not verify: {LEDGER_FILE} is missing but {HEAD_FILE} "
                    "records signed entries (restore the ledger; a new one would reset the budget)"
                )
            return LedgerVerification(directory=self.directory, key_id=key_id(self._key.public_key()))
        check = verify_ledger(self.directory, self._key.public_key(), self.event_type)
        if not check.ok:
            raise LedgerError(f"ledger {str(self.directory)!r} does not verify: {check.problems[0]}")
        if stat is not None:
            _VERIFIED[cache_key] = (stat, check)
        return check

    def events(self) -> list[EventT]:
        """All events, after verifying the whole ledger.

        Raises
        ------
        LedgerError
            If the ledger does not verify.
        """
        return list(self.verification().events)

    def origin(self) -> str:
        """The hash of entry 0 (the genesis), or "" for a ledger with no entries yet."""
        return self.verification().origin

    def ensure_genesis(self, party: str | None = None) -> str:
        """Write the signed genesis if the ledger has no entries yet; returns the ledger's origin."""
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._genesis(self.verification(), party).origin

    def _genesis(self, check: LedgerVerification[EventT], party: str | None) -> LedgerVerification[EventT]:
        """``check``, after writing the genesis if the ledger has none; the caller holds the lock."""
        if check.last_seq >= 0:
            return check
        owner = party or self.party
        if not owner:
            raise LedgerError(f"ledger {str(self.directory)!r}: a genesis needs the party it belongs to")
        self._write(check, Genesis(party=owner, key_id=key_id(self._key.public_key())).model_dump(), None)
        return self.verification()

    def recover_after_stop(self) -> str | None:
        """Finish what a stop interrupted in the owner's last write, for chains whose writer must go on after
        a stop (vertical receipts); returns what it did, or None. Only the owner's own unfinished write is
        touched: a last line without its newline that the head does not record is cut off (the head moves only
        once a line is whole); a whole last line the owner signed, chained to the entry the head names, gets
        its head; a file with no whole line and no head (a genesis torn) is removed. Anything else is left as
        it is, for verification to report."""
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None
            head = self._read_head()
            whole = raw[: raw.rfind(b"\n") + 1]
            if not whole and head is None:
                self.path.unlink()
                return "removed a ledger file with no whole entry and no head"
            lines = whole.splitlines()
            last = self._own_entry(lines[-1]) if lines else None
            if head is None and len(lines) == 1 and not (self.directory / HEAD_FILE).exists():
                head = {"seq": -1, "hash": GENESIS}  # stopped between the genesis and its first head
            if last is None or head is None:
                return None
            if len(whole) < len(raw) and (head["seq"], head["hash"]) == (last["seq"], last["hash"]):
                os.truncate(self.path, len(whole))
                return "cut off a line torn while it was written"
            if len(whole) == len(raw) and last["seq"] == head["seq"] + 1 and last["prev"] == head["hash"]:
                self._write_head(int(last["seq"]), str(last["hash"]))
                return "moved the head to the last whole entry"
            return None

    def _read_head(self) -> dict[str, Any] | None:
        try:
            head = json.loads((self.directory / HEAD_FILE).read_bytes())
            return {"seq": int(head["seq"]), "hash": str(head["hash"])}
        except (OSError, ValueError, KeyError, TypeError, ArithmeticError, RecursionError):
            return None

    def _own_entry(self, line: bytes) -> dict[str, Any] | None:
        """``line`` as an entry if it is one the owner's key signed, its hash matching its content."""
        try:
            entry = json.loads(line)
            body = {k: v for k, v in entry.items() if k not in {"hash", "sig"}}
            if _entry_hash(body) != entry["hash"]:
                return None
            self._key.public_key().verify(bytes.fromhex(entry["sig"]), bytes.fromhex(entry["hash"]))
            return {"seq": int(entry["seq"]), "hash": str(entry["hash"]), "prev": str(entry.get("prev"))}
        except (ValueError, KeyError, TypeError, AttributeError, InvalidSignature, ArithmeticError, RecursionError):
            return None

    def append(self, event: EventT) -> str:
        """Append ``event`` (chained, signed, fsynced) and move the head; returns the entry hash.

        A ledger with no entries gets its genesis first (party: the ledger's, else ``event.party``). Both
        under one lock, so a second writer never sees a line without its head.
        """
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            check = self._genesis(self.verification(), self.party or str(getattr(event, "party", "")) or None)
            return self._write(check, event.model_dump(), event)

    def _write(self, check: LedgerVerification[EventT], content: dict[str, Any], event: EventT | None) -> str:
        """Append one entry after ``check`` (the current verified state); the caller holds the lock."""
        seq = check.last_seq + 1
        body = {"seq": seq, "prev": check.last_hash if seq else GENESIS, **content}
        digest = _entry_hash(body)
        entry = {**body, "hash": digest, "sig": self._key.sign(bytes.fromhex(digest)).hex()}
        with self.path.open("ab") as handle:
            handle.write(canonical_json(entry) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._write_head(seq, digest)
        updated: LedgerVerification[EventT] = LedgerVerification(
            directory=check.directory,
            events=[*check.events, *([event] if event is not None else [])],
            key_id=check.key_id,
            genesis=check.genesis if event is not None else Genesis.model_validate(content),
            origin=check.origin or digest,
            last_seq=seq,
            last_hash=digest,
        )
        stat = self._stat()
        if stat is not None:
            cache_key = (str(self.directory.resolve()), check.key_id, self.event_type.__name__)
            _VERIFIED[cache_key] = (stat, updated)
        return digest

    def _write_head(self, seq: int, digest: str) -> None:
        """The signed head, replaced whole (written and fsynced aside, then renamed, the folder fsynced)."""
        head = {"seq": seq, "hash": digest, "sig": self._key.sign(_head_message(seq, digest)).hex()}
        tmp = self.directory / (HEAD_FILE + ".tmp")
        with tmp.open("wb") as handle:
            handle.write(canonical_json(head))
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.directory / HEAD_FILE)
        folder = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _stored_defaults(event_type: type[BaseModel], content: dict[str, Any]) -> dict[str, Any]:
    """An entry as stored, with the values its format implied for fields added since: an entry without
    ``accountant`` was written when RDP alone enforced (the hash and signature cover the stored line)."""
    if "accountant" in event_type.model_fields and "accountant" not in content:
        return {**content, "accountant": "rdp"}
    return content


_VERIFIED: dict[tuple[str, str, str], tuple[tuple[int, int, int, int], LedgerVerification[Any]]] = {}
"""Per process: the last verified state of each open ledger, by (folder, key, event type), with the
file's identity, size and times when it was verified (any change means a full re-verification)."""


def spend_records(events: list[LedgerEvent], job: str | None = None) -> list[StepRecord]:
    """The accountant's records of ``events`` (only those of ``job`` when given)."""
    return [r for e in events if e.kind != "refusal" and (job is None or e.job == job) for r in e.step_records()]
