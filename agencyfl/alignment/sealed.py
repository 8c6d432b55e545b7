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
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
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
    "hessian-weights",
    "explain-request",
    "explanations",
]
"""What a message is; ``partial-scores``, ``residuals`` and ``hessian-weights`` are vertical training's
(``docs/vertical.md``),
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
    """A party's secret keys. Never written out: in a deployment ``private_bytes`` hands them to the
    SuperNode's in-memory run state between steps (``clients.alignment_steps``), nothing else.

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

    @classmethod
    def from_private_bytes(cls, name: str, private: bytes) -> PartyKeys:
        """Keys from ``private_bytes`` (64 bytes: X25519 sealing, then Ed25519 signing)."""
        if len(private) != 64:
            raise MessageRejectedError(f"run keys of {name!r}: {len(private)} bytes, expected 64")
        return cls(
            name,
            X25519PrivateKey.from_private_bytes(private[:32]),
            Ed25519PrivateKey.from_private_bytes(private[32:]),
        )

    def private_bytes(self) -> bytes:
        """The two raw secret keys (for the SuperNode's in-memory run state only)."""
        return self._sealing.private_bytes_raw() + self._signing.private_bytes_raw()

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

    def agree(self, peer: PartyPublicKeys, info: bytes) -> bytes:
        """A 32-byte secret only this party and ``peer`` can compute (X25519, then HKDF-SHA256 over ``info``)."""
        shared = self._sealing.exchange(X25519PublicKey.from_public_bytes(peer.sealing))
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)

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


# ------------------------------------------------------------------ across hosts (``coordinator align``)
_CERTIFICATE_DOMAIN = b"agencyfl alignment keys v1\n"  # never mistaken for a ledger entry or a plan signature
_SIGNATURE_BYTES = 64


def certificate_bytes(run: str, keys: PartyPublicKeys) -> bytes:
    """What a party's ledger key signs to vouch for its run keys: the domain, run, name and both keys."""
    body = json.dumps({"run": run, "name": keys.name}, sort_keys=True, separators=(",", ":")).encode()
    return _CERTIFICATE_DOMAIN + body + b"\n" + keys.sealing + keys.signing


def certify(run: str, keys: PartyPublicKeys, ledger_key: Ed25519PrivateKey) -> bytes:
    """A certificate for ``keys``: the two raw public keys and the ledger key's signature (128 bytes)."""
    return keys.sealing + keys.signing + ledger_key.sign(certificate_bytes(run, keys))


def verify_certificate(run: str, name: str, certificate: bytes, ledger_key: Ed25519PublicKey) -> PartyPublicKeys:
    """The run keys ``certificate`` vouches for, if ``name``'s ledger key signed them for this run.

    Raises
    ------
    MessageRejectedError
        If the certificate is malformed or not signed by ``ledger_key`` for this run and name.
    """
    if len(certificate) != 64 + _SIGNATURE_BYTES:
        raise MessageRejectedError(f"the run keys of {name!r}: {len(certificate)} bytes, not a certificate")
    keys = PartyPublicKeys(name=name, sealing=certificate[:32], signing=certificate[32:64])
    try:
        ledger_key.verify(certificate[64:], certificate_bytes(run, keys))
    except InvalidSignature as err:
        raise MessageRejectedError(
            f"the run keys said to be {name!r}'s are not signed by the ledger key this party holds for it "
            "(a substituted key, or the wrong peer key at `steward start --peer-key`)"
        ) from err
    return keys


def certified_peers(
    run: str, agency: str, peers: list[str], certificates: dict[str, bytes],
    ledger_keys: dict[str, Ed25519PublicKey], purpose: str,
) -> dict[str, PartyPublicKeys]:  # fmt: skip
    """The run keys of ``peers`` that the coordinator forwarded (``certificates``), each verified with the ledger
    key ``agency``'s steward was handed for that peer (``ledger_keys``; ``steward start --peer-key``).

    Raises
    ------
    MessageRejectedError
        A peer whose ledger key this party does not hold, or whose certificate is missing or not signed by
        it: without that check the coordinator could stand in for the peer and read what is sealed to it.
    """
    directory = {}
    for peer in peers:
        trusted = ledger_keys.get(peer)
        if trusted is None:
            raise MessageRejectedError(
                f"{agency} holds no ledger key for {peer}: its steward must start with "
                f"`--peer-key {peer}=LEDGER.pub` to {purpose} with it"
            )
        if peer not in certificates:
            raise MessageRejectedError(f"the coordinator forwarded no run keys of {peer}")
        directory[peer] = verify_certificate(run, peer, certificates[peer], trusted)
    return directory


def pack(envelope: Envelope) -> bytes:
    """An envelope as bytes for a Flower message: header length (4 bytes), header, signature, ciphertext."""
    header = envelope.header()
    return len(header).to_bytes(4, "big") + header + envelope.signature + envelope.ciphertext


def unpack(data: bytes) -> Envelope:
    """The envelope ``pack`` wrote.

    Raises
    ------
    MessageRejectedError
        If the bytes are not a packed envelope of this protocol.
    """
    try:
        size = int.from_bytes(data[:4], "big")
        fields = json.loads(data[4 : 4 + size])
        if fields.pop("protocol") != PROTOCOL:
            raise ValueError("another protocol")
        rest = data[4 + size :]
        if len(rest) < _SIGNATURE_BYTES:
            raise ValueError("truncated")
        return Envelope(**fields, signature=rest[:_SIGNATURE_BYTES], ciphertext=rest[_SIGNATURE_BYTES:])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise MessageRejectedError(f"a relayed envelope is malformed ({exc.__class__.__name__})") from None
