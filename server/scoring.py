"""The encrypted scoring service: a gRPC server that scores CKKS ciphertexts with a registered model.

It holds public contexts only, so it can neither read a household's features nor its score. Every
refusal maps to a precise gRPC status; features, scores and ciphertexts are never logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
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

from federation.errors import ModelError
from federation.model import Square
from federation.proto import scoring_pb2, scoring_pb2_grpc
from privacy.he import (
    PARAMETER_SETS,
    HEError,
    PlainModel,
    evaluate_columns,
    evaluate_row,
    fingerprint,
    load_public_context,
)
from server.registry import SPEC_FILE, RegisteredModel

log = logging.getLogger("agencyfl.scoring")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_CONTEXTS = 32


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


class TokenStore:
    """Bearer tokens the coordinator issued: a JSON file of ``{sha256(token): requester}``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = -1
        self._hashes: dict[str, str] = {}
        self._reload()

    def _reload(self) -> None:
        # Tokens issued while the server runs take effect at once: re-read when the file changes.
        mtime = self.path.stat().st_mtime_ns if self.path.exists() else 0
        if mtime != self._mtime:
            self._hashes = json.loads(self.path.read_text()) if self.path.exists() else {}
            self._mtime = mtime

    def issue(self, requester: str) -> str:
        """Create a token for ``requester``; only its hash is stored. Returns the token (shown once)."""
        self._reload()
        token = secrets.token_urlsafe(32)
        self._hashes[hashlib.sha256(token.encode()).hexdigest()] = requester
        self.path.write_text(json.dumps(self._hashes, indent=2))
        self.path.chmod(0o600)
        return token

    def requester(self, token: str) -> str | None:
        """Who holds ``token``, or None."""
        self._reload()
        return self._hashes.get(hashlib.sha256(token.encode()).hexdigest())


class ScoringService(scoring_pb2_grpc.ScoringServicer):
    """Scores column-packed ciphertexts; see the proto for the API."""

    def __init__(self, model_dir: Path, tokens: TokenStore | None) -> None:
        self.registered = RegisteredModel(model_dir)
        self.model = he_model(self.registered)
        self.tokens = tokens
        self.purpose = str(self.registered.card.get("purpose", ""))
        self.version = str(self.registered.card.get("model_version", ""))
        self.spec_toml = (Path(model_dir) / SPEC_FILE).read_text()
        self.inputs = self.registered.encoder.names
        self.sets = [p for p in PARAMETER_SETS if p.depth >= self.model.depth]
        self._contexts: OrderedDict[str, ts.Context] = OrderedDict()
        self._lock = threading.Lock()

    def _auth(self, context: grpc.ServicerContext) -> None:
        if self.tokens is None:
            return
        meta = dict(context.invocation_metadata())
        header = str(meta.get("authorization", ""))
        if not header.startswith("Bearer ") or self.tokens.requester(header[7:]) is None:
            _abort(
                context, grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token issued by the coordinator is required"
            )

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (gRPC names)
        self._auth(context)
        return scoring_pb2.ModelInfo(
            model_version=self.version,
            purpose=self.purpose,
            kind=self.registered.spec.model.kind,
            inputs=self.inputs,
            max_batch=min(p.slots for p in self.sets),
            spec_toml=self.spec_toml,
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
        self._auth(context)
        try:
            ctx, _ = load_public_context(request.public_context, self.model.depth)
        except HEError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        key = fingerprint(request.public_context)
        with self._lock:
            self._contexts[key] = ctx
            self._contexts.move_to_end(key)
            while len(self._contexts) > MAX_CONTEXTS:
                self._contexts.popitem(last=False)
        return scoring_pb2.RegisterContextReply(key_fingerprint=key)

    def _score(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.purpose != self.purpose:
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"purpose {request.purpose!r} is not this model's registered purpose {self.purpose!r}",
            )
        with self._lock:
            ctx = self._contexts.get(request.key_fingerprint)
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
        self._auth(context)
        return self._score(request, context)

    def ScoreStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        self._auth(context)
        for request in request_iterator:
            yield self._score(request, context)


def start_server(
    model_dir: Path,
    port: int,
    tokens: TokenStore | None,
    host: str = "127.0.0.1",
    tls: tuple[bytes, bytes, bytes | None] | None = None,
    workers: int = 4,
) -> tuple[grpc.Server, int]:
    """Start the service (with standard gRPC health checking); returns the server and its bound port.

    ``tls`` is ``(certificate chain, private key, client CA or None)``; with a client CA the server
    requires client certificates (mutual TLS).
    """
    service = ScoringService(model_dir, tokens)
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    scoring_pb2_grpc.add_ScoringServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
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
    return server, bound
