"""The parties of a screening, each with only its own data and keys (``docs/screening.md``).

``Requester`` (civil affairs: the screening's CKKS secret key, its register and enrolment),
``Contributor`` (an agency: its block and its part of the model, R's public context only) and
``Relay`` (the coordinator: adds ciphertexts it cannot open). Reasons travel sealed (HPKE, signed)
between an agency that chose to disclose them and the requester. Every party keeps a record of what
reached it (``Received``, as in vertical training), for the tests to check what crossed in clear.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import tenseal as ts

from agencyfl.alignment.sealed import Envelope, PartyKeys, PartyPublicKeys, open_envelope, seal
from agencyfl.federation.errors import HEError, ScreeningRefusedError
from agencyfl.federation.spec import SchemaSection
from agencyfl.privacy.he import fingerprint, load_public_context, new_private_context, parameter_set, public_bytes
from agencyfl.vertical.encoding import NOT_HELD, Block
from agencyfl.vertical.protocol import Received

PARAMETERS = "n4096-d0"
"""Only additions of fresh ciphertexts: no level, no evaluation keys."""
TOP_FEATURES = 3
Vector = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ScreeningRequest:
    """What the requester sends every agency through the coordinator: public facts and a public key."""

    screening: str
    federation: str
    model_version: str
    purpose: str
    requester: str
    register_size: int
    public_context: bytes
    context_fingerprint: str


@dataclass(frozen=True)
class PartialScores:
    """An agency's Enc(u_k) over every register position, under the requester's key."""

    sender: str
    context_fingerprint: str
    count: int
    ciphertexts: list[bytes]

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        return sum(len(c) for c in self.ciphertexts)


def _chunks(v: Vector, slots: int) -> list[list[float]]:
    padded = np.zeros(max(1, math.ceil(len(v) / slots)) * slots)
    padded[: len(v)] = v
    return [padded[i : i + slots].tolist() for i in range(0, len(padded), slots)]


@dataclass
class _Party:
    name: str
    received: list[Received] = field(default_factory=list)
    sent_bytes: int = 0
    he_seconds: float = 0.0


class Requester(_Party):
    """Civil affairs: draws the screening's key pair, adds its own part, decrypts the scores it asked for.

    The secret key lives only in this object's memory: never written, never sent.
    """

    def __init__(self, block: Block, weights: Vector) -> None:
        super().__init__(block.agency)
        if weights.shape != (block.width + 1,):
            raise HEError(f"{block.agency}: {len(weights)} weights for {block.width} inputs and the intercept")
        self.block = block
        self.weights = weights
        self.params = parameter_set(PARAMETERS)
        self._context = new_private_context(self.params)
        self._public = public_bytes(self._context)

    def request(self, screening: str, federation: str, model_version: str, purpose: str) -> ScreeningRequest:
        """The public request every agency receives (the public context, its fingerprint, the register's size)."""
        request = ScreeningRequest(
            screening, federation, model_version, purpose, self.name, len(self.block.x), self._public,
            fingerprint(self._public),
        )  # fmt: skip
        self.sent_bytes += len(self._public)
        return request

    def own_logits(self) -> Vector:
        """Its own part, X_R w_R + b, in clear (its own data)."""
        return np.asarray(self.block.x @ self.weights[:-1] + self.weights[-1], dtype=np.float64)

    def logits(self, summed: list[bytes]) -> Vector:
        """z = sum_k u_k + X_R w_R + b at every register position, from the relay's summed ciphertexts."""
        n = len(self.block.x)
        if len(summed) != math.ceil(n / self.params.slots):
            raise HEError(f"{len(summed)} summed ciphertexts for a register of {n}")
        self.received.append(
            Received("coordinator", "summed-scores", "score-ciphertexts", len(summed), sum(map(len, summed)), 0)
        )
        start = time.perf_counter()
        values = np.concatenate([np.asarray(ts.ckks_vector_from(self._context, raw).decrypt()) for raw in summed])
        self.he_seconds += time.perf_counter() - start
        return np.asarray(values[:n] + self.own_logits(), dtype=np.float64)


class Contributor(_Party):
    """An agency: its block (not-held input included) and its own part of the model; R's public context only."""

    def __init__(self, block: Block, weights: Vector, keys: PartyKeys | None = None) -> None:
        super().__init__(block.agency)
        if weights.shape != (block.width,):
            raise HEError(f"{block.agency}: {len(weights)} weights for {block.width} inputs")
        self.block = block
        self.weights = weights
        self.keys = keys

    def partial_scores(self, request: ScreeningRequest) -> PartialScores:
        """Enc(X_k w_k) at every register position, under the requester's public key.

        Raises
        ------
        HEError
            If the context is not a public one on the whitelist, or the register's size differs from its own.
        """
        if request.register_size != len(self.block.x):
            raise HEError(
                f"{self.name}: the request names a register of {request.register_size}, "
                f"its alignment {len(self.block.x)}"
            )
        context, params = load_public_context(request.public_context, max_depth_needed=0)
        if fingerprint(request.public_context) != request.context_fingerprint:
            raise HEError(f"{self.name}: the public context does not match its fingerprint")
        self.received.append(
            Received(request.requester, "context", "public-context", 1, len(request.public_context), 0)
        )
        start = time.perf_counter()
        u = self.block.x @ self.weights
        raw = [bytes(ts.ckks_vector(context, c).serialize()) for c in _chunks(u, params.slots)]
        self.he_seconds += time.perf_counter() - start
        message = PartialScores(self.name, request.context_fingerprint, len(u), raw)
        self.sent_bytes += message.nbytes
        return message

    def reasons(
        self,
        positions: list[int],
        level: str,
        plain_label: Callable[[str], str],
    ) -> dict[int, str]:
        """This agency's reason for each listed position: its contribution, or its top inputs with plain labels."""
        out: dict[int, str] = {}
        names = self.block.names
        for p in positions:
            if not self.block.held[p]:
                out[p] = f"{self.name}: no record of this household (its 'not held' term {self.weights[-1]:+.2f})"
                continue
            parts = self.block.x[p] * self.weights
            if level == "agency":
                out[p] = f"{self.name}: contribution {float(parts.sum()):+.2f} to the score (log-odds)"
                continue
            order = [j for j in np.argsort(-np.abs(parts)) if names[j] != NOT_HELD and parts[j] != 0][:TOP_FEATURES]
            words = [
                f"{_input_label(names[j], plain_label)} {'raises' if parts[j] > 0 else 'lowers'} it ({parts[j]:+.2f})"
                for j in order
            ]
            out[p] = f"{self.name}: " + ("; ".join(words) if words else "its inputs do not move the score")
        return out


def _input_label(name: str, plain_label: Callable[[str], str]) -> str:
    """An encoded input's plain label: ``housing=owned`` -> "housing: owned", ``x=missing`` -> "x not recorded"."""
    base, _, value = name.partition("=")
    label = plain_label(base)
    if value == "missing":
        return f"{label} not recorded"
    return f"{label}: {value}" if value else label


def plain_labeller(schema: SchemaSection) -> Callable[[str], str]:
    """The schema's plain label of a feature name (the name itself when unknown)."""

    def label(name: str) -> str:
        try:
            return schema.plain_label(name)
        except Exception:  # an input not in the schema (the not-held term): its own name
            return name.replace("_", " ")

    return label


class Relay(_Party):
    """The coordinator: checks and adds the agencies' ciphertexts; holds no secret key, opens nothing."""

    def __init__(self) -> None:
        super().__init__("coordinator")

    def sum(self, request: ScreeningRequest, parts: list[PartialScores]) -> list[bytes]:
        """The slot-wise sum of every agency's Enc(u_k), for the requester only.

        Raises
        ------
        HEError
            A part under another key, of another size, or a context that is not public.
        """
        context, params = load_public_context(request.public_context, max_depth_needed=0)
        chunks = math.ceil(request.register_size / params.slots)
        start = time.perf_counter()
        total: list[ts.CKKSVector] | None = None
        for part in parts:
            self.received.append(
                Received(part.sender, "partial-scores", "score-ciphertexts", len(part.ciphertexts), part.nbytes, 0)
            )
            if part.context_fingerprint != request.context_fingerprint:
                raise HEError(f"{part.sender}'s partial scores are under another key than the requester's")
            if part.count != request.register_size or len(part.ciphertexts) != chunks:
                raise HEError(f"{part.sender} sent {part.count} scores; the register holds {request.register_size}")
            cts = [ts.ckks_vector_from(context, raw) for raw in part.ciphertexts]
            total = cts if total is None else [a + b for a, b in zip(total, cts, strict=True)]
        if total is None:
            raise HEError("no agency's partial scores to sum")
        out = [bytes(c.serialize()) for c in total]
        self.he_seconds += time.perf_counter() - start
        self.sent_bytes += sum(map(len, out))
        return out


def seal_positions(sender: PartyKeys, recipient: PartyPublicKeys, screening: str, positions: list[int]) -> Envelope:
    """The requester's list of worklist positions for one agency's reasons, sealed to that agency."""
    payload = json.dumps(positions).encode()
    return seal(payload, run=screening, sender=sender, recipient=recipient, kind="explain-request",
                chunk=0, chunks=1, rows=len(positions))  # fmt: skip


def open_positions(
    envelope: Envelope, recipient: PartyKeys, sender: PartyPublicKeys, screening: str, size: int
) -> list[int]:
    """An agency opens the requester's list and checks it: distinct positions inside the register.

    Raises
    ------
    ScreeningRefusedError
        If the list is malformed.
    """
    raw = open_envelope(envelope, recipient=recipient, sender=sender, run=screening, kind="explain-request")
    positions = json.loads(raw)
    if not isinstance(positions, list) or not all(isinstance(p, int) and 0 <= p < size for p in positions):
        raise ScreeningRefusedError(f"{recipient.name}: the list of positions is malformed")
    if len(set(positions)) != len(positions):
        raise ScreeningRefusedError(f"{recipient.name}: the list of positions repeats a position")
    return [int(p) for p in positions]


def seal_reasons(sender: PartyKeys, recipient: PartyPublicKeys, screening: str, reasons: dict[int, str]) -> Envelope:
    """An agency's reasons, sealed to the requester."""
    payload = json.dumps({str(k): v for k, v in reasons.items()}).encode()
    return seal(payload, run=screening, sender=sender, recipient=recipient, kind="explanations",
                chunk=0, chunks=1, rows=len(reasons))  # fmt: skip


def open_reasons(envelope: Envelope, recipient: PartyKeys, sender: PartyPublicKeys, screening: str) -> dict[int, str]:
    """The requester opens an agency's reasons."""
    raw = open_envelope(envelope, recipient=recipient, sender=sender, run=screening, kind="explanations")
    return {int(k): str(v) for k, v in json.loads(raw).items()}
