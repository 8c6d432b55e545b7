"""The requester's side of encrypted scoring: encrypt households, send ciphertexts, decrypt locally.

The secret key never leaves this process; the server receives the public context and ciphertexts
only. The sigmoid, the threshold, the review band and the reasons are all computed here, after
decryption, and no decrypted value is ever sent back (CKKS decryptions would leak the secret key).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import tenseal as ts

from federation.encoding import FeatureEncoder
from federation.errors import AgencyflError
from federation.proto import scoring_pb2, scoring_pb2_grpc
from federation.reasons import top_reasons
from federation.spec import parse_spec
from federation.table import load_table
from privacy.he import decrypt_vector, encrypt_columns, new_private_context, parameter_set, public_bytes

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ScoringError(AgencyflError):
    """The scoring server refused a request or could not be reached."""


@dataclass(frozen=True)
class ScoreSettings:
    """How decisions are made from scores (all applied locally)."""

    threshold: float = 0.5
    review_band: float = 0.1  # scores within threshold +- band are flagged for a person to review
    reasons: int = 3
    purpose: str = "eligibility-identification"


class ScoringClient:
    """A connection to a scoring server with a fresh CKKS key pair whose secret key stays here."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        root_cert: bytes | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
        low_latency: bool = False,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if root_cert is not None:
            creds = grpc.ssl_channel_credentials(root_cert, *(client_cert or (None, None))[::-1])
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = scoring_pb2_grpc.ScoringStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.info = self._call(self.stub.GetModelInfo, scoring_pb2.ModelInfoRequest())
        self.spec = parse_spec(self.info.spec_toml, source=f"{address} model info")
        self.encoder = FeatureEncoder(self.spec.schema)
        if self.encoder.names != list(self.info.inputs):
            raise ScoringError("the server's model inputs do not match its own spec")
        chosen = next(
            p
            for p in (parameter_set(n) for n in ("n8192-d1", "n8192-d3", "n16384-d3"))
            if any(
                s.poly_modulus_degree == p.poly_modulus_degree
                and list(s.coeff_mod_bit_sizes) == list(p.coeff_mod_bit_sizes)
                for s in self.info.parameter_sets
            )
        )
        self.params = chosen
        self.context = new_private_context(chosen, relin_keys=chosen.depth > 1)
        # Galois keys (about 19 MB, sent once) let single households be scored in one ciphertext.
        self.row_packing = low_latency and self.info.kind == "logistic"
        if self.row_packing:
            self.context.generate_galois_keys()
        reply = self._call(
            self.stub.RegisterContext, scoring_pb2.RegisterContextRequest(public_context=public_bytes(self.context))
        )
        self.key_fingerprint = reply.key_fingerprint

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=120)
        except grpc.RpcError as exc:
            raise ScoringError(f"scoring server: {exc.code().name}: {exc.details()}") from None

    def score_encoded(
        self, x: np.ndarray, want_contributions: bool, purpose: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (and per-input contributions) for encoded rows, in batches of the slot count.

        Pipelined: while the server evaluates batch k (a gRPC call waiting in a helper thread, which
        releases the GIL), this thread encrypts batch k+1. Encryption stays in this process: TenSEAL
        encrypts with the secret key (symmetric, ~10x cheaper than public-key encryption), and the
        secret key is not handed to any other process.
        """
        if self.row_packing and len(x) == 1 and not want_contributions:
            return self._score_row(x[0], purpose), None
        step = int(self.info.max_batch)
        blocks = [x[start : start + step] for start in range(0, len(x), step)]
        logits: list[np.ndarray] = []
        contributions: list[np.ndarray] = []

        def send(block: np.ndarray, columns: list[bytes]) -> Any:
            request = scoring_pb2.ScoreRequest(
                purpose=purpose,
                key_fingerprint=self.key_fingerprint,
                count=len(block),
                feature_columns=columns,
                want_contributions=want_contributions,
            )
            return self._call(self.stub.ScoreBatch, request)

        def collect(block: np.ndarray, reply: Any) -> None:
            logits.append(decrypt_vector(self.context, reply.logits, len(block)))
            if reply.contributions:
                contributions.append(
                    np.stack([decrypt_vector(self.context, c, len(block)) for c in reply.contributions], 1)
                )

        with ThreadPoolExecutor(max_workers=1) as rpc:
            in_flight: tuple[np.ndarray, Future[Any]] | None = None
            for block in blocks:
                columns = encrypt_columns(self.context, block)
                if in_flight is not None:
                    collect(in_flight[0], in_flight[1].result())
                in_flight = (block, rpc.submit(send, block, columns))
            if in_flight is not None:
                collect(in_flight[0], in_flight[1].result())
        return np.concatenate(logits), (np.concatenate(contributions) if contributions else None)

    def _score_row(self, row: np.ndarray, purpose: str) -> np.ndarray:
        ciphertext = bytes(ts.ckks_vector(self.context, row.astype(np.float64).tolist()).serialize())
        reply = self._call(
            self.stub.ScoreBatch,
            scoring_pb2.ScoreRequest(
                purpose=purpose,
                key_fingerprint=self.key_fingerprint,
                count=1,
                feature_columns=[ciphertext],
                row_packed=True,
            ),
        )
        return decrypt_vector(self.context, reply.logits, 1)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()


def score_file(
    client: ScoringClient,
    data: Path,
    out: Path,
    settings: ScoreSettings,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Score every valid row of ``data`` and write decisions to ``out`` (CSV); bad rows are quarantined."""
    check = load_table(data, client.spec.schema, require_label=False)
    x = client.encoder.encode(check.valid)
    want = bool(client.info.contributions)
    step = int(client.info.max_batch)
    logits_parts, contrib_parts = [], []
    for start in range(0, len(x), step):
        lg, ct = client.score_encoded(x[start : start + step], want, settings.purpose)
        logits_parts.append(lg)
        if ct is not None:
            contrib_parts.append(ct)
        if on_progress:
            on_progress(min(start + step, len(x)), len(x))
    logits = np.concatenate(logits_parts) if logits_parts else np.zeros(0)
    score = 1.0 / (1.0 + np.exp(-logits))
    eligible = score >= settings.threshold
    result = pd.DataFrame(
        {
            client.spec.schema.id: check.valid[client.spec.schema.id],
            "decision": np.where(eligible, "eligible", "not eligible"),
            "score": np.round(score, 6),
            "review": np.abs(score - settings.threshold) <= settings.review_band,
        }
    )
    if contrib_parts:
        labels = {f.name: client.spec.schema.plain_label(f.name) for f in client.spec.schema.features}
        contrib = np.concatenate(contrib_parts)
        result["reasons"] = top_reasons(contrib, eligible, client.encoder, labels, settings.reasons)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(out, index=False)
    return {
        "data": str(data),
        "out": str(out),
        "rows": check.total,
        "scored": len(result),
        "quarantined": len(check.quarantined),
        "eligible": int(eligible.sum()),
        "review": int(result["review"].sum()),
        "model_version": client.info.model_version,
        "parameter_set": client.params.name,
    }
