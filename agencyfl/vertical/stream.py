"""One long-lived, authenticated gRPC stream per agency for the iterations of a deployed vertical job.

A Flower message costs seconds here; an iteration needs about six exchanges. So Flower only starts
and ends the job, and each agency dials the coordinator's ``StreamHub`` once (TLS, the federation's
CA) and answers the coordinator's frames on that stream until the job ends (``docs/vertical.md``, "In a
deployment"). The hub drives: it sends a frame to a party and waits for that party's reply.

A frame is a small JSON header (the operation and its fields) followed by binary blobs (ciphertexts,
sealed envelopes): ``encode`` / ``decode``. The stream's method takes and returns raw bytes, so no
generated code is needed.
"""

from __future__ import annotations

import json
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from agencyfl.alignment.sealed import PartyPublicKeys, certified_peers
from agencyfl.federation.errors import AgencyflError, DeploymentError, MessageRejectedError, ProtocolError, error_class

METHOD = "/agencyfl.VerticalJob/Party"
MAX_MESSAGE = 512 * 1024 * 1024  # a million households' partial scores are about 80 MB of ciphertexts
MAX_HEADER = 1 << 20
HELLO_TIMEOUT = 10.0  # an unauthenticated stream is closed if its hello does not arrive in this time
SPARE_STREAMS = 16
"""Streams beyond one per party that may wait for their hello at once: a stranger that opens idle streams
(no client certificates: anyone who reaches the port can) must hold all of them, renewed every
``HELLO_TIMEOUT``, to keep an agency out."""
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),  # a host that vanished is noticed within about 20 s
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_SERVER_OPTIONS = [*_OPTIONS, ("grpc.http2.min_ping_interval_without_data_ms", 5_000)]


class PartyDropped(DeploymentError):
    """A party's stream closed, or it did not answer in time: the job stops (exit 10)."""


@dataclass
class Frame:
    """One message on a stream: an operation, JSON fields and binary blobs."""

    op: str
    fields: dict[str, Any] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of the blobs (what the bytes-per-iteration figures count)."""
        return sum(len(b) for b in self.blobs)


def encode(frame: Frame) -> bytes:
    """The frame as bytes: header length, JSON header (op, fields, blob sizes), the blobs."""
    header = json.dumps(
        {"op": frame.op, "fields": frame.fields, "sizes": [len(b) for b in frame.blobs]}, separators=(",", ":")
    ).encode()
    return struct.pack(">I", len(header)) + header + b"".join(frame.blobs)


def decode(data: bytes) -> Frame:
    """Read a frame; MessageRejectedError if the bytes are not one."""
    try:
        (size,) = struct.unpack(">I", data[:4])
        if size > MAX_HEADER or 4 + size > len(data):
            raise ValueError("header size")
        header = json.loads(data[4 : 4 + size])
        if not isinstance(header, dict):
            raise ValueError("header")
        op, fields, sizes = header["op"], header["fields"], header["sizes"]
        if not isinstance(op, str) or not isinstance(fields, dict) or not isinstance(sizes, list):
            raise ValueError("header types")
        if not all(isinstance(s, int) and s >= 0 for s in sizes) or 4 + size + sum(sizes) != len(data):
            raise ValueError("blob sizes")
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise MessageRejectedError(f"a malformed stream frame ({exc})") from None
    blobs, offset = [], 4 + size
    for s in sizes:
        blobs.append(data[offset : offset + s])
        offset += s
    return Frame(op, fields, blobs)


def failure(exc: BaseException) -> Frame:
    """A party's one-line failure (its error class names the exit code at the coordinator)."""
    if isinstance(exc, AgencyflError):
        return Frame("failed", {"error": type(exc).__name__, "reason": str(exc)})
    return Frame("failed", {"error": "ProtocolError", "reason": f"an unexpected {type(exc).__name__}"})


@dataclass
class _Channel:
    party: str
    hello: Frame
    outbox: queue.Queue[Frame | None] = field(default_factory=queue.Queue)
    inbox: queue.Queue[Frame | None] = field(default_factory=queue.Queue)
    closed: bool = False


Authenticate = Callable[[Frame], str]
"""Checks a hello frame and returns the party it authenticates; raises MessageRejectedError otherwise."""


