"""The parties of vertical training, each holding only its own data and keys (``docs/vertical.md``).

``FeatureHolder`` (an agency without the label), ``LabelHolder`` (civil affairs) and ``Arbiter`` (the
coordinator, the CKKS key holder). Agency-to-agency messages are HPKE-sealed and signed
(``alignment.sealed``); what reaches the arbiter are one-value ciphertexts of masked sums. Every party
keeps a record of what it received (``Received``), for the tests to check what crossed in clear.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agencyfl.alignment.sealed import Envelope, MessageKind, PartyKeys, PartyPublicKeys, open_envelope, pack, seal
from agencyfl.federation.errors import HEError, MessageRejectedError
from agencyfl.privacy.he import ParameterSet, load_public_context, new_private_context, parameter_set, public_bytes
from agencyfl.vertical.encoding import CLIP, Block, LabelData
from agencyfl.vertical.evidence import Evidence, ProductKind, Receipts, context_digest
from agencyfl.vertical.optim import (
    BlockOptimizer,
    OptimizerName,
    TailMean,
    Vector,
    clip_scores,
    newton_matrix,
    part_gains,
    project_block,
    triangle_size,
    upper_triangle,
)

PARAMETERS = "n8192-d2"
"""Residual (one level) then the gradient products (one level): depth 2."""
MASK_BOUND = 2.0**16
"""Masks are uniform on [-MASK_BOUND, MASK_BOUND]: within the 2^19 the last prime leaves at scale 2^40."""
ZERO_GUARD = 2.0**-20
"""Put in the reserved slot (``_chunks``) of every per-household plaintext a ciphertext is multiplied by
(``_multiplier``: gradient inputs, the residual's slope, the validation indicator): TenSEAL's product with an
all-zero plaintext comes out at a fresh level, so without it a ciphertext's size would tell that a column
(after the party's clip) was zero in a chunk, or that a chunk holds nobody trained on or held out. Large
enough to survive encoding (times the scale 2^40, spread over 8192 coefficients). Every chunk carries it,
whatever the data, and it multiplies a value (score, residual, Hessian weight) that is 0 there for every
dataset: it adds nothing a household could move."""
ROUNDING = 1e-6
"""Decryptions are rounded to this (about the CKKS error) before they leave the arbiter."""
SCORE_TAG_TOLERANCE = 2e-5
"""How far a validation score's tag may be from its value: the arbiter's rounding and the CKKS error times
(1 + the tag factor) reach about 2.4e-6 (measured, |z| up to 500); eight times that."""

Step = int | str
"""An iteration (``3``), or a sub-step of a sequential sweep (``"3.0"``: the sweep's first partial scores;
``"3.2"``: the second party's step and the partial scores it sends after it)."""

Content = Literal[
    "public-context",
    "sealed-ciphertexts",
    "score-ciphertexts",
    "gradient-ciphertexts",
    "masked-scores",
    "masked-values",
]


@dataclass(frozen=True)
class Received:
    """One message a party received: from whom, what kind, how large, and the most values any ciphertext in it
    carries (``slots``; 0 for plaintext masked values)."""

    sender: str
    kind: str
    content: Content
    count: int
    nbytes: int
    slots: int


@dataclass
class GradientMessage:
    """A party's masked gradient for the arbiter: one one-value ciphertext per weight of its block, and the
    gains of its parts from its own Hessian release (``_Holder.gains``; empty without one), by which the
    arbiter spreads the iteration's noise (``shaped_stds``)."""

    sender: str
    ciphertexts: list[bytes]
    gains: tuple[float, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        return sum(len(c) for c in self.ciphertexts)


@dataclass(frozen=True)
class HolderSetup:
    """What every agency is given to take part: its own keys, the others' public keys, the run, the arbiter's
    public context and the job's public optimizer settings."""

    keys: PartyKeys
    directory: dict[str, PartyPublicKeys]
    run: str
    public_context: bytes
    label_holder: str
    optimizer: OptimizerName = "adam"
    learning_rate: float = 1.0
    weight_bound: float = 5.0
    projection: Literal["joint", "block"] = "joint"
    score_clip: float | None = None
    newton_damping: float = 0.0  # lambda for this party's block (the plan's ``hessian_damping``)
    iterations: int = 1  # T, and how many of the last iterations' weights make the model (``TailMean``)
    averaged: int = 1
    evidence: Path | None = None  # an agency's evidence folder for the job (``Evidence``); None keeps none
    receipts: Path | None = None  # civil affairs' receipts ledger folder for the job (``Receipts``); None: none
    receipts_key: Ed25519PrivateKey | None = None  # civil affairs' ledger key, which signs its receipts
    # each party's run-key certificate, signed by its ledger key (``sealed.certify``): an agency's evidence
    # keeps the label holder's, so a replay can tell whose signature the operands came under
    certificates: dict[str, bytes] = field(default_factory=dict)


HESSIAN_STEP = 0
"""The Hessian release comes before iteration 1: its envelopes are sealed for step 0."""


def step_run(run: str, session: str, step: Step) -> str:
    """What an envelope of ``step`` names as its run: the job's run, the session (the arbiter key's first 16 hex
    digits: another session's envelopes do not open in this one) and the step."""
    return f"{run}/{session}/step-{step}"


@dataclass
class _Party:
    name: str
    keys: PartyKeys
    directory: dict[str, PartyPublicKeys]
    run: str
    session: str  # the arbiter key's first 16 hex digits: a resumed job's envelopes name their session
    received: list[Received] = field(default_factory=list)
    he_seconds: float = 0.0
    sent_bytes: int = 0

    def _step_run(self, step: Step) -> str:
        """The run an envelope of iteration (or sub-step) ``step`` is sealed under: a relay that replays another
        step's partial scores or residuals is refused (the header names the step, and the AEAD binds it)."""
        return step_run(self.run, self.session, step)

    def _seal(self, vectors: list[bytes], recipient: str, kind: MessageKind, rows: int, step: Step) -> list[Envelope]:
        envelopes = [
            seal(v, run=self._step_run(step), sender=self.keys, recipient=self.directory[recipient], kind=kind,
                 chunk=i, chunks=len(vectors), rows=rows)
            for i, v in enumerate(vectors)
        ]  # fmt: skip
        self.sent_bytes += sum(e.size for e in envelopes)
        return envelopes

    def _open(
        self, envelopes: list[Envelope], sender: str, kind: MessageKind, step: Step, rows: int, slots: int
    ) -> list[bytes]:
        """The payloads of one sealed vector of ``rows`` values (one per register position), checked whole and in
        order: a relay that repeated a chunk would count its households twice (more than the sensitivity the
        ledgers record), one that dropped a chunk would leave households out."""
        count = chunk_count(rows, slots)
        if [e.chunk for e in envelopes] != list(range(count)) or any(e.chunks != count or e.rows != rows
                                                                      for e in envelopes):  # fmt: skip
            raise MessageRejectedError(
                f"{kind} from {sender}: {len(envelopes)} chunks out of order, repeated or missing "
                f"({count} of {rows} values expected)"
            )
        payloads = [
            open_envelope(e, recipient=self.keys, sender=self.directory[sender], run=self._step_run(step), kind=kind)
            for e in envelopes
        ]
        self.received.append(
            Received(sender, kind, "sealed-ciphertexts", len(envelopes), sum(e.size for e in envelopes), 0)
        )
        return payloads


def chunk_count(rows: int, slots: int) -> int:
    """Ciphertexts per vector of ``rows`` per-household values: ``slots - 1`` households each (``_chunks``)."""
    return math.ceil(rows / (slots - 1))


def slot_positions(rows: int, slots: int) -> npt.NDArray[np.int64]:
    """Where each of ``rows`` households sits in the concatenated slots of its vector's ciphertexts."""
    i = np.arange(rows, dtype=np.int64)
    return i + i // (slots - 1)


def _chunks(v: Vector, slots: int) -> list[list[float]]:
    """``v`` laid out over whole ciphertexts, ``slots - 1`` households each; each ciphertext's last slot is
    reserved and 0 (so the residual and the Hessian weight there are 0 whatever the data: ``ZERO_GUARD``) and
    the last ciphertext zero-padded, so a rotate-and-sum covers every slot."""
    laid = np.zeros(chunk_count(len(v), slots) * slots)
    laid[slot_positions(len(v), slots)] = v
    return _split(laid, slots)


def _multiplier(v: Vector, slots: int) -> list[list[float]]:
    """A per-household plaintext a ciphertext is multiplied by (``_chunks``), with ``ZERO_GUARD`` in each
    reserved slot: a chunk of zeros (no household trained on, or none held out, in it) would otherwise give
    the product a fresh level, and its size would tell who is trained on. The ciphertexts it multiplies are 0
    in that slot, so the product there is 0 whatever the data."""
    chunks = _chunks(v, slots)
    for chunk in chunks:
        chunk[-1] = ZERO_GUARD
    return chunks


def _split(flat: Vector, slots: int) -> list[list[float]]:
    """A vector already in slot layout (a whole number of ciphertexts), one list per ciphertext."""
    return [flat[i : i + slots].tolist() for i in range(0, len(flat), slots)]


def _dot(encrypted: list[ts.CKKSVector], plain: list[list[float]]) -> ts.CKKSVector:
    """Enc(v * p) summed over the chunks, per slot: the products a rotate-and-sum then totals."""
    acc = encrypted[0] * plain[0]
    for c in range(1, len(encrypted)):
        acc = acc + encrypted[c] * plain[c]
    return acc


def column_multipliers(inputs: npt.NDArray[np.float64], slots: int) -> list[list[list[float]]]:
    """Each input column laid out as the plaintexts a gradient multiplies the residual's chunks by."""
    return [_multiplier(inputs[:, j], slots) for j in range(inputs.shape[1])]


def gradient_sums(encrypted: list[ts.CKKSVector], columns: list[list[list[float]]]) -> list[ts.CKKSVector]:
    """Enc(d * x_j) per slot for every input column (``column_multipliers``), before the rotate-and-sum."""
    return [_dot(encrypted, column) for column in columns]


def masked_totals(sums: list[ts.CKKSVector], mask: Vector, slots: int) -> list[bytes]:
    """Each per-slot sum masked in slot 0, then rotated and summed: every slot then holds the masked total,
    none a per-household value (the masks only add a plaintext: ``docs/vertical.md``, "Accountability")."""
    out: list[bytes] = []
    for s, r in zip(sums, mask, strict=True):
        first = np.zeros(slots)
        first[0] = r
        out.append(bytes((s + first.tolist()).sum().serialize()))
    return out


def pair_products(enc_weights: list[ts.CKKSVector], x: npt.NDArray[np.float64], slots: int) -> list[ts.CKKSVector]:
    """Enc(sum_i w_i x_ij x_il) for every pair j <= l of the inputs ``x``, per slot, before the rotate-and-sum."""
    return [
        _dot(enc_weights, _multiplier(x[:, j] * x[:, k], slots))  # zero chunks guarded
        for j, k in zip(*np.triu_indices(x.shape[1]), strict=True)
    ]


class _Holder(_Party):
    """What every agency does with its own block: partial scores, masked gradients, its own step."""

    def __init__(self, block: Block, setup: HolderSetup, rng: np.random.Generator, extra: int = 0) -> None:
        session = context_digest(setup.public_context)[:16]  # each session's envelopes name their arbiter key
        super().__init__(block.agency, setup.keys, setup.directory, setup.run, session)
        self.block = block
        self.label_holder = setup.label_holder
        public_context = setup.public_context
        self.context, self.params = load_public_context(public_context, max_depth_needed=2)
        if not self.context.has_galois_keys():
            raise HEError("vertical training needs Galois keys in the arbiter's public context (rotate-and-sum)")
        self.received.append(Received("arbiter", "context", "public-context", 1, len(public_context), 0))
        self.slots = self.params.slots
        self.weight_bound = setup.weight_bound
        self.projection = setup.projection
        self.score_clip = setup.score_clip
        self.weights = np.zeros(block.width + extra)
        self.optimizer = BlockOptimizer(setup.optimizer, setup.learning_rate, block.width + extra)
        self.tail = TailMean(setup.iterations, setup.averaged, block.width + extra)
        self._rng = rng
        self._mask: Vector | None = None
        self.releases: list[Vector] = []  # its own DP releases (noisy scaled gradients), in order
        # The gradient's inputs: its block (and for civil affairs the intercept's 1), zero where it clipped.
        self._inputs = np.hstack([block.x, np.ones((len(block.x), extra))])
        self._live: npt.NDArray[np.bool_] | None = None
        self._columns = self._chunked(self._inputs)
        self.newton_damping = setup.newton_damping
        self._hessian_mask: Vector | None = None
        self.hessian_release: Vector | None = None  # its own noisy upper triangle, once released
        self.gains: tuple[float, ...] = ()  # from the Hessian release: its block's (and the intercept's) noise gain
        self._extra = extra
        self.evidence: Evidence | None = None  # an agency's record for a replay (``FeatureHolder``)
        self._sealed: tuple[list[bytes], str] | None = None  # the envelopes of the operands it last opened

    def _chunked(self, inputs: npt.NDArray[np.float64]) -> list[list[list[float]]]:
        return column_multipliers(inputs, self.slots)

    def _own_part(self, u: Vector) -> Vector:
        """Its partial score clipped (``score_clip``); the households it clipped leave its next gradient."""
        clipped, live = clip_scores(u, self.score_clip)
        if self._live is None or not np.array_equal(live, self._live):
            self._columns = self._chunked(self._inputs * live[:, None])
            self._live = live
        return clipped

    def _encrypt(self, v: Vector) -> list[bytes]:
        start = time.perf_counter()
        cts = [ts.ckks_vector(self.context, c) for c in _chunks(v, self.slots)]
        raw = [bytes(c.serialize()) for c in cts]
        self.he_seconds += time.perf_counter() - start
        return raw

    def masked_gradient(self, residual: list[bytes]) -> GradientMessage:
        """``Enc(X^T d + r)``, one one-value ciphertext per weight, ``r`` this party's fresh mask."""
        start = time.perf_counter()
        enc_d = [ts.ckks_vector_from(self.context, r) for r in residual]
        out, self._mask = self._masked_totals(gradient_sums(enc_d, self._columns))
        self.he_seconds += time.perf_counter() - start
        if self.evidence is not None:
            self.evidence.keep("gradient", residual, self._live, self._mask, self._sealed)
        self._sealed = None
        message = GradientMessage(self.name, out, self.gains)
        self.sent_bytes += message.nbytes + 8 * len(self.gains)
        return message

    def _masked_totals(self, sums: list[ts.CKKSVector]) -> tuple[list[bytes], Vector]:
        """Each per-slot sum masked in slot 0 with a fresh value, then rotated and summed (every slot then holds
        the masked total, none a per-household value); and the masks, for unmasking the release."""
        mask = self._rng.uniform(-MASK_BOUND, MASK_BOUND, size=len(sums))
        return masked_totals(sums, mask, self.slots), mask

    def _pair_products(self, enc_weights: list[ts.CKKSVector]) -> list[ts.CKKSVector]:
        """``pair_products`` of its inputs (every row: at the start of training the weights are 0 and no partial
        score is clipped)."""
        return pair_products(enc_weights, self._inputs, self.slots)

    def apply_hessian(self, release: list[float]) -> Vector:
        """Remove the mask from the arbiter's Hessian release (its block's noisy upper triangle) and set the
        Newton step matrix; returns the release (kept in ``hessian_release``)."""
        if self._hessian_mask is None or len(release) != len(self._hessian_mask):
            raise HEError(f"{self.name}: a Hessian release of {len(release)} values for no pending request")
        self.received.append(Received("arbiter", "hessian", "masked-values", len(release), 8 * len(release), 0))
        noisy = np.asarray(release, dtype=np.float64) - self._hessian_mask
        self._hessian_mask = None
        self.set_hessian(noisy)
        return noisy

    def set_hessian(self, released: Vector) -> None:
        """Newton's step matrix from its released upper triangle (also what a resumed job restores)."""
        self.optimizer.precondition(newton_matrix(released, len(self.weights), self.newton_damping))
        self.hessian_release = np.asarray(released, dtype=np.float64)
        # post-processing of its own release: how far noise on its block (and the intercept) moves the scores
        self.gains = part_gains(self.hessian_release, len(self.weights), self.newton_damping, self._extra > 0)

    def apply(self, release: list[float]) -> Vector:
        """Remove the mask from the arbiter's release (the DP release), step and project; returns the release."""
        if self._mask is None or len(release) != len(self._mask):
            raise HEError(f"{self.name}: a release of {len(release)} values for no pending request of that size")
        self.received.append(Received("arbiter", "release", "masked-values", len(release), 8 * len(release), 0))
        noisy = np.asarray(release, dtype=np.float64) - self._mask
        self._mask = None
        self.releases.append(noisy)
        stepped = self.optimizer.step(self.weights, noisy)
        self.weights = stepped if self.projection == "joint" else self._project(stepped)
        return noisy

    def squared_norm(self) -> float:
        """The squared norm of its own block (all it tells the others for the joint projection)."""
        self.sent_bytes += 8
        return float(self.weights @ self.weights)

    def rescale(self, factor: float) -> None:
        """Multiply its own block by the common factor of the joint projection."""
        if not 0.0 < factor <= 1.0:
            raise HEError(f"{self.name}: a projection factor must lie in (0, 1], got {factor!r}")
        self.weights = np.asarray(self.weights * factor, dtype=np.float64)

    def end_iteration(self, iteration: int) -> None:
        """After the iteration's projection: its weights enter the running mean if in the window."""
        self.tail.add(iteration, self.weights)

    def finish(self) -> None:
        """The model's block: the mean over the window (``VerticalPlan.averaged``), post-processing."""
        self.weights = self.tail.mean(self.weights)

    def _project(self, w: Vector) -> Vector:
        return project_block(w, self.weight_bound, intercept=self._extra > 0)


class FeatureHolder(_Holder):
    """An agency without the label: its block, its weights, its keys; the arbiter's public context only.
    With ``setup.evidence`` it keeps what an audit needs to replay each product it sends (``Evidence``)."""

    def __init__(self, block: Block, setup: HolderSetup, rng: np.random.Generator) -> None:
        super().__init__(block, setup, rng)
        if setup.evidence is not None:
            self.evidence = Evidence(setup.evidence, self.name, setup.public_context, self._inputs, self.slots, CLIP)
            self.evidence.keep_run(setup.run, setup.keys, setup.directory[setup.label_holder],
                                   setup.certificates.get(setup.label_holder))  # fmt: skip

    def partial_scores(self, step: Step) -> list[Envelope]:
        """``Enc(X_k w_k)`` over every register position, sealed to the label holder for iteration ``step``
        (``iterations + 1``: the validation scores after the last one)."""
        raw = self._encrypt(self._own_part(self.block.x @ self.weights))
        return self._seal(raw, self.label_holder, "partial-scores", self.block.size, step)

    def masked_hessian(self, envelopes: list[Envelope]) -> GradientMessage:
        """``Enc(H_k + r)``: one one-value ciphertext per entry of its block's upper triangle, from civil
        affairs' sealed Enc(m c / 4) (it cannot tell which households are assessed), ``r`` a fresh mask."""
        raw = self._open(envelopes, self.label_holder, "hessian-weights", HESSIAN_STEP, self.block.size, self.slots)
        start = time.perf_counter()
        enc_weights = [ts.ckks_vector_from(self.context, r) for r in raw]
        out, self._hessian_mask = self._masked_totals(self._pair_products(enc_weights))
        self.he_seconds += time.perf_counter() - start
        if self.evidence is not None:
            sealed = ([pack(e) for e in envelopes], str(HESSIAN_STEP))
            self.evidence.keep("hessian", raw, None, self._hessian_mask, sealed)
        message = GradientMessage(self.name, out)
        self.sent_bytes += message.nbytes
        return message

    def open_residuals(self, envelopes: list[Envelope], step: Step) -> list[bytes]:
        """The residual ciphertexts of iteration ``step`` from the label holder's sealed message (still encrypted
        under A's key)."""
        raw = self._open(envelopes, self.label_holder, "residuals", step, self.block.size, self.slots)
        if self.evidence is not None:  # kept with the gradient they enter
            self._sealed = ([pack(e) for e in envelopes], str(step))
        return raw


class LabelHolder(_Holder):
    """Civil affairs: its block, labels, who is assessed, its validation split, and the intercept (last weight)."""

    def __init__(self, block: Block, labels: LabelData, setup: HolderSetup, rng: np.random.Generator) -> None:
        super().__init__(block, setup, rng, extra=1)
        self.labels = labels
        self.scale = 1.0 / len(block.x)  # public: the register size is known to every party after alignment
        self._partials: dict[str, list[bytes]] = {}  # each agency's latest partial scores (still encrypted)
        self._score_mask: Vector | None = None
        self._tag_mask: Vector | None = None
        self._tag_factor: Vector | None = None
        # the digest of every vector it seals to an agency, for a replay of that agency's products
        self.receipts = None
        if setup.receipts is not None:
            if setup.receipts_key is None:
                raise ValueError("receipts are signed: give civil affairs' ledger key (receipts_key)")
            self.receipts = Receipts(setup.receipts, self.name, setup.public_context, setup.receipts_key, run=setup.run)

    def take_partials(self, sender: str, envelopes: list[Envelope], step: Step) -> None:
        """Open one agency's partial scores, sealed for ``step``, and keep them: each agency's latest are what
        the next residual sums (a sequential sweep replaces one agency's after its step)."""
        if sender == self.name or sender not in self.directory:
            raise MessageRejectedError(f"partial scores from {sender!r}, not another party")
        self._partials[sender] = self._open(envelopes, sender, "partial-scores", step, self.block.size, self.slots)

    def _scores(self) -> list[ts.CKKSVector]:
        """Enc(z): its own clipped part (and the intercept) plus every other agency's latest partial scores."""
        missing = sorted(set(self.directory) - {self.name} - set(self._partials))
        if missing:
            raise HEError(f"no partial scores from {', '.join(missing)}")
        own = self._own_part(self.block.x @ self.weights[:-1] + self.weights[-1])
        start = time.perf_counter()
        total = [ts.ckks_vector(self.context, c) for c in _chunks(own, self.slots)]
        for raw in self._partials.values():
            total = [t + ts.ckks_vector_from(self.context, r) for t, r in zip(total, raw, strict=True)]
        self.he_seconds += time.perf_counter() - start
        return total

    def residual(self) -> list[bytes]:
        """``Enc(d) = Enc(z) * (m c / 4) + m c (0.5 - y)`` from the latest partial scores (its own copy)."""
        z = self._scores()
        start = time.perf_counter()
        m = self.labels.train.astype(np.float64)
        slope = _multiplier(m * self.scale / 4, self.slots)
        offset = _chunks(m * self.scale * (0.5 - self.labels.y), self.slots)
        raw = [bytes((c * s + o).serialize()) for c, s, o in zip(z, slope, offset, strict=True)]
        self.he_seconds += time.perf_counter() - start
        return raw

    def seal_residual(self, raw: list[bytes], recipient: str, step: Step) -> list[Envelope]:
        """A residual sealed to one agency for ``step``."""
        if self.receipts is not None:
            self.receipts.record(recipient, "residual", raw)
        return self._seal(raw, recipient, "residuals", self.block.size, step)

    def residuals(
        self, partials: dict[str, list[Envelope]], step: Step
    ) -> tuple[list[bytes], dict[str, list[Envelope]]]:
        """The residual of iteration ``step`` from every agency's partial scores of that step: its own copy
        and one sealed copy per agency (simultaneous steps)."""
        for sender, envelopes in partials.items():
            self.take_partials(sender, envelopes, step)
        raw = self.residual()
        return raw, {k: self.seal_residual(raw, k, step) for k in partials}

    def hessian_weights(self, parties: list[str]) -> dict[str, list[Envelope]]:
        """``Enc(m c / 4)`` over every register position (m: who is assessed), sealed to each feature holder for
        its Hessian entries: the one thing about its labels they need, and they cannot read it."""
        start = time.perf_counter()
        # Enc(m) times the plaintext c / 4: one level down, as the residuals are, so the holders' products
        # and rotate-and-sums run at the gradients' (cheaper) level
        quarter = [self.scale / 4] * self.slots
        cts = [
            ts.ckks_vector(self.context, c) * quarter for c in _chunks(self.labels.train.astype(np.float64), self.slots)
        ]
        raw = [bytes(c.serialize()) for c in cts]
        self.he_seconds += time.perf_counter() - start
        if self.receipts is not None:
            for p in parties:
                self.receipts.record(p, "hessian-weights", raw)
        return {p: self._seal(raw, p, "hessian-weights", self.block.size, HESSIAN_STEP) for p in parties}

    def masked_hessian(self) -> GradientMessage:
        """``Enc(H_L + r)`` for its own block with the intercept: computed in clear from its own rows and
        labels (nobody else's data enter it), masked and encrypted in one ciphertext of the triangle's size
        (``Arbiter.release_hessian(packed=True)``), so that the arbiter noises it like every other block's."""
        m = self.labels.train.astype(np.float64)
        h = upper_triangle((self._inputs * (m * self.scale / 4)[:, None]).T @ self._inputs)
        start = time.perf_counter()
        self._hessian_mask = self._rng.uniform(-MASK_BOUND, MASK_BOUND, size=len(h))
        out = [bytes(ts.ckks_vector(self.context, (h + self._hessian_mask).tolist()).serialize())]
        self.he_seconds += time.perf_counter() - start
        message = GradientMessage(self.name, out)
        self.sent_bytes += message.nbytes
        return message

    def masked_scores(self, partials: dict[str, list[Envelope]], step: Step) -> list[bytes]:
        """``Enc(z v + s)`` then ``Enc(a z v + t)`` for the validation indicator v, fresh uniform masks s and
        t and a secret per-slot tag factor a in [1, 4], for the arbiter to decrypt.

        The second half is a one-time MAC: an arbiter that altered one decrypted value by delta would have
        to alter the other by a*delta without knowing a, so ``unmask_scores`` catches it (except with
        probability about 2 tol / (3 |delta|)); a slot outside validation must decrypt to its mask exactly.
        ``step`` is the partial scores' (``iterations + 1``).
        """
        for sender, envelopes in partials.items():
            self.take_partials(sender, envelopes, step)
        z = self._scores()
        start = time.perf_counter()
        v = _multiplier(self.labels.validation.astype(np.float64), self.slots)
        size = len(v) * self.slots
        self._score_mask = self._rng.uniform(-MASK_BOUND, MASK_BOUND, size=size)
        self._tag_mask = self._rng.uniform(-MASK_BOUND, MASK_BOUND, size=size)
        self._tag_factor = self._rng.uniform(1.0, 4.0, size=size)
        s, t = _split(self._score_mask, self.slots), _split(self._tag_mask, self.slots)
        av = _split(self._tag_factor * np.concatenate([np.asarray(c) for c in v]), self.slots)
        raw = [bytes((c * a + b).serialize()) for c, a, b in zip(z, v, s, strict=True)]
        raw += [bytes((c * a + b).serialize()) for c, a, b in zip(z, av, t, strict=True)]
        self.he_seconds += time.perf_counter() - start
        self.sent_bytes += sum(len(r) for r in raw)
        return raw

    def unmask_scores(self, values: Vector) -> Vector:
        """The model's scores (logits) of its own validation households, in register order of those positions.

        Raises
        ------
        MessageRejectedError
            If the decryptions were altered (the tag does not match, or a slot outside validation is not
            its mask): the arbiter is cheating, and nothing is computed from them.
        """
        if self._score_mask is None or self._tag_mask is None or self._tag_factor is None:
            raise HEError("no masked scores are pending")
        self.received.append(Received("arbiter", "scores", "masked-values", len(values), 8 * len(values), 0))
        size = len(self._score_mask)
        mask, tag_mask, factor = self._score_mask, self._tag_mask, self._tag_factor
        self._score_mask = self._tag_mask = self._tag_factor = None  # one use
        if len(values) != 2 * size:
            raise MessageRejectedError(f"{len(values)} decrypted scores; {2 * size} were sent")
        z, tagged = values[:size] - mask, values[size:] - tag_mask
        validation = slot_positions(self.block.size, self.slots)[self.labels.validation]
        outside = np.ones(size, dtype=bool)
        outside[validation] = False
        if not np.all(np.abs(tagged - factor * z) <= SCORE_TAG_TOLERANCE) or not np.all(
            np.abs(z[outside]) <= SCORE_TAG_TOLERANCE
        ):
            raise MessageRejectedError("the arbiter's decryptions of the validation scores were altered")
        return np.asarray(z[validation], dtype=np.float64)


class Arbiter:
    """The coordinator as CKKS key holder: adds fresh encrypted noise to masked gradients and decrypts.

    Parameters
    ----------
    widths
        Each party's number of weights (public: the job plan's), the only gradient sizes it accepts.
    noise_std
        Standard deviation of the noise per coordinate (on the scaled gradient).
    hessian_std
        Standard deviation of the noise per entry of a Hessian release (0: the job releases none).
    rng
        The generator of DP noise (inject a seeded one only to reproduce a run in tests).
    params
        The CKKS parameter set, default ``PARAMETERS``.
    """

    name = "arbiter"

    def __init__(
        self,
        widths: dict[str, int],
        noise_std: float,
        rng: np.random.Generator,
        params: str = PARAMETERS,
        hessian_std: float = 0.0,
        label_holder: str | None = None,
    ) -> None:
        self.params: ParameterSet = parameter_set(params)
        self._context = new_private_context(self.params)
        self._context.generate_galois_keys()
        # the digest of every product it releases, for a replay of the sender's computation (set by the caller)
        self.receipts: Receipts | None = None
        self.widths = dict(widths)
        self.noise_std = noise_std
        self.hessian_std = hessian_std
        self.label_holder = label_holder  # set: the gradients' noise is shaped by the parties' gains
        self.stds: dict[str, list[float]] = {}  # the last iteration's per-coordinate noise std, by party
        self._hessians_released: set[str] = set()
        self._rng = rng
        self.received: list[Received] = []
        self.he_seconds = 0.0
        self.sent_bytes = 0

    def public_context(self) -> bytes:
        """The public context (public, Galois and relinearization keys; never the secret key)."""
        return public_bytes(self._context)

    def release(self, message: GradientMessage, std: npt.NDArray[np.float64] | float | None = None) -> list[float]:
        """Noise under encryption, decrypt, round: the masked noised gradient, returned to its sender only.
        ``std``: per coordinate (``release_iteration``); default ``noise_std`` on each.

        Raises
        ------
        HEError
            An unknown sender, a count other than the sender's width, or a ciphertext of more than one value.
        """
        width = self.widths.get(message.sender)
        return self._release(message, width, self.noise_std if std is None else std, "gradient")

    def release_iteration(self, messages: dict[str, GradientMessage]) -> dict[str, list[float]]:
        """One iteration's releases, in the order given (the order of the noise draws): every party's gradient.

        With a ``label_holder``, the noise is spread over the parts by the gains the messages report
        (``shaped_stds``: the privacy of ``noise_std`` on every coordinate whatever they report); without one,
        or when any report is missing or invalid, ``noise_std`` on every coordinate.

        Raises
        ------
        HEError
            Not exactly one message from each party, or as ``release``.
        """
        if sorted(messages) != sorted(self.widths) or any(m.sender != p for p, m in messages.items()):
            raise HEError(f"an iteration needs one gradient from each of {sorted(self.widths)}; got {sorted(messages)}")
        stds = self.set_stds({p: m.gains for p, m in messages.items()})
        return {p: self.release(m, stds[p]) for p, m in messages.items()}

    def set_stds(self, gains: dict[str, tuple[float, ...]]) -> dict[str, npt.NDArray[np.float64]]:
        """The per-coordinate noise std of every party's next release (``stds``): spread by the gains each
        party reports (``shaped_stds``) with a ``label_holder``, else ``noise_std`` on every coordinate.
        A sequential sweep sets them once, before its first release, from every party's gains."""
        if self.label_holder is None:
            stds = {p: np.full(w, self.noise_std) for p, w in self.widths.items()}
        else:
            from agencyfl.vertical.plan import shaped_stds  # plan imports the accountant: screening needs neither

            stds = shaped_stds(self.noise_std, self.widths, self.label_holder, gains)
        self.stds = {p: [float(v) for v in std] for p, std in stds.items()}
        return stds

    def release_hessian(self, message: GradientMessage, packed: bool = False) -> list[float]:
        """The same for a block's Hessian upper triangle (once per party and job). ``packed``: the label
        holder's own triangle, computed from its own data alone, comes as one ciphertext of the triangle's
        size (the caller knows who the label holder is); every other party's as one-value ciphertexts.

        Raises
        ------
        HEError
            As ``release``; a second Hessian from the same party, or a job without a Hessian release.
        """
        width = self.widths.get(message.sender)
        if self.hessian_std <= 0:
            raise HEError("this job releases no Hessian")
        if message.sender in self._hessians_released:
            raise HEError(f"{message.sender!r} asked for a second Hessian release")
        count = None if width is None else triangle_size(width)
        out = self._release(message, count, self.hessian_std, "hessian", packed)
        self._hessians_released.add(message.sender)
        return out

    def _release(
        self,
        message: GradientMessage,
        count: int | None,
        std: npt.NDArray[np.float64] | float,
        kind: ProductKind,
        packed: bool = False,
    ) -> list[float]:
        expected = 1 if packed else count
        if count is None or len(message.ciphertexts) != expected:
            raise HEError(
                f"{message.sender!r} sent {len(message.ciphertexts)} {kind} ciphertexts; it has {count} values"
            )
        start = time.perf_counter()
        cts = [ts.ckks_vector_from(self._context, c) for c in message.ciphertexts]
        sizes = [c.size() for c in cts]
        self.received.append(Received(message.sender, kind, "gradient-ciphertexts", count, message.nbytes, max(sizes)))
        if sizes != ([count] if packed else [1] * count):
            raise HEError(f"{message.sender!r} sent ciphertexts of {max(sizes)} values for a {kind} of {count}")
        noise = self._rng.normal(0.0, std, size=count)  # a vector std: the same draws, each scaled by its own
        # the noise is added to the ciphertext (a plaintext addition) before it is decrypted: what leaves is
        # value + CKKS error + noise, rounded, never the bare decryption (noise flooding)
        if packed:
            values = np.asarray((cts[0] + noise.tolist()).decrypt(), dtype=np.float64)
        else:
            values = np.array([(c + [float(n)]).decrypt()[0] for c, n in zip(cts, noise, strict=True)])
        out = [round(float(v) / ROUNDING) * ROUNDING for v in values]
        self.he_seconds += time.perf_counter() - start
        self.sent_bytes += 8 * count
        if self.receipts is not None:
            self.receipts.record(message.sender, kind, message.ciphertexts)
        return out

    def decrypt_masked_scores(self, sender: str, raw: list[bytes]) -> npt.NDArray[np.float64]:
        """Decrypt the label holder's masked validation scores (uniformly masked at every slot)."""
        cts = [ts.ckks_vector_from(self._context, r) for r in raw]
        self.received.append(
            Received(sender, "scores", "masked-scores", len(raw), sum(map(len, raw)), max(c.size() for c in cts))
        )
        values = np.concatenate([np.asarray(c.decrypt()) for c in cts])
        self.sent_bytes += 8 * len(values)
        return np.asarray(np.round(values / ROUNDING) * ROUNDING, dtype=np.float64)
