"""The parties of a screening, each with only its own data and keys (``docs/screening.md``).

``Requester`` (civil affairs: the screening's CKKS secret key, its register and enrolment),
``Contributor`` (an agency: its block and its part of the model, R's public context only) and
``Relay`` (the coordinator: adds ciphertexts it cannot open). Reasons travel sealed (HPKE, signed)
between an agency that chose to disclose them and the requester. Every party keeps a record of what
reached it (``Received``, as in vertical training), for the tests to check what crossed in clear.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import tenseal as ts
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from agencyfl.alignment.sealed import Envelope, PartyKeys, PartyPublicKeys, open_envelope, seal
from agencyfl.federation.errors import HEError, MessageRejectedError, ScreeningRefusedError
from agencyfl.federation.spec import SchemaSection
from agencyfl.privacy.he import fingerprint, load_public_context, new_private_context, parameter_set, public_bytes
from agencyfl.vertical.encoding import NOT_HELD, Block
from agencyfl.vertical.optim import clip_scores
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

    def __init__(self, agency: str, size: int, weights: Vector, score_clip: float | None) -> None:
        """The key pair and the request need only the register's size; its own block comes with ``hold`` (on
        one machine the agencies encrypt while civil affairs still reads and validates its register)."""
        super().__init__(agency)
        self.size = size
        self.weights = weights
        self.score_clip = score_clip  # the model's (its manifest's): each part is clipped by its holder
        self.params = parameter_set(PARAMETERS)
        self._context = new_private_context(self.params)
        self._public = public_bytes(self._context)
        self._block: Block | None = None

    def hold(self, block: Block) -> None:
        """Its own block, which its part of every score needs.

        Raises
        ------
        HEError
            If the block is another party's, of another register size, or its weights do not fit it.
        """
        if block.agency != self.name or block.size != self.size:
            raise HEError(f"{self.name}: a block of {block.agency} for {block.size} households, not its {self.size}")
        if self.weights.shape != (block.width + 1,):
            raise HEError(f"{block.agency}: {len(self.weights)} weights for {block.width} inputs and the intercept")
        self._block = block

    @property
    def block(self) -> Block:
        """Its own block (``hold``)."""
        if self._block is None:
            raise HEError(f"{self.name} has not read its own block yet")
        return self._block

    def request(self, screening: str, federation: str, model_version: str, purpose: str) -> ScreeningRequest:
        """The public request every agency receives (the public context, its fingerprint, the register's size)."""
        request = ScreeningRequest(
            screening, federation, model_version, purpose, self.name, self.size, self._public,
            fingerprint(self._public),
        )  # fmt: skip
        self.sent_bytes += len(self._public)
        return request

    def own_logits(self) -> Vector:
        """Its own part, X_R w_R + b, in clear (its own data)."""
        return self._own_part(self.weights)

    def _own_part(self, weights: Vector) -> Vector:
        u = self.block.scores(weights[:-1]) + weights[-1]
        return np.asarray(clip_scores(u, self.score_clip)[0], dtype=np.float64)

    def logits(self, summed: list[bytes]) -> Vector:
        """z = sum_k u_k + X_R w_R + b at every register position, from the relay's summed ciphertexts."""
        n = self.size
        if len(summed) != math.ceil(n / self.params.slots):
            raise HEError(f"{len(summed)} summed ciphertexts for a register of {n}")
        self.received.append(
            Received("coordinator", "summed-scores", "score-ciphertexts", len(summed), sum(map(len, summed)), 0)
        )
        return self._decrypt([ts.ckks_vector_from(self._context, raw) for raw in summed])

    def logits_of(self, request: ScreeningRequest, parts: list[PartialScores], own: Vector | None = None) -> Vector:
        """The same from each agency's own partial scores, added here (a deployment: see ``Relay``); ``own``:
        another part of its own (an earlier model's) in place of this screening's."""
        if request.public_context != self._public:
            raise HEError("the request is not this requester's")
        for part in parts:
            self.received.append(
                Received(part.sender, "partial-scores", "score-ciphertexts", len(part.ciphertexts), part.nbytes, 0)
            )
        start = time.perf_counter()
        summed = sum_partials(request, parts)
        for c in summed:
            c.link_context(self._context)  # the same key: its secret half, to decrypt
        self.he_seconds += time.perf_counter() - start
        return self._decrypt(summed, own)

    def _decrypt(self, summed: list[ts.CKKSVector], own: Vector | None = None) -> Vector:
        start = time.perf_counter()
        values = np.concatenate([np.asarray(c.decrypt()) for c in summed])
        self.he_seconds += time.perf_counter() - start
        weights = self.weights if own is None else own
        mine = self._own_part(weights)
        return np.asarray(values[: self.size] + mine, dtype=np.float64)


class Contributor(_Party):
    """An agency: its block (not-held input included) and its own part of the model; R's public context only."""

    def __init__(self, block: Block, weights: Vector, score_clip: float | None, keys: PartyKeys | None = None) -> None:
        super().__init__(block.agency)
        if weights.shape != (block.width,):
            raise HEError(f"{block.agency}: {len(weights)} weights for {block.width} inputs")
        self.block = block
        self.weights = weights
        self.score_clip = score_clip  # the model's: its own part clipped, as in training
        self.keys = keys

    def partial_scores(self, request: ScreeningRequest, mask: Vector | None = None) -> PartialScores:
        """Enc(X_k w_k) at every register position, under the requester's public key (plus ``mask``, this
        agency's share of masks that cancel over all agencies: ``zero_sum_mask``).

        Raises
        ------
        HEError
            If the context is not a public one on the whitelist, or the register's size differs from its own.
        """
        if request.register_size != self.block.size:
            raise HEError(
                f"{self.name}: the request names a register of {request.register_size}, its alignment {self.block.size}"
            )
        context, params = load_public_context(request.public_context, max_depth_needed=0)
        if fingerprint(request.public_context) != request.context_fingerprint:
            raise HEError(f"{self.name}: the public context does not match its fingerprint")
        self.received.append(
            Received(request.requester, "context", "public-context", 1, len(request.public_context), 0)
        )
        start = time.perf_counter()
        u = clip_scores(self.block.scores(self.weights), self.score_clip)[0]
        if mask is not None:
            u = u + mask[: len(u)]
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
        inputs = dict(zip(positions, self.block.inputs_at(positions), strict=True))
        for p in positions:
            if not self.block.held[p]:
                out[p] = f"{self.name}: no record of this household (its 'not held' term {self.weights[-1]:+.2f})"
                continue
            parts = inputs[p] * self.weights
            if level == "agency":
                contribution = float(clip_scores(np.array([parts.sum()]), self.score_clip)[0][0])
                out[p] = f"{self.name}: contribution {contribution:+.2f} to the score (log-odds)"
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


def sum_partials(request: ScreeningRequest, parts: list[PartialScores]) -> list[ts.CKKSVector]:
    """The slot-wise sum of every agency's Enc(u_k) under the request's public context.

    Raises
    ------
    HEError
        A part under another key, of another size, or a context that is not public.
    """
    context, params = load_public_context(request.public_context, max_depth_needed=0)
    chunks = math.ceil(request.register_size / params.slots)
    total: list[ts.CKKSVector] | None = None
    for part in parts:
        if part.context_fingerprint != request.context_fingerprint:
            raise HEError(f"{part.sender}'s partial scores are under another key than the requester's")
        if part.count != request.register_size or len(part.ciphertexts) != chunks:
            raise HEError(f"{part.sender} sent {part.count} scores; the register holds {request.register_size}")
        cts = [ts.ckks_vector_from(context, raw) for raw in part.ciphertexts]
        total = cts if total is None else [a + b for a, b in zip(total, cts, strict=True)]
    if total is None:
        raise HEError("no agency's partial scores to sum")
    return total


class Relay(_Party):
    """The coordinator on one machine: checks and adds the agencies' ciphertexts; holds no secret key.

    (In a deployment the coordinator only relays each agency's signed partial scores and civil affairs
    adds them itself, so that a coordinator cannot substitute a sum of its own: ``docs/screening.md``.)
    """

    def __init__(self) -> None:
        super().__init__("coordinator")

    def sum(self, request: ScreeningRequest, parts: list[PartialScores]) -> list[bytes]:
        """The slot-wise sum of every agency's Enc(u_k), for the requester only (``sum_partials``)."""
        start = time.perf_counter()
        for part in parts:
            self.received.append(
                Received(part.sender, "partial-scores", "score-ciphertexts", len(part.ciphertexts), part.nbytes, 0)
            )
        out = [bytes(c.serialize()) for c in sum_partials(request, parts)]
        self.he_seconds += time.perf_counter() - start
        self.sent_bytes += sum(map(len, out))
        return out


# ------------------------------------------------------------------ a deployment: masks and signed statements
MASK_BOUND = 2.0**20
"""Each pair's mask is uniform on [-MASK_BOUND, MASK_BOUND): far above any partial score (|u| < 50), within
the 2^23 that ``n4096-d0``'s scale leaves."""
MAX_MASKED_PEERS = 7
"""An agency's share sums one stream per other agency: at most 7 x 2^20 < 2^23, the scale's headroom."""
_MASK_DOMAIN = b"agencyfl screening zero-sum mask v1\n"


def _keystream_uniform(seed: bytes, size: int) -> Vector:
    """``size`` values uniform on [-MASK_BOUND, MASK_BOUND) from ChaCha20 keyed by ``seed`` (a real PRF:
    the requester sees masked values and must not predict the stream)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(b"\0" * (8 * size)), dtype="<u8")
    return np.asarray((words >> np.uint64(11)) * 2.0**-53 * 2 * MASK_BOUND - MASK_BOUND, dtype=np.float64)


def zero_sum_mask(keys: PartyKeys, agencies: dict[str, PartyPublicKeys], screening: str, size: int) -> Vector:
    """This agency's share of masks that sum to zero over ``agencies`` (every agency with a part but the
    requester): for each other agency, a stream keyed by the pair's X25519 secret for this screening,
    added by the pair's first name and subtracted by the second. The requester, who holds the CKKS key
    and receives each agency's ciphertexts, decrypts only their sum: each part alone is masked. ``screening``
    may carry a suffix ("ID/previous"): each scoring pass of a screening has its own masks."""
    if len(agencies) - 1 > MAX_MASKED_PEERS:
        raise HEError(f"{len(agencies)} agencies: the masks of more than {MAX_MASKED_PEERS + 1} overflow n4096-d0")
    mask = np.zeros(size, dtype=np.float64)
    for name in sorted(agencies):
        if name == keys.name:
            continue
        first, second = sorted((keys.name, name))
        info = _MASK_DOMAIN + json.dumps([screening, first, second]).encode()
        draw = _keystream_uniform(keys.agree(agencies[name], info), size)
        mask += draw if keys.name == first else -draw
    return mask


_CONTEXT_DOMAIN = b"agencyfl screening context v1\n"
_PARTIAL_DOMAIN = b"agencyfl screening partial scores v1\n"


def context_statement(screening: str, requester: str, register_size: int, context_fingerprint: str) -> bytes:
    """What civil affairs signs with its certified run key so that agencies encrypt only under its key."""
    body = {"screening": screening, "requester": requester, "register_size": register_size,
            "fingerprint": context_fingerprint}  # fmt: skip
    return _CONTEXT_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def partial_statement(screening: str, part: PartialScores) -> bytes:
    """What an agency signs over its partial scores, so that civil affairs adds only what each agency sent."""
    digests = [hashlib.sha256(c).hexdigest() for c in part.ciphertexts]
    body = {"screening": screening, "sender": part.sender, "fingerprint": part.context_fingerprint,
            "count": part.count, "ciphertexts": digests}  # fmt: skip
    return _PARTIAL_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def verify_statement(signer: PartyPublicKeys, signature: bytes, statement: bytes, what: str) -> None:
    """Check ``signature`` by ``signer``'s certified run key (MessageRejectedError if it does not verify)."""
    try:
        Ed25519PublicKey.from_public_bytes(signer.signing).verify(signature, statement)
    except (InvalidSignature, ValueError):
        raise MessageRejectedError(f"{what}: not signed by {signer.name}'s key for this screening") from None


