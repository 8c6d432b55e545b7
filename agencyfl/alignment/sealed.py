"""Sealed envelopes: HPKE to the recipient, Ed25519 by the sender, the header bound into both.

Every alignment message crosses the coordinator, which must not read it (it could otherwise compare
doubly blinded sets) nor alter it. A chunk of a message is encrypted with HPKE (RFC 9180, base mode:
DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305; ``cryptography``'s implementation) to the
recipient's static key, with the canonical header as HPKE ``info``; the sender signs the header and
the ciphertext's SHA-256 with Ed25519. HPKE's authenticated mode is not exposed by ``cryptography``,
hence the signature.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from agencyfl.alignment.errors import MessageRejectedError

PROTOCOL = "agencyfl-alignment/1"
MessageKind = Literal[
    "parameters",
    "register",
    "query",
    "response",
    "roster",
    "roster-response",
    "partial-scores",
    "residuals",
    "explain-request",
    "explanations",
]
"""What a message is; ``partial-scores`` and ``residuals`` are vertical training's (``docs/vertical.md``),
``explain-request`` and ``explanations`` screening's reasons (``docs/screening.md``)."""
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


class PartyPublicKeys(BaseModel):
    """A party's public keys, as others hold them (confirmed out of band, as for the ledger keyring)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    sealing: bytes = Field(min_length=32, max_length=32)
    """Raw X25519 public key that envelopes to this party are encrypted to."""
    signing: bytes = Field(min_length=32, max_length=32)
    """Raw Ed25519 public key that this party's envelopes are signed with."""


class PartyKeys:
    """A party's secret keys. Never serialized: nothing here writes them out.

    Parameters
    ----------
    name
        The party's name as the others' directories know it.
    sealing
        Its X25519 key (envelopes to it are decrypted with it).
    signing
        Its Ed25519 key (its envelopes are signed with it).
    """

    def __init__(self, name: str, sealing: X25519PrivateKey, signing: Ed25519PrivateKey) -> None:
        self.name = name
        self._sealing = sealing
        self._signing = signing

    @classmethod
    def generate(cls, name: str) -> PartyKeys:
        """Fresh keys for ``name``."""
        return cls(name, X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    def public(self) -> PartyPublicKeys:
        """The public halves, to give to the other parties."""
        return PartyPublicKeys(
            name=self.name,
            sealing=self._sealing.public_key().public_bytes_raw(),
            signing=self._signing.public_key().public_bytes_raw(),
        )

    def __repr__(self) -> str:
        return f"PartyKeys({self.name!r}, <secret>)"

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``."""
        return self._signing.sign(data)

    def decrypt(self, ciphertext: bytes, info: bytes) -> bytes:
        """HPKE-open ``ciphertext`` sealed to this party under ``info`` (raises on failure)."""
        return _SUITE.decrypt(ciphertext, self._sealing, info=info)


class Envelope(BaseModel):
    """One chunk of one message, as the coordinator relays it: names, kind, counts, ciphertext, signature."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    run: str
    sender: str
    recipient: str
    kind: MessageKind
    chunk: int = Field(ge=0)
    chunks: int = Field(ge=1)
    rows: int = Field(ge=0)
    """Values in the whole message (all chunks)."""
    ciphertext: bytes
    signature: bytes

    def header(self) -> bytes:
        """The canonical header: everything but the ciphertext and signature, with the protocol name."""
        return _header(self.run, self.sender, self.recipient, self.kind, self.chunk, self.chunks, self.rows)

    @property
    def size(self) -> int:
        """Bytes on the wire: header, ciphertext and signature."""
        return len(self.header()) + len(self.ciphertext) + len(self.signature)


def _header(run: str, sender: str, recipient: str, kind: str, chunk: int, chunks: int, rows: int) -> bytes:
    fields = {
        "protocol": PROTOCOL,
        "run": run,
        "sender": sender,
        "recipient": recipient,
        "kind": kind,
        "chunk": chunk,
        "chunks": chunks,
        "rows": rows,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _signed(header: bytes, ciphertext: bytes) -> bytes:
    return hashlib.sha256(header).digest() + hashlib.sha256(ciphertext).digest()


def seal(
    payload: bytes,
    *,
    run: str,
    sender: PartyKeys,
    recipient: PartyPublicKeys,
    kind: MessageKind,
    chunk: int = 0,
    chunks: int = 1,
    rows: int = 0,
) -> Envelope:
    """Encrypt ``payload`` to ``recipient`` and sign it as ``sender``.

    Parameters
    ----------
    payload
        The plaintext (one chunk).
    run
        The alignment run's id (an envelope from another run is refused).
    sender, recipient
        The sender's secret keys and the recipient's public keys.
    kind
        What the message is.
    chunk, chunks
        This chunk's index and the message's number of chunks, default one chunk.
    rows
        Values in the whole message, default 0.
    """
    header = _header(run, sender.name, recipient.name, kind, chunk, chunks, rows)
    ciphertext = _SUITE.encrypt(payload, X25519PublicKey.from_public_bytes(recipient.sealing), info=header)
    return Envelope(
        run=run,
        sender=sender.name,
        recipient=recipient.name,
        kind=kind,
        chunk=chunk,
        chunks=chunks,
        rows=rows,
        ciphertext=ciphertext,
        signature=sender.sign(_signed(header, ciphertext)),
    )


def open_envelope(
    envelope: Envelope, *, recipient: PartyKeys, sender: PartyPublicKeys, run: str, kind: MessageKind
) -> bytes:
    """Check and decrypt ``envelope``: the expected run, sender, recipient and kind, the sender's signature.

    Raises
    ------
    MessageRejectedError
        If any of those differ, the signature does not verify, or decryption fails.
    """
    expected = (run, sender.name, recipient.name, kind)
    got = (envelope.run, envelope.sender, envelope.recipient, envelope.kind)
    if got != expected:
        raise MessageRejectedError(f"expected run/sender/recipient/kind {expected}, got {got}")
    header = envelope.header()
    try:
        Ed25519PublicKey.from_public_bytes(sender.signing).verify(
            envelope.signature, _signed(header, envelope.ciphertext)
        )
    except InvalidSignature as err:
        raise MessageRejectedError(
            f"{kind} chunk {envelope.chunk} from {sender.name!r}: signature does not verify (altered in transit?)"
        ) from err
    try:
        return recipient.decrypt(envelope.ciphertext, header)
    except InvalidTag as err:  # cryptography's HPKE raises it for any bad ciphertext, even a truncated one
        raise MessageRejectedError(
            f"{kind} chunk {envelope.chunk} from {sender.name!r} does not decrypt under its header"
        ) from err
