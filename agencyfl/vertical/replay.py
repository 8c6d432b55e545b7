"""Replay an agency's products from its evidence and compare with what civil affairs and the arbiter recorded
(``docs/vertical.md``, "Accountability"). Runs where the agency's rows are: they never leave."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal as ts
from cryptography.exceptions import InvalidSignature

from agencyfl.federation.errors import DataFileError, LedgerError
from agencyfl.privacy.he import load_public_context
from agencyfl.privacy.keys import key_id, keyring_key
from agencyfl.privacy.ledger import canonical_json
from agencyfl.vertical.encoding import CLIP
from agencyfl.vertical.evidence import GENESIS, OPERAND_OF, context_digest, digest, receipt_signer
from agencyfl.vertical.protocol import chunk_count, column_multipliers, gradient_sums, masked_totals, pair_products

NORM_SLACK = 1e-9
"""Relative slack on the row norm bound: ``clip_rows`` scales to it in floating point."""


@dataclass
class ProductCheck:
    """One product the arbiter released: matched, or the first thing that did not."""

    kind: str
    seq: int
    matched: bool
    finding: str = ""


@dataclass
class ReplayReport:
    """What the replay found for one agency and arbiter key."""

    agency: str
    context: str
    rows: int
    width: int
    max_row_norm: float
    clip: float
    rows_over_clip: int
    inputs_findings: list[str] = field(default_factory=list)  # what is wrong with the kept inputs themselves
    receipts_signed: bool = False  # every receipt verified against the auditor's keyring
    products: list[ProductCheck] = field(default_factory=list)

    @property
    def findings(self) -> list[str]:
        over = (
            [f"{self.rows_over_clip} row(s) of the kept inputs exceed the declared norm {self.clip} "
             f"(largest {self.max_row_norm:.6g}): the noise assumed rows within it"]
            if self.rows_over_clip else []
        )  # fmt: skip
        products = [f"{p.kind} {p.seq}: {p.finding}" for p in self.products if not p.matched]
        return [*self.inputs_findings, *over, *products]

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "agency": self.agency, "context": self.context, "rows": self.rows, "width": self.width,
            "clip": self.clip, "max_row_norm": self.max_row_norm, "rows_over_clip": self.rows_over_clip,
            "receipts_signed": self.receipts_signed,
            "products": [vars(p) for p in self.products], "findings": self.findings, "ok": self.ok,
        }  # fmt: skip


def _read_receipts(
    paths: list[Path], agency: str, context: str, keyring: Path | None, holders: set[str]
) -> dict[tuple[str, str, int], str]:
    """(recorded by, kind, seq) -> SHA-256, for this agency and key, from every receipts file given. Each file's
    chain is checked (every line names the hash of the one before); with ``keyring``, every line's signature
    by its party (``receipt_signer``). A last line without its newline (a job stopped while writing it) is
    skipped; two digests for one key are refused. ``holders`` collects the label holder the arbiter's
    receipts for this agency and key name."""
    found: dict[tuple[str, str, int], str] = {}
    for path in paths:
        try:
            lines = path.read_bytes().split(b"\n")[:-1]  # whole lines only
        except OSError as exc:
            raise DataFileError(f"{path}: cannot read the receipts file ({exc})") from exc
        prev = GENESIS
        for number, text in enumerate(lines, start=1):
            try:
                r = json.loads(text)
                key, value = (str(r["by"]), str(r["kind"]), int(r["seq"])), str(r["sha256"])
                mine = r["agency"] == agency and r["context"] == context
            except (ValueError, KeyError, TypeError) as exc:
                raise DataFileError(f"{path}:{number}: not a receipt line") from exc
            if canonical_json(r) != text:  # what is hashed and signed is exactly what is read
                raise DataFileError(f"{path}:{number}: not a receipt line as its party writes it (canonical JSON)")
            if r.get("prev") != prev:
                raise LedgerError(f"{path}:{number}: the receipts chain is broken (a line before it taken out, "
                                  "altered or reordered)")  # fmt: skip
            prev = hashlib.sha256(text).hexdigest()
            if keyring is not None:
                _verify(r, keyring, f"{path}:{number}")
            if mine and key[0] == "arbiter":
                holders.add(str(r.get("label_holder")))
            if mine and found.setdefault(key, value) != value:
                raise DataFileError(f"{path}:{number}: a second, different digest for {key[0]}'s {key[1]} {key[2]}")
    return found


def _verify(receipt: dict[str, Any], keyring: Path, where: str) -> None:
    signer = receipt_signer(str(receipt["by"]))
    public = keyring_key(keyring, signer)
    if public is None:
        raise LedgerError(f"{where}: the keyring has no key for {signer!r} (import it with `audit keys import`)")
    if receipt.get("key") != key_id(public):
        raise LedgerError(f"{where}: signed with key {receipt.get('key')!r}; the keyring holds {key_id(public)} for "
                          f"{signer!r}")  # fmt: skip
    body = {k: v for k, v in receipt.items() if k != "sig"}
    try:
        public.verify(bytes.fromhex(str(receipt["sig"])), canonical_json(body))
    except (KeyError, ValueError, InvalidSignature) as exc:
        raise LedgerError(f"{where}: a receipt not signed by {signer}'s key in the keyring") from exc


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

    ``receipts``: civil affairs' and the arbiter's files. ``keyring``: the auditor's public keys (``audit
    keys``); with it every receipt must be signed by its party, so the files may come through anyone, the
    agency included; without it, take them from those parties directly. ``agency``: the agency the auditor
    means to check (default: whichever the evidence names). The rows are held to the federation's ``CLIP``,
    whatever the evidence declares.

    Raises
    ------
    DataFileError
        The folder is not evidence (or another agency's), it was made with another TenSEAL, no receipt from
        the arbiter names its key (the wrong receipts were given), or the receipts disagree.
    LedgerError
        A receipts file's chain is broken, or (with ``keyring``) a receipt is not signed by its party's key.
    """
    meta = _meta(evidence)
    if agency is not None and meta["agency"] != agency:
        raise DataFileError(f"{evidence}: the evidence of {meta['agency']!r}, not of {agency!r}")
    if meta["tenseal"] != ts.__version__:
        raise DataFileError(
            f"{evidence}: kept with TenSEAL {meta['tenseal']}, this install has {ts.__version__}: replay on the "
            "agency's own install (products are bit-exact only for the same version)"
        )
    try:
        public = (evidence / "context.bin").read_bytes()
        inputs = np.load(evidence / "inputs.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{evidence}: not an agency's evidence folder ({exc})") from exc
    key = context_digest(public)
    holders: set[str] = set()
    recorded = _read_receipts(receipts, meta["agency"], key, keyring, holders)
    released = sorted((kind, seq) for by, kind, seq in recorded if by == "arbiter" and kind in OPERAND_OF)
    if not released:
        raise DataFileError(
            f"no arbiter receipt names {meta['agency']} with this evidence's key {key[:16]}: give the arbiter's "
            "receipts of the same job"
        )
    # only the label holder the arbiter names vouches for the operands: never the agency itself, nor another
    if len(holders) != 1 or "None" in holders:
        raise DataFileError(
            f"the arbiter's receipts name no single label holder for {meta['agency']} ({sorted(holders)})"
        )
    senders = holders
    if meta["agency"] in senders:
        raise DataFileError(f"{meta['agency']} is the label holder: the replay checks the agencies without the label")
    try:
        context, params = load_public_context(public, max_depth_needed=2)
    except Exception as exc:  # noqa: BLE001  # TenSEAL raises its own types for a malformed context
        raise DataFileError(f"{evidence}: context.bin is not a CKKS public context ({exc})") from exc
    report, x = _inputs_report(meta, key, inputs, params.slots)
    report.receipts_signed = keyring is not None
    for kind, seq in released:
        report.products.append(_check(evidence, recorded, senders, x, context, params.slots, kind, seq))
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
) -> ProductCheck:
    path = evidence / f"{kind}-{seq:04d}.npz"
    if not path.exists():
        return ProductCheck(kind, seq, False, "the arbiter released it; the agency kept no evidence of it")
    try:
        with np.load(path, allow_pickle=False) as kept:
            count = sum(k.startswith("operand_") for k in kept.files)
            operands = [kept[f"operand_{i}"].astype(np.uint8, casting="no").tobytes() for i in range(count)]
            mask = np.asarray(kept["mask"], dtype=np.float64)
            live = (np.unpackbits(kept["live"].astype(np.uint8, casting="no"))[: int(kept["rows"])].astype(bool)
                    if "live" in kept.files else None)  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        return ProductCheck(kind, seq, False, f"its evidence is unreadable ({exc})")
    sent = {recorded.get((by, OPERAND_OF[kind], seq)) for by in senders} - {None}
    if digest(operands) not in sent:
        return ProductCheck(kind, seq, False, f"its operands are not the {OPERAND_OF[kind]} civil affairs sent")
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
    if digest(out) != recorded[("arbiter", kind, seq)]:
        return ProductCheck(kind, seq, False, "recomputed from the kept inputs it differs from what the arbiter "
                            "released: the agency multiplied other rows")  # fmt: skip
    return ProductCheck(kind, seq, True)