REASON_BYTES = 384
"""A reason's UTF-8 bytes at most (longer ones are cut at a character): every reasons message then has the
same length for a given agency, whatever the number of listed households (``seal_reasons``)."""
_REASON_ROW = struct.Struct("<IH")  # register position, reason length
REFUSED = 0xFFFFFFFF  # the one row of a refusal, in place of a register position


def seal_positions(
    sender: PartyKeys, recipient: PartyPublicKeys, screening: str, positions: list[int], size: int
) -> Envelope:
    """The requester's list of worklist positions for one agency's reasons, sealed to that agency.

    The list travels as a bitmap of the whole register, and the header says nothing of its length, so
    the coordinator relaying it learns nothing of how many households are listed.
    """
    bits = np.zeros(size, dtype=np.uint8)
    bits[np.asarray(positions, dtype=np.int64)] = 1
    payload = np.packbits(bits).tobytes()
    return seal(payload, run=screening, sender=sender, recipient=recipient, kind="explain-request",
                chunk=0, chunks=1, rows=0)  # fmt: skip


def open_positions(
    envelope: Envelope, recipient: PartyKeys, sender: PartyPublicKeys, screening: str, size: int
) -> list[int]:
    """An agency opens the requester's list and checks it: a bitmap of exactly its register.

    Raises
    ------
    ScreeningRefusedError
        If the list is malformed.
    """
    raw = open_envelope(envelope, recipient=recipient, sender=sender, run=screening, kind="explain-request")
    if len(raw) != (size + 7) // 8:
        raise ScreeningRefusedError(f"{recipient.name}: the list of positions is not a bitmap of its register")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
    if bits[size:].any():
        raise ScreeningRefusedError(f"{recipient.name}: the list of positions names positions outside its register")
    return [int(p) for p in np.flatnonzero(bits[:size])]


