"""The coordinator's relay, and sending blinded values through it in sealed chunks.

The relay stores and forwards envelopes. It sees sender and recipient names, the kind, run, chunk
counts and sizes, and ciphertexts; it holds no key. ``Relay`` keeps a record of what it saw (and,
if asked, every byte), so tests can check that nothing a party computed is readable in it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from agencyfl.alignment.errors import MessageRejectedError, ProtocolError
from agencyfl.alignment.psi import DEFAULT_BATCH, Values, as_values
from agencyfl.alignment.sealed import Envelope, MessageKind, PartyKeys, PartyPublicKeys, open_envelope, seal


class Transport(Protocol):
    """How envelopes travel between parties (in process: ``Relay``; across hosts: the coordinator)."""

    def post(self, envelope: Envelope) -> None:
        """Accept an envelope for its recipient."""
        ...

    def take(self, recipient: str, sender: str, kind: MessageKind) -> list[Envelope]:
        """Hand over (and forget) every envelope of ``kind`` from ``sender`` to ``recipient``, in arrival order."""
        ...


class RelayRecord(BaseModel):
    """What the relay saw of one envelope."""

    model_config = ConfigDict(frozen=True)

    sender: str
    recipient: str
    kind: MessageKind
    chunk: int
    chunks: int
    rows: int
    size: int


class Relay:
    """An in-process coordinator relay that records what passes through it.

    Parameters
    ----------
    keep_transcript
        Also keep every byte of every envelope (for tests; memory grows with the traffic), default False.
    """

    def __init__(self, *, keep_transcript: bool = False) -> None:
        self._queues: defaultdict[tuple[str, str, str], list[Envelope]] = defaultdict(list)
        self._records: list[RelayRecord] = []
        self._transcript: bytearray | None = bytearray() if keep_transcript else None

    def post(self, envelope: Envelope) -> None:
        """Queue ``envelope`` for its recipient and record it."""
        self._records.append(
            RelayRecord(
                sender=envelope.sender,
                recipient=envelope.recipient,
                kind=envelope.kind,
                chunk=envelope.chunk,
                chunks=envelope.chunks,
                rows=envelope.rows,
                size=envelope.size,
            )
        )
        if self._transcript is not None:
            self._transcript += envelope.header() + envelope.ciphertext + envelope.signature
        self._queues[(envelope.recipient, envelope.sender, envelope.kind)].append(envelope)

    def take(self, recipient: str, sender: str, kind: MessageKind) -> list[Envelope]:
        """Hand over the queued envelopes of ``kind`` from ``sender`` to ``recipient``."""
        return self._queues.pop((recipient, sender, kind), [])

    def take_all(self, recipient: str) -> list[Envelope]:
        """Hand over every envelope queued for ``recipient`` (each sender's and kind's in arrival order)."""
        keys = [key for key in self._queues if key[0] == recipient]
        return [envelope for key in keys for envelope in self._queues.pop(key)]

    @property
    def records(self) -> tuple[RelayRecord, ...]:
        """Every envelope seen, in order."""
        return tuple(self._records)

    def bytes_sent(self) -> int:
        """Total envelope bytes relayed."""
        return sum(r.size for r in self._records)

    def transcript(self) -> bytes:
        """Every byte the relay held (needs ``keep_transcript=True``)."""
        if self._transcript is None:
            raise ValueError("this relay keeps no transcript (Relay(keep_transcript=True))")
        return bytes(self._transcript)


class StepTransport:
    """One party's side of one step of a deployment: the envelopes the coordinator forwarded to it, and
    those it posts (returned to the coordinator in its reply)."""

    def __init__(self, inbound: list[Envelope]) -> None:
        self._inbound = Relay()
        for envelope in inbound:
            self._inbound.post(envelope)
        self.outbound: list[Envelope] = []

    def post(self, envelope: Envelope) -> None:
        """Keep ``envelope`` for the reply."""
        self.outbound.append(envelope)

    def take(self, recipient: str, sender: str, kind: MessageKind) -> list[Envelope]:
        """The forwarded envelopes of ``kind`` from ``sender`` to ``recipient``."""
        return self._inbound.take(recipient, sender, kind)


def send_values(
    transport: Transport,
    values: Values,
    *,
    run: str,
    sender: PartyKeys,
    recipient: PartyPublicKeys,
    kind: MessageKind,
    batch_size: int = DEFAULT_BATCH,
) -> int:
    """Send ``values`` (rows of 32 bytes) as sealed chunks of ``batch_size``; returns the bytes sent."""
    starts = range(0, max(len(values), 1), batch_size)
    sent = 0
    for chunk, start in enumerate(starts):
        envelope = seal(
            values[start : start + batch_size].tobytes(),
            run=run,
            sender=sender,
            recipient=recipient,
            kind=kind,
            chunk=chunk,
            chunks=len(starts),
            rows=len(values),
        )
        transport.post(envelope)
        sent += envelope.size
    return sent


def receive_values(
    transport: Transport,
    *,
    run: str,
    recipient: PartyKeys,
    sender: PartyPublicKeys,
    kind: MessageKind,
    max_rows: int | None = None,
) -> Values:
    """Collect, check and decrypt one message of 32-byte values sent with ``send_values``.

    ``max_rows``: refuse a message whose header states more values, before decrypting any of it.

    Raises
    ------
    MessageRejectedError
        If a chunk fails authentication, or chunks are missing, repeated or out of order.
    ProtocolError
        If the values do not add up to the row count the sender signed, or exceed ``max_rows``.
    """
    envelopes = transport.take(recipient.name, sender.name, kind)
    if not envelopes:
        raise MessageRejectedError(f"no {kind} message from {sender.name!r} to {recipient.name!r}")
    first = envelopes[0]
    if max_rows is not None and first.rows > max_rows:
        raise ProtocolError(f"{sender.name} sent {first.rows} rows, more than the {max_rows} allowed; not answered")
    layout = [(e.chunk, e.chunks, e.rows) for e in envelopes]
    if layout != [(i, first.chunks, first.rows) for i in range(first.chunks)]:
        raise MessageRejectedError(
            f"{kind} from {sender.name!r}: chunks missing, repeated or out of order ({len(envelopes)} received)"
        )
    parts = [open_envelope(e, recipient=recipient, sender=sender, run=run, kind=kind) for e in envelopes]
    values = as_values(b"".join(parts))
    if len(values) != first.rows:
        raise ProtocolError(f"{kind} from {sender.name!r}: {len(values)} values, the header says {first.rows}")
    return values


def send_text(
    transport: Transport, text: str, *, run: str, sender: PartyKeys, recipient: PartyPublicKeys, kind: MessageKind
) -> None:
    """Send a short text (one sealed chunk)."""
    transport.post(seal(text.encode(), run=run, sender=sender, recipient=recipient, kind=kind))


def receive_text(
    transport: Transport, *, run: str, recipient: PartyKeys, sender: PartyPublicKeys, kind: MessageKind
) -> str:
    """Receive a text sent with ``send_text``.

    Raises
    ------
    MessageRejectedError
        If it is missing, not one chunk, or fails authentication.
    """
    envelopes = transport.take(recipient.name, sender.name, kind)
    if len(envelopes) != 1 or envelopes[0].chunks != 1:
        raise MessageRejectedError(f"expected one {kind} envelope from {sender.name!r}, got {len(envelopes)}")
    return open_envelope(envelopes[0], recipient=recipient, sender=sender, run=run, kind=kind).decode()


def directory(*parties: PartyPublicKeys) -> Mapping[str, PartyPublicKeys]:
    """A name-to-keys directory of ``parties``."""
    return {p.name: p for p in parties}