class StreamHub:
    """The coordinator's end: accepts each party's stream once it authenticates, then drives it.

    Parameters
    ----------
    address
        ``host:port`` to listen on.
    certificate, private_key
        The coordinator's TLS server certificate chain and key (PEM; the federation CA issued them).
    authenticate
        Checks a hello; called on the stream's thread.
    parties
        Who may connect (at most one stream each).
    """

    def __init__(
        self, address: str, certificate: bytes, private_key: bytes, authenticate: Authenticate, parties: list[str]
    ) -> None:
        self.parties = list(parties)
        self._authenticate = authenticate
        self._channels: dict[str, _Channel] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.refusals: list[str] = []  # why each refused stream was refused (for the run summary)
        self.early_failure: Callable[[], None] | None = None  # raises if a party already said it cannot take part
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=len(parties) + SPARE_STREAMS),
            options=_SERVER_OPTIONS,
            maximum_concurrent_rpcs=len(parties) + SPARE_STREAMS,
        )
        handler = grpc.stream_stream_rpc_method_handler(self._handle)
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("agencyfl.VerticalJob", {"Party": handler})]
        )
        credentials = grpc.ssl_server_credentials([(private_key, certificate)])
        self.port = self._server.add_secure_port(address, credentials)
        if self.port == 0:
            raise DeploymentError(f"cannot listen on {address} for the agencies' streams (port in use?)")
        self._server.start()

    def _handle(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        hello_box: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=lambda: hello_box.put(next(requests, None)), daemon=True).start()
        try:
            raw = hello_box.get(timeout=HELLO_TIMEOUT)
            if raw is None:
                return
            hello = decode(raw)
            if hello.op != "hello":
                raise MessageRejectedError(f"a stream must begin with hello, not {hello.op[:40]!r}")
            party = self._authenticate(hello)
        except queue.Empty:
            return
        except AgencyflError as exc:
            self.refusals.append(str(exc))
            yield encode(Frame("refused", {"reason": str(exc)}))
            return
        channel = _Channel(party, hello)
        with self._changed:
            if party in self._channels:
                reason = f"{party} already has a stream in this job"
                self.refusals.append(reason)
                refused = True
            else:
                self._channels[party] = channel
                self._changed.notify_all()
                refused = False
        if refused:
            yield encode(Frame("refused", {"reason": reason}))
            return

        def closed() -> None:
            channel.closed = True
            channel.inbox.put(None)

        context.add_callback(closed)
        while (frame := channel.outbox.get()) is not None:
            yield encode(frame)
            try:
                reply = next(requests, None)
            except grpc.RpcError:
                reply = None
            if reply is None:
                channel.inbox.put(None)
                return
            try:
                channel.inbox.put(decode(reply))
            except MessageRejectedError as exc:
                channel.inbox.put(Frame("failed", {"error": "MessageRejectedError", "reason": str(exc)}))

    def wait_for_all(self, timeout: float) -> dict[str, Frame]:
        """Every party's hello, once each has an authenticated stream; PartyDropped naming the absent.

        While waiting, ``early_failure`` (if set) is called about once a second: a party that refused the job
        or failed before dialling (its Flower reply says so) stops the wait with its own error.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._changed:
                if self._changed.wait_for(lambda: len(self._channels) == len(self.parties), timeout=1.0):
                    break
            if self.early_failure is not None:
                self.early_failure()
        with self._changed:
            absent = [p for p in self.parties if p not in self._channels]
            if absent:
                why = f" (refused: {'; '.join(self.refusals[-3:])})" if self.refusals else ""
                raise PartyDropped(f"no authenticated stream from {', '.join(absent)} within {timeout:.0f} s{why}")
            return {p: c.hello for p, c in self._channels.items()}

    def call(self, party: str, frame: Frame, timeout: float) -> Frame:
        """Send ``frame`` to ``party`` and return its reply.

        Raises
        ------
        PartyDropped
            If the party's stream is closed or it does not answer within ``timeout``.
        AgencyflError
            The party's own refusal or failure (its class), e.g. LedgerError, BudgetExceededError.
        """
        channel = self._channels.get(party)
        if channel is None or channel.closed:
            raise PartyDropped(f"{party} has no open stream (step {frame.op!r})")
        channel.outbox.put(frame)
        try:
            reply = channel.inbox.get(timeout=timeout)
        except queue.Empty:
            raise PartyDropped(f"{party} did not answer {frame.op!r} within {timeout:.0f} s") from None
        if reply is None:
            raise PartyDropped(f"{party}'s stream closed during step {frame.op!r}")
        if reply.op in ("failed", "refused"):
            verb = "refused" if reply.op == "refused" else "failed at"
            kind = error_class(str(reply.fields.get("error", "")))
            raise kind(f"{party} {verb} step {frame.op!r}: {str(reply.fields.get('reason', ''))[:500]}")
        return reply

    def call_all(self, frames: dict[str, Frame], timeout: float) -> dict[str, Frame]:
        """``call`` every party at once (each on its own thread); raises the first error, after all answered."""
        results: dict[str, Frame] = {}
        problems: list[BaseException] = []

        def one(party: str, frame: Frame) -> None:
            try:
                results[party] = self.call(party, frame, timeout)
            except BaseException as exc:  # noqa: BLE001  # re-raised below, after every party answered
                problems.append(exc)

        threads = [threading.Thread(target=one, args=item, daemon=True) for item in frames.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if problems:
            dropped = [p for p in problems if isinstance(p, PartyDropped)]
            raise (dropped or problems)[0]
        return results

    def end(self, frame: Frame) -> None:
        """Send every open stream its last frame (``end`` or ``abort``) and close it; never raises."""
        for channel in list(self._channels.values()):
            if not channel.closed:
                channel.outbox.put(frame)
                channel.outbox.put(None)

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening; streams still open are cancelled after ``grace`` seconds."""
        for channel in list(self._channels.values()):
            channel.outbox.put(None)
        self._server.stop(grace).wait()


