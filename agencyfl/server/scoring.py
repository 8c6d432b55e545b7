"""The encrypted scoring service: a gRPC server that scores CKKS ciphertexts with a registered model.

It holds public contexts only, so it can neither read a household's features nor its score. Every
refusal maps to a precise gRPC status; features, scores and ciphertexts are never logged. Who may
call, how many calls at once and for how long is decided before a handler runs (``server.admission``);
registered contexts belong to the token that registered them, within a per-token quota and a server
memory budget.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
import tenseal as ts
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from torch import nn

from agencyfl.federation.decision import DecisionRule
from agencyfl.federation.errors import HEError, ModelError
from agencyfl.federation.model import Square
from agencyfl.federation.proto import scoring_pb2, scoring_pb2_grpc
from agencyfl.privacy.he import (
    PARAMETER_SETS,
    PlainModel,
    evaluate_columns,
    evaluate_row,
    load_public_context,
)
from agencyfl.server.admission import HEALTH_CHECK, Admission, Holder, Limits, current_holder
from agencyfl.server.registry import RegisteredModel
from agencyfl.server.tokens import TokenStore

__all__ = ["ContextStore", "Limits", "ScoringService", "TokenStore", "he_model", "start_server"]

log = logging.getLogger("agencyfl.scoring")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A deserialized context takes about twice its serialized bytes (measured: an 18.6 MB context with
# Galois keys adds 40 MB of resident memory); the budget charges three times, to stay on the safe side.
MEMORY_PER_BYTE = 3


def he_model(registered: RegisteredModel) -> PlainModel:
    """The registered model as plain weights, if CKKS can evaluate it (logistic, or MLP with square)."""
    linears = [m for m in registered.model if isinstance(m, nn.Linear)]
    others = [m for m in registered.model if not isinstance(m, nn.Linear)]
    if len(linears) > 2 or any(not isinstance(m, Square) for m in others):
        raise ModelError(
            "only logistic models and one-hidden-layer MLPs with activation 'square' can be served encrypted"
        )
    return PlainModel(
        tuple(
            (m.weight.detach().numpy().astype(np.float64), m.bias.detach().numpy().astype(np.float64)) for m in linears
        )
    )


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: grpc aborts by raising")


def key_fingerprint(ctx: ts.Context) -> str:
    """What a registered context is known by: SHA-256 of its parsed public key and which keys it holds.

    Computed from the parsed context, not the bytes received, so bytes that differ without changing
    the key (an appended unknown protobuf field, another compression) name the same context.
    """
    public = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    flags = f"|galois={ctx.has_galois_keys()}|relin={ctx.has_relin_keys()}".encode()
    return hashlib.sha256(bytes(public) + flags).hexdigest()


class BudgetExceeded(Exception):
    """The server's context memory budget is spent."""


class ContextStore:
    """Registered public contexts, per holder: a quota each and one memory budget for the server.

    A holder sees only the contexts it registered (a fingerprint of another holder's is unknown to
    it); beyond ``per_holder`` its own least recently used context is dropped, never another's; a new
    context that would take the server past ``budget_bytes`` is refused.
    """

    def __init__(self, per_holder: int, budget_bytes: int) -> None:
        self.per_holder = per_holder
        self.budget_bytes = budget_bytes
        self._by_holder: dict[str, OrderedDict[str, tuple[ts.Context, int]]] = {}
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        """Memory charged to registered contexts."""
        with self._lock:
            return self._used

    def count(self, holder: str | None = None) -> int:
        """Contexts registered (by ``holder``, or by everyone)."""
        with self._lock:
            if holder is not None:
                return len(self._by_holder.get(holder, {}))
            return sum(len(v) for v in self._by_holder.values())

    def put(self, holder: str, key: str, ctx: ts.Context, cost: int) -> None:
        """Register ``ctx`` under ``key`` for ``holder``; re-registering the same key costs nothing.

        Raises
        ------
        BudgetExceeded
            The server's budget cannot take ``cost`` more bytes.
        """
        with self._lock:
            mine = self._by_holder.setdefault(holder, OrderedDict())
            if key in mine:
                mine.move_to_end(key)
                return
            if self._used + cost > self.budget_bytes:
                # The holder's own oldest contexts make room first; never another holder's.
                while mine and len(mine) >= self.per_holder:
                    self._used -= mine.popitem(last=False)[1][1]
                if self._used + cost > self.budget_bytes:
                    if not mine:
                        del self._by_holder[holder]
                    raise BudgetExceeded
            mine[key] = (ctx, cost)
            self._used += cost
            while len(mine) > self.per_holder:
                self._used -= mine.popitem(last=False)[1][1]

    def get(self, holder: str, key: str) -> ts.Context | None:
        """``holder``'s context called ``key``, or None."""
        with self._lock:
            mine = self._by_holder.get(holder)
            entry = mine.get(key) if mine is not None else None
            return entry[0] if entry else None


