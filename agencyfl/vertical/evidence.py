"""What lets an audit replay an agency's products after a job (``docs/vertical.md``, "Accountability").

An agency's masked gradients and Hessian entries are deterministic functions of civil affairs' ciphertexts,
its own rows and its masks. The agency keeps those (``Evidence``, in its own folder: its rows never leave);
civil affairs and the arbiter keep only the SHA-256 of what they sent it and received from it
(``Receipts``). ``agencyfl.vertical.replay`` recomputes the products and compares.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import numpy.typing as npt
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agencyfl.federation.pki import write_private
from agencyfl.privacy.keys import key_id
from agencyfl.privacy.ledger import canonical_json

ProductKind = Literal["gradient", "hessian"]
OperandKind = Literal["residual", "hessian-weights"]
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


GENESIS = "0" * 64
"""What the first receipt of a file names as the one before it."""


def receipt_signer(by: str) -> str:
    """Whose key signs a receipt recorded by ``by``, as a keyring names it (``audit keys``)."""
    return "coordinator" if by == "arbiter" else by


def _last_line_hash(f: BinaryIO) -> str:
    """SHA-256 of the last whole line of an open receipts file (``GENESIS`` when it has none); a line torn by
    a stop is cut off first (it was never completed, so nothing was released after it)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 65536))
    tail = f.read()
    whole = tail[: tail.rfind(b"\n") + 1]
    if len(whole) != len(tail):
        os.truncate(f.fileno(), size - (len(tail) - len(whole)))
    lines = whole.splitlines()
    return hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS


class Receipts:
    """Append-only JSON lines, one per vector a party sealed to or received from an agency: who recorded it,
    the arbiter key's digest, the agency, the kind, a sequence number per (agency, kind), the SHA-256 (and,
    for the arbiter's, the label holder whose receipts vouch for the operands); each line names the SHA-256
    of the line before it (``prev``) and, with the party's ledger key, is signed by it (``key``, ``sig``), so
    receipts can travel through anyone and none can be changed, moved or taken out of the middle unseen.
    Written under a lock and flushed as each vector goes: a job that stops, or resumes, or a second writer,
    continues one chain."""

    def __init__(self, path: Path, by: str, public_context: bytes, key: Ed25519PrivateKey | None = None,
                 label_holder: str | None = None) -> None:  # fmt: skip
        _private_folder(path.parent)
        self.path = path
        self.by = by
        self.context = context_digest(public_context)
        self.label_holder = label_holder
        self._key = key
        self._seq: Counter[tuple[str, str]] = Counter()

    def record(self, agency: str, kind: str, vectors: list[bytes]) -> None:
        seq = self._seq[agency, kind]
        self._seq[agency, kind] += 1
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
            line: dict[str, Any] = {"by": self.by, "context": self.context, "agency": agency, "kind": kind,
                                    "seq": seq, "sha256": digest(vectors), "prev": _last_line_hash(f)}  # fmt: skip
            if self.label_holder is not None:
                line["label_holder"] = self.label_holder
            if self._key is not None:
                line["key"] = key_id(self._key.public_key())
                line["sig"] = self._key.sign(canonical_json(line)).hex()
            f.write(canonical_json(line) + b"\n")
            f.flush()
            os.fsync(f.fileno())


class Evidence:
    """An agency's own record of each product it computed: the operands as opened, the rows it kept (bits),
    its masks; with its inputs and the arbiter's public context once. Stays in the agency's folder."""

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

    def keep(self, kind: ProductKind, operands: list[bytes], live: npt.NDArray[np.bool_] | None,
             mask: npt.NDArray[np.float64]) -> None:  # fmt: skip
        """One product's inputs besides the rows: ``live`` None means every row (nothing clipped out)."""
        seq = self._seq[kind]
        self._seq[kind] += 1
        arrays: dict[str, Any] = {f"operand_{i}": np.frombuffer(v, dtype=np.uint8) for i, v in enumerate(operands)}
        if live is not None:
            arrays["live"] = np.packbits(live)
            arrays["rows"] = np.array(len(live))
        buffer = io.BytesIO()
        np.savez(buffer, mask=mask, **arrays)
        write_private(self.folder / f"{kind}-{seq:04d}.npz", buffer.getvalue())