Handler = Callable[[Frame], Frame]


def int_field(frame: Frame, name: str, low: int = 0, high: int | None = None) -> int:
    """A frame's integer field, within [low, high] (MessageRejectedError otherwise, never a traceback)."""
    value = frame.fields.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise MessageRejectedError(f"a {frame.op[:40]!r} frame whose {name!r} is not an integer in range")
    return value


def str_field(frame: Frame, name: str) -> str:
    """A frame's string field (MessageRejectedError when it is missing or not a string)."""
    value = frame.fields.get(name)
    if not isinstance(value, str):
        raise MessageRejectedError(f"a {frame.op[:40]!r} frame without a string {name!r}")
    return value


def list_field(frame: Frame, name: str, kind: type) -> list[Any]:
    """A frame's list field whose items are all ``kind`` (MessageRejectedError otherwise)."""
    value = frame.fields.get(name)
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise MessageRejectedError(f"a {frame.op[:40]!r} frame whose {name!r} is not a list of {kind.__name__}")
    return value


def peer_directory(
    frame: Frame, run: str, agency: str, peers: list[str], peer_keys: dict[str, Any], purpose: str
) -> dict[str, PartyPublicKeys]:
    """The run keys of ``peers`` from a ``setup`` frame (a name list ``certificates``, then one certificate
    blob each after ``blobs[0]``), each verified with the ledger key its steward was handed
    (``certified_peers``; MessageRejectedError otherwise)."""
    names = list_field(frame, "certificates", str)
    if len(frame.blobs) != len(names) + 1:
        raise MessageRejectedError("a malformed setup frame")
    certificates = dict(zip(names, frame.blobs[1:], strict=True))
    return certified_peers(run, agency, peers, certificates, peer_keys, purpose)


_OP = re.compile(r"[a-z]+(?:-[a-z]+)*")


def dispatch(party: object, agency: str, frame: Frame) -> Frame:
    """Answer ``frame`` with ``party``'s ``_op_<op>`` method (dashes as underscores): how a party's session
    serves the coordinator's frames; MessageRejectedError for an operation its role does not take, and
    ProtocolError for a second one of those its ``once_only`` names."""
    # one spelling per operation: "screen_scores" must not reach the handler of a spent "screen-scores"
    handler = getattr(party, "_op_" + frame.op.replace("-", "_"), None) if _OP.fullmatch(frame.op) else None
    if handler is None:
        raise MessageRejectedError(f"{agency} does not take {frame.op[:40]!r} frames")
    if frame.op in getattr(party, "once_only", ()):  # marked before it runs: a failed step is not retried either
        done: set[str] = party.__dict__.setdefault("_ops_answered", set())
        if frame.op in done:
            raise ProtocolError(f"{agency} answers {frame.op!r} once per job: asked again")
        done.add(frame.op)
    reply: Frame = handler(frame)
    return reply


def serve_party(
    address: str, root_certificate: bytes, hello: Frame, handle: Handler, connect_timeout: float = 60.0
) -> Frame:
    """The agency's end: dial ``address`` (TLS, the coordinator checked with ``root_certificate``), send
    ``hello``, answer each frame with ``handle`` until the coordinator ends the job; returns that last frame.

    Raises
    ------
    MessageRejectedError
        If the coordinator refused the hello.
    PartyDropped
        If the stream broke before the job ended.
    """
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificate)
    with grpc.secure_channel(address, credentials, options=_OPTIONS) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            reason = f"cannot reach the coordinator's stream at {address} within {connect_timeout:.0f} s"
            raise PartyDropped(reason) from None
        outbox: queue.Queue[bytes | None] = queue.Queue()
        outbox.put(encode(hello))
        call = channel.stream_stream(METHOD)(iter(outbox.get, None))
        try:
            for raw in call:
                frame = decode(raw)
                if frame.op == "refused":
                    raise MessageRejectedError(f"the coordinator refused the stream: {frame.fields.get('reason', '')}")
                if frame.op in ("end", "abort"):
                    return frame
                try:
                    reply = handle(frame)
                except Exception as exc:  # noqa: BLE001  # a one-line failure to the coordinator, never a traceback
                    reply = failure(exc)
                outbox.put(encode(reply))
        except grpc.RpcError as exc:
            raise PartyDropped(f"the stream to the coordinator broke: {exc.code().name}") from None
        finally:
            outbox.put(None)
    raise PartyDropped("the coordinator closed the stream before the job ended")