class ScoringService(scoring_pb2_grpc.ScoringServicer):
    """Scores column-packed ciphertexts; see the proto for the API.

    Authentication and admission happen before these handlers run (``server.admission.Admission``);
    the handlers read the caller from ``current_holder()``.
    """

    def __init__(self, model_dir: Path, limits: Limits | None = None) -> None:
        self.registered = RegisteredModel(model_dir)
        self.model = he_model(self.registered)
        self.limits = limits or Limits()
        self.purpose = self.registered.card.purpose
        self.version = self.registered.card.model_version
        self.inputs = self.registered.encoder.names
        self.sets = [p for p in PARAMETER_SETS if p.depth >= self.model.depth]
        self.contexts = ContextStore(self.limits.contexts_per_token, self.limits.context_budget_bytes)
        # What a requester needs, no more: the schema to encode with and the decision rule (not the
        # spec, which names the agencies and where their data lives).
        self.schema_json = self.registered.spec.schema_.model_dump_json()
        self.decision_json = DecisionRule.for_model(
            self.registered.spec, self.registered.card.mitigation
        ).model_dump_json()

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (gRPC names)
        return scoring_pb2.ModelInfo(
            model_version=self.version,
            purpose=self.purpose,
            kind=self.registered.spec.model.kind,
            inputs=self.inputs,
            max_batch=min(p.slots for p in self.sets),
            schema_json=self.schema_json,
            decision_json=self.decision_json,
            contributions=len(self.model.layers) == 1,
            parameter_sets=[
                scoring_pb2.HEParameters(
                    poly_modulus_degree=p.poly_modulus_degree,
                    coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
                    global_scale_bits=p.scale_bits,
                )
                for p in self.sets
            ],
        )

    def RegisterContext(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        holder = current_holder()
        try:
            ctx, _ = load_public_context(request.public_context, self.model.depth)
        except HEError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        key = key_fingerprint(ctx)
        try:
            self.contexts.put(holder.key, key, ctx, MEMORY_PER_BYTE * len(request.public_context))
        except BudgetExceeded:
            log.warning("context budget spent: refused a context of %s", holder.requester)
            _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the server's memory budget for contexts is spent; retry later or use a context without Galois keys",
            )
        return scoring_pb2.RegisterContextReply(key_fingerprint=key)

    def _check_purpose(self, holder: Holder, purpose: str, context: grpc.ServicerContext) -> None:
        if holder.purposes is not None and purpose not in holder.purposes:
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token was issued for {list(holder.purposes)!r}, not for purpose {purpose!r}",
            )
        if purpose != self.purpose:
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"purpose {purpose!r} is not this model's registered purpose {self.purpose!r}",
            )

    def _score(self, request: Any, context: grpc.ServicerContext) -> Any:
        holder = current_holder()
        self._check_purpose(holder, request.purpose, context)
        ctx = self.contexts.get(holder.key, request.key_fingerprint)
        if ctx is None:
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"unknown key fingerprint {request.key_fingerprint[:16]!r}: register the context first",
            )
        if request.row_packed:
            if request.count != 1 or len(request.feature_columns) != 1:
                _abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "row_packed requests carry one household in one ciphertext",
                )
            try:
                result = evaluate_row(ctx, self.model, request.feature_columns[0])
            except HEError as exc:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except (ValueError, RuntimeError, TypeError):
                _abort(
                    context, grpc.StatusCode.INVALID_ARGUMENT, "the ciphertext cannot be evaluated under this context"
                )
            return scoring_pb2.ScoreReply(logits=bytes(result.serialize()), count=1, model_version=self.version)
        if len(request.feature_columns) != len(self.inputs):
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"expected {len(self.inputs)} feature ciphertexts, got {len(request.feature_columns)}",
            )
        slots = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2
        if not 0 < request.count <= slots:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"count must be 1..{slots} (got {request.count})")
        try:
            result = evaluate_columns(ctx, self.model, list(request.feature_columns))
            contributions = []
            if request.want_contributions and len(self.model.layers) == 1:
                w = self.model.layers[0][0][0]
                contributions = [
                    bytes((ts.ckks_vector_from(ctx, c) * float(w[j])).serialize())
                    for j, c in enumerate(request.feature_columns)
                ]
        except HEError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (ValueError, RuntimeError, TypeError):
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the ciphertexts cannot be evaluated under this context")
        return scoring_pb2.ScoreReply(
            logits=bytes(result.serialize()),
            count=request.count,
            model_version=self.version,
            contributions=contributions,
        )

    def ScoreBatch(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._score(request, context)

    def ScoreStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        for request in request_iterator:
            yield self._score(request, context)


def start_server(
    model_dir: Path,
    port: int,
    tokens: TokenStore | None,
    host: str = "127.0.0.1",
    tls: tuple[bytes, bytes, bytes | None] | None = None,
    limits: Limits | None = None,
) -> tuple[grpc.Server, int]:
    """Start the service (with standard gRPC health checking); returns the server and its bound port.

    ``tokens`` None admits every caller as one anonymous holder (tests only). ``tls`` is
    ``(certificate chain, private key, client CA or None)``; with a client CA the server requires
    client certificates (mutual TLS). ``limits`` bounds concurrency, time and context memory.
    """
    limits = limits or Limits()
    service = ScoringService(model_dir, limits)
    health_servicer = health.HealthServicer()

    def overall_health(context: grpc.ServicerContext) -> Any:
        # The overall status ("" service): every service here shares it, and the request is not needed.
        return health_servicer.Check(health_pb2.HealthCheckRequest(service=""), context)

    admission = Admission(tokens, limits, instant={HEALTH_CHECK: overall_health})
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *limits.server_options(),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="agencyfl-scoring"),
        interceptors=[admission],
        options=options,
        # A backstop only: admission refuses first. Refusals take a thread for microseconds.
        maximum_concurrent_rpcs=4 * limits.workers,
    )
    scoring_pb2_grpc.add_ScoringServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    if tls:
        creds = grpc.ssl_server_credentials(
            [(tls[1], tls[0])], root_certificates=tls[2], require_client_auth=tls[2] is not None
        )
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("agencyfl.scoring.v1.Scoring", health_pb2.HealthCheckResponse.SERVING)
    # For operators and tests: the service (its contexts) and the admission counters.
    server.agencyfl_service = service
    server.agencyfl_admission = admission
    return server, bound
