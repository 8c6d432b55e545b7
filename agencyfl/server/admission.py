"""Who may use a scoring thread, for how long: authentication and admission before any handler runs.

A gRPC Python server runs every call on a worker thread, and a unary call takes its thread *before*
its request message has arrived: a caller that sends headers and never the body holds a thread for
as long as it likes. So the interceptor here, which runs on the server's polling thread from the
call's headers alone,

1. authenticates the bearer token (scoring methods; health checks are public) and refuses an
   unknown, expired or revoked token with UNAUTHENTICATED without reading the request; the health
   check is answered at once with the server's overall status, without waiting for its request;
2. admits the call only if its holder has fewer than ``Limits.calls_per_token`` calls in flight and
   the server fewer than ``Limits.scoring_calls`` (``public_calls`` for health checks); otherwise
   RESOURCE_EXHAUSTED, at once. The worker pool has exactly ``scoring_calls + public_calls`` threads,
   so an admitted call never waits for a thread and one holder can never take them all;
3. reads every request message under a deadline (``read_timeout``: a slow or idle sender, or an idle
   stream, is cancelled) and bounds every call's duration (``call_timeout``), with one watchdog
   thread that cancels expired calls (``ServicerContext.cancel``).

Connections that never start a call are closed by gRPC core options (``server_options``).
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from agencyfl.federation.errors import AgencyflError
from agencyfl.server.tokens import TokenStore, token_hash

log = logging.getLogger("agencyfl.scoring")

__all__ = ["ANONYMOUS", "Admission", "Holder", "Limits", "Watchdog", "current_holder"]

PUBLIC_PREFIX = "/grpc.health.v1.Health/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class Limits:
    """The service's resource limits (defaults sized for a 2-core host).

    Parameters
    ----------
    calls_per_token
        Calls one token holder may have in flight (2: one scoring while the next batch is encrypted).
    scoring_calls
        Authenticated calls in flight, all holders together.
    public_calls
        Health checks in flight.
    read_timeout
        Seconds to receive each request message; a stream idle this long is cancelled.
    call_timeout
        Seconds any call may run in all.
    contexts_per_token
        Public contexts one holder may keep registered (its oldest is dropped beyond this).
    context_budget_bytes
        Serialized bytes of all registered contexts together; beyond it RegisterContext answers
        RESOURCE_EXHAUSTED (a deserialized context takes about as much memory as its bytes).
    idle_connection
        Seconds after which a connection without calls is closed.
    """

    calls_per_token: int = 2
    scoring_calls: int = 8
    public_calls: int = 4
    read_timeout: float = 10.0
    call_timeout: float = 120.0
    contexts_per_token: int = 4
    context_budget_bytes: int = 1 << 31
    idle_connection: float = 60.0

    @property
    def workers(self) -> int:
        """Worker threads: one per admitted call."""
        return self.scoring_calls + self.public_calls

    def server_options(self) -> list[tuple[str, int]]:
        """gRPC core options that bound connections (not calls)."""
        return [
            ("grpc.max_connection_idle_ms", int(self.idle_connection * 1000)),
            ("grpc.server_handshake_timeout_ms", int(self.read_timeout * 1000)),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]


@dataclass(frozen=True)
class Holder:
    """Who is calling: ``key`` namespaces their contexts and counts their calls."""

    key: str
    requester: str
    purposes: tuple[str, ...] | None  # None: any purpose (``--insecure-no-auth``)


ANONYMOUS = Holder("anonymous", "anonymous", None)
_CURRENT: contextvars.ContextVar[Holder] = contextvars.ContextVar("agencyfl_scoring_holder")


def current_holder() -> Holder:
    """The holder of the call being served (set by ``Admission`` before the handler runs)."""
    return _CURRENT.get()


class Watchdog:
    """One thread that cancels calls whose deadline passed (``arm`` / ``disarm``)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, grpc.ServicerContext]] = []
        self._live: set[int] = set()
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="agencyfl-scoring-watchdog", daemon=True)
        self._thread.start()

    def arm(self, context: grpc.ServicerContext, seconds: float) -> int:
        """Cancel ``context`` in ``seconds`` unless disarmed; returns the handle."""
        with self._cond:
            seq = next(self._seq)
            self._live.add(seq)
            heapq.heappush(self._heap, (time.monotonic() + seconds, seq, context))
            self._cond.notify()
        return seq

    def disarm(self, seq: int) -> None:
        """Forget ``seq`` (idempotent)."""
        with self._cond:
            self._live.discard(seq)

    def stop(self) -> None:
        """End the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            expired: list[grpc.ServicerContext] = []
            with self._cond:
                while not self._stopped:
                    while self._heap and self._heap[0][1] not in self._live:
                        heapq.heappop(self._heap)
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        _, seq, context = heapq.heappop(self._heap)
                        self._live.discard(seq)
                        expired.append(context)
                        continue
                    if expired:
                        break
                    self._cond.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._stopped:
                    return
            for context in expired:
                self.cancelled += 1
                context.cancel()


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` without reading the request (so it holds no thread waiting)."""

    def refuse(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        context.abort(code, details)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)


