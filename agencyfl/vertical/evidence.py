"""What lets an audit replay an agency's products after a job (``docs/vertical.md``, "Accountability").

An agency's masked gradients and Hessian entries are deterministic functions of civil affairs' ciphertexts,
its own rows and its masks. The agency keeps those (``Evidence``, in its own folder: its rows never leave);
civil affairs and the arbiter keep only the SHA-256 of what they sent it and received from it
(``Receipts``). ``agencyfl.vertical.replay`` recomputes the products and compares.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict

from agencyfl.alignment.sealed import PartyKeys, PartyPublicKeys
from agencyfl.federation.pki import write_private
from agencyfl.privacy.ledger import Ledger

ProductKind = Literal["gradient", "hessian"]
OperandKind = Literal["residual", "hessian-weights"]
ReceiptKind = Literal[OperandKind, ProductKind]
OPERAND_OF: dict[str, OperandKind] = {"gradient": "residual", "hessian": "hessian-weights"}
"""Which of civil affairs' sealed vectors each product multiplies."""


def digest(vectors: list[bytes]) -> str:
    """SHA-256 of a list of ciphertexts, each length-prefixed (so no two lists share a digest by splitting)."""
    h = hashlib.sha256()
    for v in vectors:
        h.update(len(v).to_bytes(8, "big"))
        h.update(v)
    return h.hexdigest()


def context_digest(public_context: bytes) -> str:
    """SHA-256 of the arbiter's public context: names the job's key (one per arbiter session)."""
    return hashlib.sha256(public_context).hexdigest()


def _private_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)  # ``mkdir``'s mode holds only for a folder it makes, and not for its parents


def _npy(array: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def evidence_folder(root: Path, public_context: bytes) -> Path:
    """``ROOT/KEY16``: an agency's evidence for one arbiter key (a resumed job gets a new key, a new folder)."""
    return root / context_digest(public_context)[:16]


RECEIPTS = "receipts"
"""The folder of a party's receipts ledger for one job: ``PARTY/evidence/JOB/receipts``."""


def receipt_signer(by: str) -> str:
    """Whose key signs a receipt recorded by ``by``, as a keyring names it (``audit keys``)."""
    return "coordinator" if by == "arbiter" else by


class Receipt(BaseModel):
    """One vector a party sealed to an agency (civil affairs: ``residual``, ``hessian-weights``) or one product
    it released from an agency (the arbiter: ``gradient``, ``hessian``): only its SHA-256, with the arbiter
    key's digest, a number per (agency, kind) and, for the arbiter's, the label holder whose receipts vouch for
    the operands."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ReceiptKind
    by: str
    context: str
    agency: str
    number: int
    sha256: str
    label_holder: str | None = None
    run: str = ""  # the job's run: what the envelopes of the job name (sealed for ``RUN/KEY16/step-N``)

    @property
    def party(self) -> str:
        """Whose ledger it belongs in."""
        return receipt_signer(self.by)


class Receipts:
    """A party's receipts for one job, kept as a ``privacy.ledger.Ledger`` of ``Receipt`` signed with its ledger
    key (civil affairs' own, the coordinator's for the arbiter): chained, with a signed head, so receipts can
    travel through anyone and none can be changed, moved, taken out or cut off the end unseen. Each is
    appended under the ledger's lock and fsynced as its vector goes: a job that stops, or resumes, or a second
    writer, continues one chain; a write a stop left unfinished is finished first (``recover_after_stop``)."""

    def __init__(self, folder: Path, by: str, public_context: bytes, key: Ed25519PrivateKey,
                 label_holder: str | None = None, run: str = "") -> None:  # fmt: skip
        _private_folder(folder.parent)
        _private_folder(folder)
        self.ledger = Ledger(folder, key, Receipt, party=receipt_signer(by))
        self.ledger.recover_after_stop()
        self.by = by
        self.context = context_digest(public_context)
        self.label_holder = label_holder
        self.run = run
        self._numbers: Counter[tuple[str, str]] = Counter()

    def record(self, agency: str, kind: ReceiptKind, vectors: list[bytes]) -> None:
        number = self._numbers[agency, kind]
        self._numbers[agency, kind] += 1
        self.ledger.append(Receipt(kind=kind, by=self.by, context=self.context, agency=agency, number=number,
                                   sha256=digest(vectors), label_holder=self.label_holder, run=self.run))  # fmt: skip


class Evidence:
    """An agency's own record of each product it computed: the envelopes civil affairs sealed its operands in
    (or the operands as opened), the rows it kept (bits), its masks; with its inputs, the arbiter's public
    context and its run (``keep_run``) once. Stays in the agency's folder."""

    def __init__(self, root: Path, agency: str, public_context: bytes, inputs: npt.NDArray[np.float64],
                 slots: int, clip: float) -> None:  # fmt: skip
        self.folder = evidence_folder(root, public_context)
        _private_folder(root)
        _private_folder(self.folder)
        write_private(self.folder / "inputs.npy", _npy(np.asarray(inputs, dtype=np.float64)))
        write_private(self.folder / "context.bin", public_context)
        meta: dict[str, Any] = {"agency": agency, "context": context_digest(public_context), "slots": slots,
                                "clip": clip, "tenseal": ts.__version__}  # fmt: skip
        write_private(self.folder / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        self._seq: Counter[str] = Counter()

    def keep_run(self, run: str, recipient: PartyKeys, sender: PartyPublicKeys, certificate: bytes | None) -> None:
        """What proves who sealed the operands (``docs/vertical.md``, "Accountability"): the job's run, its own
        run sealing key (it opens only this job's envelopes to it, which hold ciphertexts under the job's key),
        and the label holder's run keys with the certificate its ledger key signed ("": none was made)."""
        write_private(self.folder / "run-key.bin", recipient.private_bytes()[:32])  # X25519: opening only
        record = {"run": run, "recipient": recipient.name, "sender": sender.name, "sealing": sender.sealing.hex(),
                  "signing": sender.signing.hex(), "certificate": certificate.hex() if certificate else ""}  # fmt: skip
        write_private(self.folder / "run.json", (json.dumps(record, indent=2) + "\n").encode())

    def keep(self, kind: ProductKind, operands: list[bytes], live: npt.NDArray[np.bool_] | None,
             mask: npt.NDArray[np.float64], sealed: tuple[list[bytes], str] | None = None) -> None:  # fmt: skip
        """One product's inputs besides the rows: ``live`` None means every row (nothing clipped out);
        ``sealed``: the envelopes the operands came in (packed) and the step they were sealed for, kept instead
        of ``operands`` (``keep_run`` first)."""
        seq = self._seq[kind]
        self._seq[kind] += 1
        # the envelopes as they came (signed by civil affairs), which open to the operands with ``run-key.bin``:
        # kept instead of the operands, not beside them (the same bytes twice)
        arrays: dict[str, Any] = (
            {f"operand_{i}": np.frombuffer(v, dtype=np.uint8) for i, v in enumerate(operands)} if sealed is None
            else {f"envelope_{i}": np.frombuffer(e, dtype=np.uint8) for i, e in enumerate(sealed[0])}
            | {"step": np.array(sealed[1])}
        )  # fmt: skip
        if live is not None:
            arrays["live"] = np.packbits(live)
            arrays["rows"] = np.array(len(live))
        buffer = io.BytesIO()
        np.savez(buffer, mask=mask, **arrays)
        write_private(self.folder / f"{kind}-{seq:04d}.npz", buffer.getvalue())
