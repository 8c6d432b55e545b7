"""Run vertical training with every party in one process: T iterations of ``docs/vertical.md``.

Each party is its own object with its own keys; they exchange only the protocol's messages (sealed
envelopes between agencies, one-value ciphertexts to the arbiter, masked values back).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agencyfl.alignment.sealed import PartyKeys, certify
from agencyfl.federation.metrics import exact_metrics
from agencyfl.privacy.events import GaussianEvent, Mechanism
from agencyfl.vertical.encoding import Block, LabelData
from agencyfl.vertical.evidence import RECEIPTS, Receipts
from agencyfl.vertical.optim import Vector, joint_scale, sweep_starts_fresh
from agencyfl.vertical.plan import VerticalPlan
from agencyfl.vertical.protocol import Arbiter, FeatureHolder, HolderSetup, LabelHolder


@dataclass(frozen=True)
class IterationMetrics:
    """One iteration: wall time, CKKS time alone (the compute floor), bytes each party sent."""

    seconds: float
    he_seconds: float
    sent_bytes: dict[str, int]


@dataclass
class VerticalResult:
    """What a run returns.

    Attributes
    ----------
    weights
        Each agency's block of weights (the label holder's last weight is the intercept); in a
        deployment each stays with its agency.
    events
        One ``GaussianEvent`` per iteration (every agency's ledger records each).
    hessian_event
        The Hessian release's event (block Newton), recorded before the iterations'; None without one.
    hessian
        The Hessian release's wall time, CKKS time and bytes (None without one).
    mechanism
        The whole job's mechanism (``plan.events()``).
    iterations
        Per-iteration metrics.
    validation_auc
        AUC of the label holder's validation households, scored through the encrypted path.
    validation_logits
        The model's own scores (logits) of those households, in register order: the label holder's only.
    parties
        The party objects (their ``received`` records are what the tests inspect).
    """

    weights: dict[str, Vector]
    events: list[GaussianEvent]
    mechanism: Mechanism
    hessian_event: GaussianEvent | None = None
    hessian: IterationMetrics | None = None
    iterations: list[IterationMetrics] = field(default_factory=list)
    validation_auc: float = float("nan")
    validation_logits: Vector = field(default_factory=lambda: np.zeros(0))
    parties: dict[str, FeatureHolder | LabelHolder | Arbiter] = field(default_factory=dict)


def _sent(parties: dict[str, FeatureHolder | LabelHolder | Arbiter]) -> dict[str, int]:
    return {name: p.sent_bytes for name, p in parties.items()}


def _he(parties: dict[str, FeatureHolder | LabelHolder | Arbiter]) -> float:
    return sum(p.he_seconds for p in parties.values())


def release_hessians(
    holders: list[FeatureHolder], civil: LabelHolder, arbiter: Arbiter, before_release: Callable[[int], None] | None
) -> None:
    """Block Newton's one Hessian release (``docs/vertical.md``): civil affairs seals Enc(m c / 4) to each
    feature holder, every party masks its block's upper triangle, the ledgers admit the release, then the
    arbiter noises and decrypts each (holders in order, then civil affairs: the reference's order)."""
    weights = civil.hessian_weights([h.name for h in holders])
    messages = {h.name: h.masked_hessian(weights[h.name]) for h in holders}
    messages[civil.name] = civil.masked_hessian()
    if before_release is not None:
        before_release(0)
    for party in [*holders, civil]:
        party.apply_hessian(arbiter.release_hessian(messages[party.name], packed=party is civil))


def sweep(
    holders: list[FeatureHolder],
    civil: LabelHolder,
    arbiter: Arbiter,
    iteration: int,
    before_release: Callable[[int], None] | None,
    fresh: bool = True,
) -> None:
    """One sequential sweep (``docs/vertical.md``, "Sequential sweeps"): every ledger admits the sweep first
    (its K releases together are one iteration's release); then each party in turn (the agencies in order,
    then civil affairs: the reference's order) gets the residual of everyone's latest scores, sends its
    masked gradient, takes its noised release and steps, and an agency sends its new partial scores.
    Sub-step ``"T.j"`` seals the j-th party's residual and the scores it sends after its step; ``"T.0"``
    the scores every agency sends first, only when civil affairs holds none of the weights it will step from
    (``fresh``: the session's first sweep, or the last projection moved every weight); otherwise the scores
    each agency sent after its own step of the last sweep still hold."""
    if before_release is not None:
        before_release(iteration)
    stds = arbiter.set_stds({p.name: p.gains for p in [*holders, civil]})
    for h in holders if fresh else ():
        civil.take_partials(h.name, h.partial_scores(f"{iteration}.0"), f"{iteration}.0")
    for j, party in enumerate([*holders, civil], start=1):
        step = f"{iteration}.{j}"
        residual = civil.residual()
        if isinstance(party, FeatureHolder):
            residual = party.open_residuals(civil.seal_residual(residual, party.name, step), step)
        party.apply(arbiter.release(party.masked_gradient(residual), stds[party.name]))
        if isinstance(party, FeatureHolder):
            civil.take_partials(party.name, party.partial_scores(step), step)


def train_vertical(
    features: list[Block],
    label: Block,
    labels: LabelData,
    plan: VerticalPlan,
    noise_rng: np.random.Generator | None = None,
    mask_seed: int | None = None,
    validate: bool = True,
    before_release: Callable[[int], None] | None = None,
    evidence: Mapping[str, Path] | None = None,
    receipt_keys: Mapping[str, Ed25519PrivateKey] | None = None,
) -> VerticalResult:
    """Train with the encrypted protocol; each party holds only its own block and keys.

    Parameters
    ----------
    features
        The blocks of the agencies without the label (each would stay at its agency).
    label, labels
        Civil affairs' block and its labels.
    plan
        The job's public plan (``plan.agencies`` must be the number of blocks).
    noise_rng
        The arbiter's DP noise generator; default a fresh one seeded from ``secrets`` (inject one only to
        reproduce a run against the reference).
    mask_seed
        Seeds the agencies' mask generators (default from ``secrets``); masks cancel, so this only
        makes CKKS error reproducible.
    validate
        Score the validation households through the encrypted path at the end (default True).
    before_release
        Called with the iteration number (from 1; 0 for the Hessian release of block Newton) before anything
        of that iteration is released: the agencies' ledgers account it there, and a refusal (an exception)
        stops the job.
    evidence
        Each party's evidence folder for the job, by name (``"arbiter"`` for the arbiter's): the agencies
        keep what a replay needs, civil affairs and the arbiter their receipts (``docs/vertical.md``,
        "Accountability"). Default None: nothing kept (benchmarks, tests of other things).
    receipt_keys
        The ledger keys that sign civil affairs' and the arbiter's receipts (``"arbiter"``: the coordinator's);
        required with ``evidence``.

    Raises
    ------
    ValueError
        If the plan's number of agencies is not the number of blocks, or evidence is asked for without the
        receipts' signing keys.
    """
    if plan.agencies != len(features) + 1:
        raise ValueError(f"the plan is for {plan.agencies} agencies; {len(features) + 1} blocks were given")
    noise_rng = noise_rng if noise_rng is not None else np.random.default_rng(secrets.randbits(128))
    seeds = np.random.SeedSequence(mask_seed if mask_seed is not None else secrets.randbits(128))
    scale = 1.0 / len(label.x)
    widths = {b.agency: b.width for b in features} | {label.agency: label.width + 1}
    register = len(label.x)
    hessian_std = plan.hessian_std(register) if plan.releases_hessian else 0.0
    folders = dict(evidence or {})
    receipts = folders.get("arbiter")
    signers = dict(receipt_keys or {})
    arbiter = Arbiter(widths, plan.noise_std * scale, noise_rng, hessian_std=hessian_std,
                      label_holder=label.agency if plan.shapes_noise else None)  # fmt: skip
    if folders and (receipts is None or label.agency not in folders):
        raise ValueError("evidence needs the arbiter's and the label holder's folders: a replay compares receipts")
    run = f"vertical-{secrets.token_hex(4)}"
    if receipts is not None:
        if "arbiter" not in signers or label.agency not in signers:
            raise ValueError("receipts are signed: give the arbiter's and the label holder's keys (receipt_keys)")
        arbiter.receipts = Receipts(receipts / RECEIPTS, arbiter.name, arbiter.public_context(), signers["arbiter"],
                                    label_holder=label.agency, run=run)  # fmt: skip
    context = arbiter.public_context()
    keys = {b.agency: PartyKeys.generate(b.agency) for b in [*features, label]}
    directory = {name: k.public() for name, k in keys.items()}
    # civil affairs' run keys vouched for by its ledger key, as in a deployment: a replay then knows whose
    # signature the agencies' operands came under
    certificates = {label.agency: certify(run, keys[label.agency].public(), signers[label.agency])} if folders else {}
    rngs = [np.random.default_rng(s) for s in seeds.spawn(len(features) + 1)]

    def setup(name: str) -> HolderSetup:
        return HolderSetup(
            keys=keys[name], directory=directory, run=run, public_context=context, label_holder=label.agency,
            optimizer=plan.optimizer, learning_rate=plan.learning_rate, weight_bound=plan.weight_bound,
            projection=plan.projection, score_clip=plan.score_clip,
            newton_damping=plan.hessian_damping(widths[name], register), iterations=plan.iterations,
            averaged=plan.averaged, evidence=folders.get(name) if name != label.agency else None,
            receipts=folders[name] / RECEIPTS if name == label.agency and name in folders else None,
            receipts_key=signers.get(name) if name == label.agency else None, certificates=certificates,
        )  # fmt: skip

    holders = [FeatureHolder(b, setup(b.agency), rng) for b, rng in zip(features, rngs, strict=False)]
    civil = LabelHolder(label, labels, setup(label.agency), rngs[-1])
    parties: dict[str, FeatureHolder | LabelHolder | Arbiter] = {h.name: h for h in holders}
    parties[civil.name] = civil
    parties[arbiter.name] = arbiter
    result = VerticalResult(weights={}, events=[], mechanism=plan.events(), parties=parties)
    if plan.releases_hessian:
        start, he0, sent0 = time.perf_counter(), _he(parties), _sent(parties)
        release_hessians(holders, civil, arbiter, before_release)
        result.hessian_event = plan.hessian_event()
        sent1 = _sent(parties)
        result.hessian = IterationMetrics(time.perf_counter() - start, _he(parties) - he0,
                                          {k: sent1[k] - sent0[k] for k in sent1})  # fmt: skip
    factor = 1.0
    for iteration in range(1, plan.iterations + 1):
        start, he0, sent0 = time.perf_counter(), _he(parties), _sent(parties)
        if plan.order == "sequential":
            sweep(holders, civil, arbiter, iteration, before_release, fresh=sweep_starts_fresh(iteration, 1, factor))
        else:
            partials = {h.name: h.partial_scores(iteration) for h in holders}
            own, sealed = civil.residuals(partials, iteration)
            gradients = {h.name: h.masked_gradient(h.open_residuals(sealed[h.name], iteration)) for h in holders}
            gradients[civil.name] = civil.masked_gradient(own)
            if before_release is not None:  # accounted in every ledger before the arbiter releases anything
                before_release(iteration)
            released = arbiter.release_iteration(gradients)  # holders in order, then civil affairs: the reference's
            for p in [*holders, civil]:
                p.apply(released[p.name])
        if plan.projection == "joint":  # each party tells its block's squared norm; all scale by one factor
            factor = joint_scale([p.squared_norm() for p in [*holders, civil]], plan.weight_bound)
            for p in [*holders, civil]:
                p.rescale(factor)
        for p in [*holders, civil]:
            p.end_iteration(iteration)
        result.events.append(plan.iteration_event())
        sent1 = _sent(parties)
        result.iterations.append(
            IterationMetrics(
                seconds=time.perf_counter() - start,
                he_seconds=_he(parties) - he0,
                sent_bytes={k: sent1[k] - sent0[k] for k in sent1},
            )
        )
    for p in [*holders, civil]:
        p.finish()
    result.weights = {h.name: h.weights.copy() for h in holders} | {civil.name: civil.weights.copy()}
    if validate and labels.validation.any():
        partials = {h.name: h.partial_scores(plan.iterations + 1) for h in holders}
        masked = civil.masked_scores(partials, plan.iterations + 1)
        scores = civil.unmask_scores(arbiter.decrypt_masked_scores(civil.name, masked))
        result.validation_auc = exact_metrics(1 / (1 + np.exp(-scores)), labels.y[labels.validation]).auc
        result.validation_logits = scores
    return result