def _instant(handler: grpc.RpcMethodHandler, answer: Callable[[grpc.ServicerContext], Any]) -> grpc.RpcMethodHandler:
    """A handler that replies at once, without waiting for the request (which it does not need)."""

    def reply(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return answer(context)

    return grpc.stream_unary_rpc_method_handler(reply, handler.request_deserializer, handler.response_serializer)


class Admission(grpc.ServerInterceptor):  # type: ignore[misc]
    """Authenticate, admit and time-bound every call (see the module docstring).

    Parameters
    ----------
    tokens
        The token registry; None admits everyone as one anonymous holder (``--insecure-no-auth``).
    limits
        Concurrency and time limits.
    instant
        Unary methods answered at once without reading their request, by method name (the health
        check: its reply is the server's overall status, so a caller that never sends the request
        holds no thread and the check can never be starved).
    """

    def __init__(
        self,
        tokens: TokenStore | None,
        limits: Limits,
        instant: dict[str, Callable[[grpc.ServicerContext], Any]] | None = None,
    ) -> None:
        self.tokens = tokens
        self.limits = limits
        self.instant = instant or {}
        self.watchdog = Watchdog()
        self._lock = threading.Lock()
        self._per_holder: dict[str, int] = {}
        self._scoring = 0
        self._public = 0
        self.refused: dict[str, int] = {"unauthenticated": 0, "busy": 0}

    def _authenticate(self, metadata: Any) -> Holder | None:
        if self.tokens is None:
            return ANONYMOUS
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = str(value)
        if not header.startswith("Bearer "):
            return None
        try:
            record = self.tokens.lookup(header[7:])
        except AgencyflError as exc:  # a damaged registry fails closed: nobody is admitted
            log.error("token registry unreadable, refusing every token: %s", exc)
            return None
        if record is None:
            return None
        return Holder(token_hash(header[7:]), record.requester, record.purposes)

    def _admit(self, holder: Holder | None) -> Callable[[], None] | None:
        with self._lock:
            if holder is None:
                if self._public >= self.limits.public_calls:
                    return None
                self._public += 1
            else:
                cap = self.limits.scoring_calls if holder is ANONYMOUS else self.limits.calls_per_token
                held = self._per_holder.get(holder.key, 0)
                if held >= cap or self._scoring >= self.limits.scoring_calls:
                    return None
                self._per_holder[holder.key] = held + 1
                self._scoring += 1
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if done.is_set():
                    return
                done.set()
                if holder is None:
                    self._public -= 1
                else:
                    self._scoring -= 1
                    left = self._per_holder[holder.key] - 1
                    if left:
                        self._per_holder[holder.key] = left
                    else:
                        del self._per_holder[holder.key]

        return release

    def in_flight(self) -> dict[str, int]:
        """Calls in flight now: scoring, public (for tests and operators)."""
        with self._lock:
            return {"scoring": self._scoring, "public": self._public}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        answer = self.instant.get(str(handler_call_details.method))
        if answer is not None:
            return _instant(handler, answer)
        public = str(handler_call_details.method).startswith(PUBLIC_PREFIX)
        holder = None if public else self._authenticate(handler_call_details.invocation_metadata)
        if not public and holder is None:
            with self._lock:
                self.refused["unauthenticated"] += 1
            return _refusal(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid bearer token issued by the coordinator is required (unknown, expired or revoked)",
            )
        release = self._admit(holder)
        if release is None:
            with self._lock:
                self.refused["busy"] += 1
            return _refusal(
                handler,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many calls in flight (for this token or for the server); retry shortly",
            )
        return self._guarded(handler, holder or ANONYMOUS, release)

    def _guarded(
        self, handler: grpc.RpcMethodHandler, holder: Holder, release: Callable[[], None]
    ) -> grpc.RpcMethodHandler:
        """The handler, reading its requests as a stream under deadlines (never blocking a thread unbounded)."""
        limits, dog = self.limits, self.watchdog

        def start(context: grpc.ServicerContext) -> None:
            if not context.add_callback(release):
                release()
            whole = dog.arm(context, limits.call_timeout)
            context.add_callback(lambda: dog.disarm(whole))
            _CURRENT.set(holder)

        def read(iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            idle = dog.arm(context, limits.read_timeout)
            try:
                return next(iterator)
            finally:
                dog.disarm(idle)

        def requests(iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            while True:
                try:
                    item = read(iterator, context)
                except StopIteration:
                    return
                yield item

        def single(iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            try:
                return read(iterator, context)
            except StopIteration:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this method takes exactly one request message")

        if handler.request_streaming and handler.response_streaming:
            inner = handler.stream_stream

            def stream_stream(iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                start(context)
                return inner(requests(iterator, context), context)

            behaviour, streams_out = stream_stream, True
        elif handler.request_streaming:
            inner = handler.stream_unary

            def stream_unary(iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                start(context)
                return inner(requests(iterator, context), context)

            behaviour, streams_out = stream_unary, False
        elif handler.response_streaming:
            inner = handler.unary_stream

            def unary_stream(iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                start(context)
                return inner(single(iterator, context), context)

            behaviour, streams_out = unary_stream, True
        else:
            inner = handler.unary_unary

            def unary_unary(iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                start(context)
                return inner(single(iterator, context), context)

            behaviour, streams_out = unary_unary, False
        make = grpc.stream_stream_rpc_method_handler if streams_out else grpc.stream_unary_rpc_method_handler
        return make(behaviour, handler.request_deserializer, handler.response_serializer)

    def close(self) -> None:
        """Stop the watchdog."""
        self.watchdog.stop()
