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
from pydantic import ValidationError

from agencyfl.federation.decision import DecisionRule
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.errors import DataFileError, ScoringError
from agencyfl.federation.files import write_private_csv
from agencyfl.federation.proto import scoring_pb2, scoring_pb2_grpc
from agencyfl.federation.reasons import top_reasons
from agencyfl.federation.spec import SchemaSection
from agencyfl.federation.table import load_table
from agencyfl.privacy.he import decrypt_vector, encrypt_columns, new_private_context, parameter_set, public_bytes

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ScoreSettings:
    """How decisions are made from scores (all applied locally).

    ``threshold`` None applies the model's own rule (``ModelInfo.decision_json``: the spec's threshold
    and the model card's per-group thresholds); a number replaces the threshold of a model that has no
    per-group thresholds (for one that has, it is refused: it would silently undo the mitigation).
    """

    threshold: float | None = None
    review_band: float = 0.1  # scores within the household's threshold +- band are flagged for review
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
        try:
            self.schema = SchemaSection.model_validate_json(self.info.schema_json)
            self.rule = DecisionRule.model_validate_json(self.info.decision_json)
        except ValidationError as exc:
            raise ScoringError(f"the server at {address} sent model info this requester cannot read ({exc})") from None
        self.encoder = FeatureEncoder(self.schema)
        if self.encoder.names != list(self.info.inputs):
            raise ScoringError("the server's model inputs do not match its own schema")
        offered = {(s.poly_modulus_degree, tuple(s.coeff_mod_bit_sizes)) for s in self.info.parameter_sets}
        known = (parameter_set(n) for n in ("n8192-d1", "n8192-d3", "n16384-d3"))
        chosen = next((p for p in known if (p.poly_modulus_degree, p.coeff_mod_bit_sizes) in offered), None)
        if chosen is None:
            raise ScoringError(
                f"the server at {address} offers no CKKS parameter set this requester knows "
                f"(offered: {sorted(offered)!r})"
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

    def rule_for(self, settings: ScoreSettings) -> DecisionRule:
        """The decision rule ``settings`` ask for: the model's own, or another single threshold.

        Raises
        ------
        ScoringError
            A threshold is given for a model whose card sets per-group thresholds.
        """
        if settings.threshold is None:
            return self.rule
        if self.rule.thresholds:
            raise ScoringError(
                f"this model's card sets per-group thresholds on {self.rule.attribute!r}; a single threshold "
                "would undo that mitigation (leave the threshold out to apply the card's)"
            )
        return self.rule.with_threshold(settings.threshold)

    def score_encoded(
        self,
        x: np.ndarray,
        want_contributions: bool,
        purpose: str,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (and per-input contributions) for encoded rows, in batches of the slot count.

        Pipelined: while the server evaluates batch k (a gRPC call waiting in a helper thread, which
        releases the GIL), this thread encrypts batch k+1 and then decrypts batch k. Encryption stays
        in this process: TenSEAL encrypts with the secret key (symmetric, ~10x cheaper than public-key
        encryption), and the secret key is not handed to any other process. ``on_progress(done,
        total)`` is called as each batch is decrypted.
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

        done = [0]

        def collect(block: np.ndarray, reply: Any) -> None:
            logits.append(decrypt_vector(self.context, reply.logits, len(block)))
            if reply.contributions:
                contributions.append(
                    np.stack([decrypt_vector(self.context, c, len(block)) for c in reply.contributions], 1)
                )
            done[0] += len(block)
            if on_progress:
                on_progress(done[0], len(x))

        with ThreadPoolExecutor(max_workers=1) as rpc:
            in_flight: tuple[np.ndarray, Future[Any]] | None = None
            for block in blocks:
                columns = encrypt_columns(self.context, block)
                if in_flight is not None:
                    collect(in_flight[0], in_flight[1].result())
                in_flight = (block, rpc.submit(send, block, columns))
            if in_flight is not None:
                collect(in_flight[0], in_flight[1].result())
        if not logits:
            return np.zeros(0), None
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
    """Score every valid row of ``data`` and write decisions to ``out`` (CSV, 0600); bad rows are quarantined.

    This is ``agencyfl score``: one pipelined pass over all rows (``ScoringClient.score_encoded``:
    batch k+1 is encrypted while the server evaluates batch k), then the model's decision rule
    (``federation.decision``: the card's per-group thresholds when it has them), applied here.

    Raises
    ------
    ScoringError, DataFileError, HEError
        The server refused, the file is unusable, or a ciphertext could not be made or read.
    """
    rule = client.rule_for(settings)
    check = load_table(data, client.schema, require_label=False)
    x = client.encoder.encode(check.valid)
    want = bool(client.info.contributions)
    logits, contrib = client.score_encoded(x, want, settings.purpose, on_progress)
    score = 1.0 / (1.0 + np.exp(-logits))
    decided = rule.decide(score, check.valid, client.schema, settings.review_band)
    result = pd.DataFrame(
        {
            client.schema.id: check.valid[client.schema.id],
            "decision": np.where(decided.eligible, "eligible", "not eligible"),
            "score": np.round(score, 6),
            "review": decided.review,
        }
    )
    if contrib is not None:
        labels = {f.name: client.schema.plain_label(f.name) for f in client.schema.features}
        result["reasons"] = top_reasons(contrib, decided.eligible, client.encoder, labels, settings.reasons)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataFileError(f"cannot make the folder of {str(out)!r}: {exc.strerror}") from None
    write_private_csv(out, result)
    return {
        "data": str(data),
        "out": str(out),
        "rows": check.total,
        "scored": len(result),
        "quarantined": len(check.quarantined),
        "eligible": int(decided.eligible.sum()),
        "review": int(decided.review.sum()),
        "threshold": rule.threshold,
        "group_thresholds": rule.thresholds or None,
        "model_version": client.info.model_version,
        "parameter_set": client.params.name,
    }
