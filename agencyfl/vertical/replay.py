"""Replay an agency's products from its evidence and compare with what civil affairs and the arbiter recorded
(``docs/vertical.md``, "Accountability"). Runs where the agency's rows are: they never leave."""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agencyfl.alignment.errors import MessageRejectedError
from agencyfl.alignment.sealed import (
    MessageKind,
    PartyKeys,
    PartyPublicKeys,
    open_envelope,
    unpack,
    verify_certificate,
)
from agencyfl.federation.errors import DataFileError, LedgerError
from agencyfl.privacy.he import load_public_context
from agencyfl.privacy.keys import key_id, keyring_key
from agencyfl.privacy.ledger import LEDGER_FILE, verify_ledger
from agencyfl.vertical.encoding import CLIP
from agencyfl.vertical.evidence import OPERAND_OF, RECEIPTS, Receipt, context_digest, digest
from agencyfl.vertical.protocol import (
    chunk_count,
    column_multipliers,
    gradient_sums,
    masked_totals,
    pair_products,
    step_run,
)

NORM_SLACK = 1e-9
"""Relative slack on the row norm bound: ``clip_rows`` scales to it in floating point."""


@dataclass
class ProductCheck:
    """One product the arbiter released: matched, or the first thing that did not."""

    kind: str
    seq: int
    matched: bool
    finding: str = ""
    key: str = ""  # the arbiter key it was released under (the first 16 hex digits of its digest)


@dataclass(frozen=True)
class Vouchers:
    """What tells whose record is false when an agency's operands and civil affairs' receipts disagree: the
    label holder and the job's run the arbiter's receipts name, every operand civil affairs recorded sealing
    to the agency under any key of the job, and the auditor's keyring."""

    holder: str
    agency: str
    runs: frozenset[str]
    anywhere: frozenset[str]
    keyring: Path | None


@dataclass
class ReceiptsRead:
    """One receipts ledger as the replay read it: whose, signed with which key, how many receipts."""

    folder: str
    party: str
    key_id: str
    receipts: int
    torn_line: bool  # a last line a stop tore, which its signed head never recorded (skipped)


@dataclass
class ReplayReport:
    """What the replay found for one agency: every arbiter key of the job it was given evidence for."""

    agency: str
    context: str  # the first key's digest (``keys``: every key replayed)
    rows: int
    width: int
    max_row_norm: float
    clip: float
    rows_over_clip: int
    inputs_findings: list[str] = field(default_factory=list)  # what is wrong with the kept inputs themselves
    receipts_signed: bool = False  # every receipt verified against the auditor's keyring
    receipts: list[ReceiptsRead] = field(default_factory=list)
    products: list[ProductCheck] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # each arbiter key replayed (16 hex digits)
    unreplayed: dict[str, int] = field(default_factory=dict)  # key -> products released under it, not replayed

    @property
    def findings(self) -> list[str]:
        over = (
            [f"{self.rows_over_clip} row(s) of the kept inputs exceed the declared norm {self.clip} "
             f"(largest {self.max_row_norm:.6g}): the noise assumed rows within it"]
            if self.rows_over_clip else []
        )  # fmt: skip
        products = [f"{p.kind} {p.seq}{f' (key {p.key})' if len(self.keys) > 1 else ''}: {p.finding}"
                    for p in self.products if not p.matched]  # fmt: skip
        hidden = [f"the arbiter released {n} product(s) of {self.agency} under key {k} that no evidence given "
                  "covers: replay AGENCY/evidence/JOB (every key of the job)"
                  for k, n in self.unreplayed.items()]  # fmt: skip
        return [*self.inputs_findings, *over, *products, *hidden]

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "agency": self.agency, "context": self.context, "rows": self.rows, "width": self.width,
            "clip": self.clip, "max_row_norm": self.max_row_norm, "rows_over_clip": self.rows_over_clip,
            "receipts_signed": self.receipts_signed, "receipts": [vars(r) for r in self.receipts],
            "keys": self.keys, "unreplayed": self.unreplayed,
            "products": [vars(p) for p in self.products], "findings": self.findings, "ok": self.ok,
        }  # fmt: skip