def reasons_capacity(explain_max: float, size: int) -> int:
    """How many reasons an agency's message holds: its ``explain_max`` share of the register."""
    return int(explain_max * size)


def seal_reasons(
    sender: PartyKeys, recipient: PartyPublicKeys, screening: str, reasons: dict[int, str], capacity: int,
    refusal: str | None = None,
) -> Envelope:  # fmt: skip
    """An agency's reasons (or its ``refusal``), sealed to the requester, padded to ``capacity`` rows of
    ``REASON_BYTES``.

    Every answer of an agency then has one length per register, refusal or not, so the coordinator
    relaying it can neither count the listed households nor tell a refusal (which would say the list was
    longer than ``explain_max``).
    """
    if len(reasons) > capacity:
        raise ScreeningRefusedError(f"{sender.name}: {len(reasons)} reasons exceed its {capacity}")
    if refusal is not None:
        reasons = {REFUSED: refusal}
    rows = []
    for position, text in reasons.items():
        raw = text.encode()[:REASON_BYTES].decode(errors="ignore").encode()  # cut at a character
        rows.append(_REASON_ROW.pack(position, len(raw)) + raw.ljust(REASON_BYTES, b"\0"))
    payload = struct.pack("<I", len(reasons)) + b"".join(rows)
    payload = payload.ljust(4 + max(capacity, 1) * (_REASON_ROW.size + REASON_BYTES), b"\0")
    return seal(payload, run=screening, sender=sender, recipient=recipient, kind="explanations",
                chunk=0, chunks=1, rows=0)  # fmt: skip