def _genesis(path: Path) -> tuple[str, str]:
    """The party and key id a receipts ledger's first line (its genesis) names: whose key must have signed it."""
    try:
        with path.open("rb") as f:
            first = json.loads(f.readline())
        if first.get("kind") != "genesis":
            raise ValueError("no genesis")
        return str(first["party"]), str(first["key_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataFileError(f"{path}: not a receipts ledger (its first line is no genesis naming its party)") from exc


def _open_receipts(folder: Path, keyring: Path | None) -> tuple[ReceiptsRead, list[Receipt]]:
    """A party's receipts ledger, verified whole (chain, signatures, signed head) against the keyring's key for
    the party its genesis names, else against its own ``ledger.pub``."""
    if folder.name == LEDGER_FILE:
        folder = folder.parent
    if not (folder / LEDGER_FILE).is_file():
        raise DataFileError(f"{folder}: not a receipts ledger (no {LEDGER_FILE}; give PARTY/evidence/JOB/{RECEIPTS})")
    party, named = _genesis(folder / LEDGER_FILE)
    public = None
    if keyring is not None:
        public = keyring_key(keyring, party)
        if public is None:
            raise LedgerError(f"{folder}: the keyring has no key for {party!r} (import it with `audit keys import`)")
        if named != key_id(public):
            raise LedgerError(f"{folder}: signed with key {named}; the keyring holds {key_id(public)} for {party!r}")
    check = verify_ledger(folder, public, Receipt)
    if not (check.ok or check.ok_but_torn):
        raise LedgerError(f"{folder}: the receipts do not verify: {check.problems[0]}")
    strangers = sorted({r.by for r in check.events if r.party != party})
    if strangers:
        raise LedgerError(f"{folder}: receipts recorded by {', '.join(strangers)} in the ledger of {party}")
    return ReceiptsRead(str(folder), party, check.key_id, len(check.events), check.ok_but_torn), check.events


def _read_receipts(
    folders: list[Path], agency: str, keyring: Path | None, holders: set[str], runs: dict[str, set[str]]
) -> tuple[dict[tuple[str, str, str, int], str], list[ReceiptsRead]]:
    """(arbiter key, recorded by, kind, number) -> SHA-256 for this agency, from every receipts ledger given,
    and what was read of each. Two digests for one receipt are refused. ``holders`` collects the label holder
    the arbiter's receipts for this agency name."""
    found: dict[tuple[str, str, str, int], str] = {}
    read: list[ReceiptsRead] = []
    for folder in folders:
        ledger, receipts = _open_receipts(folder, keyring)
        read.append(ledger)
        for r in receipts:
            if r.agency != agency:
                continue
            key = (r.context, r.by, r.kind, r.number)
            if r.by == "arbiter":
                holders.add(str(r.label_holder))
                runs.setdefault(r.context, set()).add(r.run)
            if found.setdefault(key, r.sha256) != r.sha256:
                raise DataFileError(f"{folder}: a second, different digest for {r.by}'s {r.kind} {r.number}")
    return found, read


def _meta(evidence: Path) -> dict[str, Any]:
    try:
        meta = json.loads((evidence / "meta.json").read_text())
        return {"agency": str(meta["agency"]), "slots": int(meta["slots"]), "clip": float(meta["clip"]),
                "tenseal": str(meta["tenseal"])}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataFileError(f"{evidence}: not an agency's evidence folder (meta.json unreadable)") from exc


def replay(
    evidence: Path, receipts: list[Path], agency: str | None = None, keyring: Path | None = None
) -> ReplayReport:
    """Recompute every product the arbiter recorded from ``evidence`` and compare digests.

    ``evidence``: ``AGENCY/evidence/JOB`` (every arbiter key of the job: a resumed job has one per run) or
    one key's folder ``AGENCY/evidence/JOB/KEY16``; products the arbiter released under a key not given
    are a finding. ``receipts``: civil affairs' and the arbiter's receipts ledgers (``PARTY/evidence/JOB/receipts``).
    ``keyring``: the auditor's public keys (``audit keys``); with it each ledger must be signed, head
    included, by the party its genesis names, so they may come through anyone, the agency included; without
    it, take them from those parties directly. ``agency``: the agency the auditor
    means to check (default: whichever the evidence names). The rows are held to the federation's ``CLIP``,
    whatever the evidence declares.

    Raises
    ------
    DataFileError
        The folder is not evidence (or another agency's), it was made with another TenSEAL, no receipt from
        the arbiter names its key (the wrong receipts were given), or the receipts disagree.
    LedgerError
        A receipts ledger does not verify (altered, reordered, entries taken out or cut off the end), or
        (with ``keyring``) it is not signed by its party's key.
    """
    folders = _key_folders(evidence)
    metas = [_meta(f) for f in folders]
    name = metas[0]["agency"]
    if agency is not None and name != agency:
        raise DataFileError(f"{evidence}: the evidence of {name!r}, not of {agency!r}")
    for folder, meta in zip(folders, metas, strict=True):
        if meta["agency"] != name:
            raise DataFileError(f"{folder}: the evidence of {meta['agency']!r} among {name!r}'s")
        if meta["tenseal"] != ts.__version__:
            raise DataFileError(
                f"{folder}: kept with TenSEAL {meta['tenseal']}, this install has {ts.__version__}: replay on the "
                "agency's own install (products are bit-exact only for the same version)"
            )
    holders: set[str] = set()
    runs: dict[str, set[str]] = {}  # by arbiter key: the job's run the arbiter's receipts name
    recorded, read = _read_receipts(receipts, name, keyring, holders, runs)
    released: dict[str, list[tuple[str, int]]] = {}
    for key, by, kind, seq in sorted(recorded):
        if by == "arbiter" and kind in OPERAND_OF:
            released.setdefault(key, []).append((kind, seq))
    if not released:
        raise DataFileError(f"no arbiter receipt names {name}: give the arbiter's receipts of the job")
    # only the label holder the arbiter names vouches for the operands: never the agency itself, nor another
    if len(holders) != 1 or "None" in holders:
        raise DataFileError(f"the arbiter's receipts name no single label holder for {name} ({sorted(holders)})")
    if name in holders:
        raise DataFileError(f"{name} is the label holder: the replay checks the agencies without the label")
    anywhere = frozenset(v for (_, by, kind, _), v in recorded.items() if by in holders and kind in OPERAND_OF.values())
    vouchers = {ctx: Vouchers(next(iter(holders)), name, frozenset(r), anywhere, keyring) for ctx, r in runs.items()}
    parts = [_replay_key(f, m, recorded, holders, released, len(folders) == 1, vouchers)
             for f, m in zip(folders, metas, strict=True)]  # fmt: skip
    report = parts[0]
    if len(parts) > 1:
        report.inputs_findings = [f"key {p.context[:16]}: {f}" for p in parts for f in p.inputs_findings]
    for part in parts[1:]:
        report.max_row_norm = max(report.max_row_norm, part.max_row_norm)
        report.rows_over_clip = max(report.rows_over_clip, part.rows_over_clip)
        report.products += part.products
    report.keys = [p.context[:16] for p in parts]
    report.unreplayed = {k[:16]: len(v) for k, v in released.items() if k[:16] not in report.keys}
    report.receipts_signed = keyring is not None
    report.receipts = read
    return report


def _key_folders(evidence: Path) -> list[Path]:
    """``AGENCY/evidence/JOB/KEY16`` as given, or every key folder of ``AGENCY/evidence/JOB``."""
    if (evidence / "meta.json").exists() or not evidence.is_dir():
        return [evidence]
    folders = sorted(f for f in evidence.iterdir() if (f / "meta.json").is_file())
    if not folders:
        raise DataFileError(f"{evidence}: not an agency's evidence folder (no meta.json, no key folder holding one)")
    return folders


def _replay_key(
    evidence: Path,
    meta: dict[str, Any],
    recorded: dict[tuple[str, str, str, int], str],
    senders: set[str],
    released: dict[str, list[tuple[str, int]]],
    single: bool,
    vouchers: dict[str, Vouchers] | None = None,
) -> ReplayReport:
    """One arbiter key's products recomputed from its evidence folder (a key the arbiter released nothing under
    is an error when it is the one folder given: the wrong receipts)."""
    try:
        public = (evidence / "context.bin").read_bytes()
        inputs = np.load(evidence / "inputs.npy", allow_pickle=False)
        if not isinstance(inputs, np.ndarray):  # an .npz archive under the .npy name
            inputs.close()
            raise ValueError("inputs.npy is not one array")
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{evidence}: not an agency's evidence folder ({exc})") from exc
    key = context_digest(public)
    if single and key not in released:
        raise DataFileError(f"no arbiter receipt names {meta['agency']} with this evidence's key {key[:16]}: give the "
                            "arbiter's receipts of the same job")  # fmt: skip
    try:
        context, params = load_public_context(public, max_depth_needed=2)
    except Exception as exc:  # noqa: BLE001  # TenSEAL raises its own types for a malformed context
        raise DataFileError(f"{evidence}: context.bin is not a CKKS public context ({exc})") from exc
    report, x = _inputs_report(meta, key, inputs, params.slots)
    for kind, seq in released.get(key, []):
        check = _check(evidence, {k[1:]: v for k, v in recorded.items() if k[0] == key}, senders, x, context,
                       params.slots, kind, seq, (vouchers or {}).get(key), released.get(key, []))  # fmt: skip
        check.key = key[:16]
        report.products.append(check)
    return report


def _inputs_report(
    meta: dict[str, Any], key: str, inputs: np.ndarray, slots: int
) -> tuple[ReplayReport, npt.NDArray[np.float64]]:
    """The norm check, against the federation's ``CLIP``; inputs that are not finite float64 rows (as the
    agency's code writes them) are a finding, and what is replayed is their float64 value as multiplied."""
    problems: list[str] = []
    if meta["clip"] != CLIP:
        problems.append(f"the evidence declares the clip {meta['clip']!r}; the federation's is {CLIP}")
    if meta["slots"] != slots:
        problems.append(f"the evidence declares {meta['slots']} slots; its context has {slots}")
    if inputs.dtype != np.float64 or inputs.ndim != 2:
        problems.append(f"inputs.npy holds {inputs.dtype} of shape {inputs.shape}, not float64 rows")
    x = np.atleast_2d(np.asarray(inputs, dtype=np.float64)) if inputs.dtype.kind in "biuf" else np.zeros((0, 0))
    x = x.reshape(len(x), -1)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} row(s) of the kept inputs are not finite")
    counted = np.where(np.isfinite(x), x, 0.0)  # a non-finite row is its own finding, not a NaN norm
    norms = np.sqrt(np.einsum("ij,ij->i", counted, counted))
    over = int((norms > CLIP * (1 + NORM_SLACK)).sum())
    report = ReplayReport(meta["agency"], key, x.shape[0], x.shape[1], float(norms.max(initial=0.0)), CLIP, over,
                          problems)  # fmt: skip
    return report, x


def _check(
    evidence: Path,
    recorded: dict[tuple[str, str, int], str],
    senders: set[str],
    inputs: np.ndarray,
    context: ts.Context,
    slots: int,
    kind: str,
    seq: int,
    vouchers: Vouchers | None = None,
    products: list[tuple[str, int]] | None = None,
) -> ProductCheck:
    path = evidence / f"{kind}-{seq:04d}.npz"
    if not path.exists():
        return ProductCheck(kind, seq, False, "the arbiter released it; the agency kept no evidence of it")
    try:
        with np.load(path, allow_pickle=False) as kept:
            operands, envelopes = _numbered(kept, "operand"), _numbered(kept, "envelope")
            step = str(kept["step"]) if "step" in kept.files else ""
            mask = np.asarray(kept["mask"], dtype=np.float64)
            live = (np.unpackbits(kept["live"].astype(np.uint8, casting="no"))[: int(kept["rows"])].astype(bool)
                    if "live" in kept.files else None)  # fmt: skip
        if envelopes:  # the operands are what the envelopes open to, under the label holder's run keys as kept
            operands = _open_kept(evidence, envelopes, step, kind, None)
    except (*UNREADABLE, MessageRejectedError) as exc:
        return ProductCheck(kind, seq, False, f"its evidence is unreadable ({exc})")
    if len(operands) != chunk_count(len(inputs), slots):
        return ProductCheck(kind, seq, False, f"{len(operands)} operand ciphertexts for inputs of {len(inputs)} rows")
    if live is not None and len(live) != len(inputs):
        return ProductCheck(kind, seq, False, f"rows kept for {len(live)} households, inputs for {len(inputs)}")
    try:
        encrypted = [ts.ckks_vector_from(context, v) for v in operands]
        if kind == "gradient":
            x = inputs if live is None else inputs * live[:, None]
            sums = gradient_sums(encrypted, column_multipliers(x, slots))
        else:
            sums = pair_products(encrypted, inputs, slots)
        out = masked_totals(sums, mask, slots)
    except Exception as exc:  # noqa: BLE001  # TenSEAL's own errors: the evidence does not recompute
        return ProductCheck(kind, seq, False, f"cannot be recomputed from the evidence ({exc})")
    deviated = ("recomputed from the kept inputs it differs from what the arbiter released: the agency multiplied "
                "other rows")  # fmt: skip
    product = "" if digest(out) == recorded[("arbiter", kind, seq)] else deviated
    operand = OPERAND_OF[kind]
    sent = {recorded.get((by, operand, seq)) for by in senders} - {None}
    if digest(operands) in sent:
        return ProductCheck(kind, seq, not product, product)
    if not sent:
        unvouched = f"no receipt of civil affairs names the {operand} it multiplied (give civil affairs' receipts)"
        return ProductCheck(kind, seq, False, unvouched)
    # civil affairs' signature on the kept envelopes decides, if they were sealed for this product's place in
    # the sequence: signed steps strictly increasing with the products (a residual kept twice, or two swapped,
    # is not); when the order cannot be told, nothing is attributed
    sender = _certified_sender(evidence, vouchers)
    sealed = None if sender is None else _signed_by(evidence, envelopes, step, kind, operands, len(inputs), sender)
    in_order = _signed_steps_rise(evidence, products or [], kind, sender) if sealed and sender else None
    if sealed and in_order and not product:  # what it kept is what it multiplied, and civil affairs sealed it
        finding = ("civil affairs sealed it these operands (its signature on the kept envelopes, its run keys "
                   "certified by its ledger key) but recorded another digest: civil affairs' record is false; "
                   "the product recomputes to what the arbiter released")  # fmt: skip
    elif sealed and in_order:  # what it kept is not what it multiplied: nothing tells civil affairs' record false
        finding = (f"{product}; its kept {operand} (sealed by civil affairs) is not what civil affairs recorded, "
                   "and not what it multiplied either")  # fmt: skip
    elif sealed and in_order is False:
        finding = (f"the kept envelopes hold a {operand} civil affairs sealed it for another step (its products' "
                   "signed steps are not in order): the agency reused it")  # fmt: skip
    elif sealed is False:
        finding = (f"its operands are not the {operand} civil affairs sealed to it (no envelope signed by civil "
                   "affairs holds them, whole and in order): the agency substituted them")  # fmt: skip
    elif vouchers is not None and digest(operands) in vouchers.anywhere:
        finding = (f"its operands are the {operand} civil affairs recorded for another product (reused by the "
                   "agency, or civil affairs' records swapped; not attributed: needs --keyring, whole "
                   "evidence)")  # fmt: skip
    else:
        finding = (f"its operands are not the {operand} civil affairs recorded sealing to it (substituted by "
                   "the agency, or recorded otherwise; not attributed: needs --keyring, whole evidence)")  # fmt: skip
    return ProductCheck(kind, seq, False, finding)


def _numbered(kept: Any, prefix: str) -> list[bytes]:
    """The byte strings an evidence file keeps as ``PREFIX_0``, ``PREFIX_1``, ..."""
    count = sum(k.startswith(prefix + "_") for k in kept.files)
    return [kept[f"{prefix}_{i}"].astype(np.uint8, casting="no").tobytes() for i in range(count)]


MESSAGE_OF: dict[str, MessageKind] = {"gradient": "residuals", "hessian": "hessian-weights"}
"""The envelopes each product's operands came in."""

UNREADABLE = (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, zlib.error)
"""What reading a kept evidence file may raise: each is a finding about the file, never a crash."""


def _run(evidence: Path) -> tuple[dict[str, Any], PartyKeys, PartyPublicKeys]:
    """The kept run: its record, the agency's run key (opening only), the label holder's run keys as kept."""
    run = json.loads((evidence / "run.json").read_text())
    opening = X25519PrivateKey.from_private_bytes((evidence / "run-key.bin").read_bytes())
    sender = PartyPublicKeys(name=str(run["sender"]), sealing=bytes.fromhex(run["sealing"]),
                             signing=bytes.fromhex(run["signing"]))  # fmt: skip
    return run, PartyKeys(str(run["recipient"]), opening, Ed25519PrivateKey.generate()), sender


def _session(evidence: Path) -> str:
    """The session a key folder's envelopes name: its arbiter key's first 16 hex digits."""
    return context_digest((evidence / "context.bin").read_bytes())[:16]


def _open_kept(
    evidence: Path, envelopes: list[bytes], step: str, kind: str, sender: PartyPublicKeys | None
) -> list[bytes]:
    """The kept envelopes opened with the agency's kept run key, each checked against ``sender``'s signature
    (default: the label holder's run keys as kept) and sealed for ``step`` of this session. Raises
    MessageRejectedError (or ValueError, OSError)."""
    run, recipient, kept_sender = _run(evidence)
    where = step_run(str(run["run"]), _session(evidence), step)
    return [open_envelope(unpack(e), recipient=recipient, sender=sender or kept_sender, run=where,
                          kind=MESSAGE_OF[kind]) for e in envelopes]  # fmt: skip


def _certified_sender(evidence: Path, vouchers: Vouchers | None) -> PartyPublicKeys | None:
    """The label holder's run keys, if its ledger key (from the keyring) certified them for the job's run and
    the kept run record names the label holder, the agency and the run the arbiter's receipts name."""
    if vouchers is None or vouchers.keyring is None:
        return None
    try:
        run, _, _ = _run(evidence)
        named = (str(run["sender"]), str(run["recipient"]), str(run["run"]))
        if named[:2] != (vouchers.holder, vouchers.agency) or named[2] not in vouchers.runs or not run["certificate"]:
            return None
        ledger = keyring_key(vouchers.keyring, vouchers.holder)
        if ledger is None:
            return None
        return verify_certificate(named[2], vouchers.holder, bytes.fromhex(run["certificate"]), ledger)
    except (OSError, ValueError, KeyError, TypeError, MessageRejectedError, LedgerError):
        return None  # nothing vouches for the label holder's keys: the disagreement stays unattributed


def _signed_by(
    evidence: Path, envelopes: list[bytes], step: str, kind: str, operands: list[bytes], rows: int,
    sender: PartyPublicKeys,
) -> bool:  # fmt: skip
    """Whether the kept envelopes, whole and in order, carry ``sender``'s signature for this session and step
    and open to exactly ``operands``."""
    if not envelopes:
        return False
    try:
        sealed = [unpack(e) for e in envelopes]
        whole = [e.chunk for e in sealed] == list(range(len(sealed))) and all(
            e.chunks == len(sealed) and e.rows == rows for e in sealed)  # fmt: skip
        return whole and _open_kept(evidence, envelopes, step, kind, sender) == operands
    except (OSError, ValueError, MessageRejectedError):
        return False


def _signed_steps_rise(
    evidence: Path, products: list[tuple[str, int]], kind: str, sender: PartyPublicKeys
) -> bool | None:
    """Whether the steps ``sender`` signed into the kept envelopes of this kind's products rise strictly with
    the product number (a step is ``I`` or ``I.TURN``): each product multiplied a residual of its own step.
    None when that cannot be told (a product without envelopes that open under ``sender`` for this session)."""
    steps = []
    try:
        for _, seq in sorted(p for p in products if p[0] == kind):
            with np.load(evidence / f"{kind}-{seq:04d}.npz", allow_pickle=False) as kept:
                envelopes, step = _numbered(kept, "envelope"), str(kept["step"])
            if not envelopes:
                return None
            _open_kept(evidence, envelopes, step, kind, sender)  # the step is the one its signed header names
            steps.append(tuple(int(part) for part in step.split(".")))
    except (*UNREADABLE, MessageRejectedError):
        return None
    return all(a < b for a, b in zip(steps, steps[1:], strict=False))