def open_reasons(envelope: Envelope, recipient: PartyKeys, sender: PartyPublicKeys, screening: str) -> dict[int, str]:
    """The requester opens an agency's reasons.

    Raises
    ------
    MessageRejectedError
        If the message is malformed.
    ScreeningRefusedError
        If the agency refused (its reason, as recorded in its ledger).
    """
    raw = open_envelope(envelope, recipient=recipient, sender=sender, run=screening, kind="explanations")
    width = _REASON_ROW.size + REASON_BYTES
    if len(raw) < 4:
        raise MessageRejectedError(f"reasons from {sender.name}: a malformed message")
    (count,) = struct.unpack_from("<I", raw)
    if 4 + count * width > len(raw):
        raise MessageRejectedError(f"reasons from {sender.name}: {count} rows do not fit the message")
    out: dict[int, str] = {}
    for i in range(count):
        position, length = _REASON_ROW.unpack_from(raw, 4 + i * width)
        start = 4 + i * width + _REASON_ROW.size
        if length > REASON_BYTES:
            raise MessageRejectedError(f"reasons from {sender.name}: a malformed row")
        out[int(position)] = raw[start : start + length].decode(errors="replace")
    if REFUSED in out:
        raise ScreeningRefusedError(out[REFUSED])
    return out
