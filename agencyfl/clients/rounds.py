"""What an agency does when asked to train or evaluate: the logic behind the Flower ClientApp.

Kept free of Flower types so it can be tested directly. Order in ``train_round``: verify the ledger,
admit the request (``clients.admission``: the job's plan from the agency's own spec, the round's
place in the job, the coordinator's record of this ledger), compute the epsilon the round would
leave, refuse (recording the refusal, spending nothing, training nothing, answering with the refusal
alone) or train and append the spend. Validate first, then commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from opacus.accountants import RDPAccountant

from agencyfl.clients.admission import admit, admit_release
from agencyfl.clients.local_data import LocalData, load_local_data
from agencyfl.clients.site import AgencySite, site_spec
from agencyfl.clients.trainer import dp_sgd, noise_generator, steps_per_epoch
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.fairness import count_groups, layout, sensitivity
from agencyfl.federation.messages import LedgerRecord
from agencyfl.federation.metrics import score_histograms
from agencyfl.federation.model import build_model, model_from_arrays, model_to_arrays, predict_proba
from agencyfl.federation.plan import JobPlan
from agencyfl.federation.spec import FederationSpec, LoadedSpec
from agencyfl.privacy.accounting import StepRecord, epsilon_for
from agencyfl.privacy.budget import check_round, evaluation_release, job_noise_multiplier, planned_release
from agencyfl.privacy.events import EVENT_FORMAT, NEIGHBOURING, Mechanism, dp_sgd_steps, gaussian_releases
from agencyfl.privacy.ledger import LedgerEvent, now_utc, spend_records


@dataclass(frozen=True)
class TrainRequest:
    """The coordinator's instruction for one round."""

    job: str
    round: int
    rounds: int
    spec_sha256: str
    arrays: list[np.ndarray]
    epsilon: float | None = None  # the per-job epsilon the coordinator plans (None: not stated)
    known: LedgerRecord | None = None  # the coordinator's record of this agency's ledger

    def plan(self, loaded_epsilon: float, federation: str) -> JobPlan:
        """The plan as the coordinator states it (what it leaves unstated is taken as the agency's)."""
        return JobPlan(
            federation=federation,
            job=self.job,
            spec_sha256=self.spec_sha256,
            rounds=self.rounds,
            epsilon=loaded_epsilon if self.epsilon is None else self.epsilon,
        )


@dataclass
class TrainReply:
    """The agency's answer: new weights and spend, or a refusal with its reason."""

    agency: str
    status: str  # "trained" or "refused"
    reason: str | None = None
    arrays: list[np.ndarray] = field(default_factory=list)
    num_examples: int = 0
    epsilon_job: float = 0.0
    epsilon_lifetime: float = 0.0
    noise_multiplier: float = 0.0
    steps: int = 0
    loss: float = float("nan")
    dataset: str = ""
    origin: str = ""  # the origin (genesis hash) of the agency's ledger
    evaluation: EvaluationRelease | None = None  # the noised validation metrics of the model received


def train_round(site: AgencySite, request: TrainRequest, seed: int | None = None) -> TrainReply:
    """Run one federated round at ``site`` under its DP budget.

    Parameters
    ----------
    site
        The agency's spec, data and home folder.
    request
        The round to run; the agency's own spec must hash to ``request.spec_sha256``.
    seed
        Seeds the noise generator (reproducible experiments only; default: OS entropy).
    """
    torch.set_num_threads(1)  # 2 cores shared by several agencies: oversubscription is 20x slower
    loaded = site_spec(site)
    spec = loaded.spec
    ledger = site.open_ledger()
    events = ledger.events()  # verifies the chain; fails closed
    origin = ledger.origin()
    q = spec.training.sample_rate
    steps = spec.training.local_epochs * steps_per_epoch(q)  # from the agency's spec, never the coordinator's

    def refuse(reason: str, planned: StepRecord) -> TrainReply:
        spent = spend_records(events)
        job_eps = epsilon_for(spend_records(events, request.job), spec.privacy.delta)
        life_eps = epsilon_for(spent, spec.privacy.delta)
        ledger.append(_event(site, spec, request, "refusal", planned, job_eps, life_eps, "", reason))
        # the refusal alone: no fingerprint, no row count, nothing computed from records
        return TrainReply(site.agency, "refused", reason, epsilon_job=job_eps, epsilon_lifetime=life_eps, origin=origin)

    nothing = StepRecord(0.0, q, 0)
    claimed = request.plan(spec.privacy.epsilon, spec.federation.name)
    reason = admit(loaded, events, origin, claimed, request.round, request.arrays, steps, request.known)
    if reason is not None:
        return refuse(reason, nothing)
    sigma = job_noise_multiplier(spec, steps * spec.training.rounds)  # leaves room for the planned releases
    planned = StepRecord(sigma, q, steps)
    data = load_local_data(site, loaded)
    if len(data.y_train) == 0:
        return refuse("no valid training rows", planned)
    release = evaluation_release(spec)  # the validation metrics of the model this round starts from
    decision = check_round(
        events, request.job, planned, spec.privacy.delta, spec.privacy.epsilon, spec.privacy.budget, (release,)
    )
    if not decision.allowed:
        return refuse(decision.reason or "budget", planned)

    generator = noise_generator(seed)
    evaluation = evaluation_release_of(loaded, data, request.arrays, generator)
    after_release = [*spend_records(events), release]
    job_release = [*spend_records(events, request.job), release]
    ledger.append(  # accounted before it is sent
        _event(
            site, spec, request, "release", release, epsilon_for(job_release, spec.privacy.delta),
            epsilon_for(after_release, spec.privacy.delta), data.fingerprint, None, "evaluation",
        )
    )  # fmt: skip
    model = build_model(spec.model, FeatureEncoder(spec.schema).width)
    model_from_arrays(model, request.arrays)
    accountant = RDPAccountant()  # counts this round's steps; the spend is composed from the ledger below
    result = dp_sgd(
        model,
        data.x_train,
        data.y_train,
        noise_multiplier=sigma,
        sample_rate=q,
        max_grad_norm=spec.privacy.max_grad_norm,
        learning_rate=spec.training.learning_rate,
        steps=steps,
        accountant=accountant,
        generator=generator,
    )
    taken = StepRecord(sigma, q, result.steps)
    job_eps = epsilon_for([*job_release, taken], spec.privacy.delta)
    # the same arithmetic as an Opacus RDPAccountant that saw every step of the ledger and this round, with
    # each mechanism's RDP cached (Opacus recomputes every entry's RDP curve: linear in the ledger's length)
    life_eps = epsilon_for([*after_release, taken], spec.privacy.delta)
    ledger.append(_event(site, spec, request, "round", taken, job_eps, life_eps, data.fingerprint, None))
    return TrainReply(
        site.agency,
        "trained",
        None,
        model_to_arrays(model),
        len(data.y_train),
        job_eps,
        life_eps,
        sigma,
        result.steps,
        result.mean_loss,
        data.fingerprint,
        origin,
        evaluation,
    )


def _event(
    site: AgencySite,
    spec: FederationSpec,
    request: TrainRequest,
    kind: Literal["round", "refusal", "release"],
    record: StepRecord,
    job_eps: float,
    life_eps: float,
    fingerprint: str,
    reason: str | None,
    release: Literal["evaluation", "fairness"] | None = None,
) -> LedgerEvent:
    return LedgerEvent(
        kind=kind,
        agency=site.agency,
        job=request.job,
        round=request.round,
        noise_multiplier=record.noise_multiplier,
        sample_rate=record.sample_rate,
        steps=0 if kind == "refusal" else record.steps,
        max_grad_norm=spec.privacy.max_grad_norm,
        delta=spec.privacy.delta,
        epsilon_job=job_eps,
        epsilon_lifetime=life_eps,
        epsilon_job_cap=spec.privacy.epsilon,
        budget=spec.privacy.budget,
        dataset=fingerprint,
        time=now_utc(),
        reason=reason,
        federation=spec.federation.name,
        release=release,
        mechanism=None if kind == "refusal" or record.steps <= 0 else _mechanism(spec, kind, record, release),
        mechanism_format=EVENT_FORMAT,
        neighbouring=NEIGHBOURING,
    )


def _mechanism(
    spec: FederationSpec, kind: str, record: StepRecord, release: Literal["evaluation", "fairness"] | None
) -> Mechanism:
    """The mechanism an entry released, with its sensitivity and noise std (``privacy.events``)."""
    if kind == "round":
        return dp_sgd_steps(record.noise_multiplier, record.sample_rate, record.steps, spec.privacy.max_grad_norm)
    if release == "fairness" and spec.fairness is not None:
        return gaussian_releases(record.noise_multiplier, sensitivity(spec.fairness), record.steps)
    return gaussian_releases(record.noise_multiplier, EVALUATION_SENSITIVITY, record.steps)


EVALUATION_SENSITIVITY = float(np.sqrt(2.0))
"""L2 sensitivity of one evaluation release under adding or removing one household: its validation
row adds 1 to one bin of one of the two histograms, and at most 1 to the squared-error sum."""


@dataclass(frozen=True)
class EvaluationRelease:
    """A noised release of the validation split's score histograms (``[evaluation] bins`` per label)."""

    hist_pos: np.ndarray
    hist_neg: np.ndarray
    brier_sum: float


def evaluation_release_of(
    loaded: LoadedSpec, data: LocalData, arrays: list[np.ndarray], generator: torch.Generator
) -> EvaluationRelease:
    """Histograms and squared-error sum of the validation split under ``arrays``, Gaussian-noised.

    Noise std ``[evaluation] noise_multiplier * sqrt(2)`` on every count and on the sum: the Gaussian
    mechanism at that noise multiplier whatever model ``arrays`` is (the sensitivity bound holds for
    any model, also one crafted to isolate a household). The caller accounts it before it is sent.
    """
    spec = loaded.spec
    bins = spec.evaluation.bins
    model = build_model(spec.model, FeatureEncoder(spec.schema).width)
    model_from_arrays(model, arrays)
    scores = predict_proba(model, data.x_val) if len(data.y_val) else np.zeros(0)
    pos, neg, brier = score_histograms(scores, data.y_val, bins)
    exact = np.asarray([*pos, *neg, brier], dtype=np.float64)
    noised = exact + _gaussian(exact.shape, spec.evaluation.noise_multiplier * EVALUATION_SENSITIVITY, generator)
    return EvaluationRelease(noised[:bins], noised[bins : 2 * bins], float(noised[-1]))


@dataclass(frozen=True)
class EvaluateReply:
    """Aggregates of the validation split: per-label score histograms and the squared-error sum."""

    agency: str
    num_examples: int
    hist_pos: list[int]
    hist_neg: list[int]
    brier_sum: float


def evaluate_round(site: AgencySite, arrays: list[np.ndarray]) -> EvaluateReply:
    """Exact validation aggregates, for the agency's own use only: never sent (see ``release_round``)."""
    torch.set_num_threads(1)
    loaded = site_spec(site)
    data = load_local_data(site, loaded)
    model = build_model(loaded.spec.model, FeatureEncoder(loaded.spec.schema).width)
    model_from_arrays(model, arrays)
    scores = predict_proba(model, data.x_val) if len(data.y_val) else np.zeros(0)
    pos, neg, brier = score_histograms(scores, data.y_val)
    return EvaluateReply(site.agency, len(data.y_val), pos, neg, brier)


@dataclass(frozen=True)
class FairnessReply:
    """The fairness counts an agency releases (``federation.fairness`` layout), or why it sent none."""

    agency: str
    status: Literal["noised", "refused", "none"]
    counts: np.ndarray
    reason: str | None = None


def _gaussian(shape: tuple[int, ...], std: float, generator: torch.Generator) -> np.ndarray:
    """Gaussian noise drawn as Opacus' secure mode does: four draws, summed and halved (threat model)."""
    total = torch.zeros(shape, dtype=torch.float64)
    for _ in range(4):
        total += torch.normal(0.0, std, size=shape, generator=generator, dtype=torch.float64)
    return (total / 2).numpy()


def fairness_round(site: AgencySite, arrays: list[np.ndarray], job: str, seed: int | None = None) -> FairnessReply:
    """Per-group counts of the validation split under ``arrays``, noised and accounted.

    The release is budget-checked like a training round (the job's noise was calibrated to leave room
    for it), Gaussian noise of std ``noise_multiplier * sensitivity`` is added, and a ``release``
    entry goes into the ledger before the counts are returned; a release that would cross a cap is
    refused and recorded, and no counts leave. With ``[fairness] noise_multiplier = 0`` nothing is
    released: exact counts never leave an agency. The caller admits the request first
    (``release_round``).
    """
    torch.set_num_threads(1)
    loaded = site_spec(site)
    spec = loaded.spec
    if spec.fairness is None:
        return FairnessReply(site.agency, "none", np.zeros(0))
    release = planned_release(spec)
    if release is None:
        return FairnessReply(
            site.agency, "refused", np.zeros(0), "exact counts are not released: set [fairness] noise_multiplier > 0"
        )
    ledger = site.open_ledger()
    events = ledger.events()
    request = TrainRequest(job, spec.training.rounds + 1, spec.training.rounds, loaded.sha256, [])
    data = load_local_data(site, loaded)
    decision = check_round(events, job, release, spec.privacy.delta, spec.privacy.epsilon, spec.privacy.budget)
    if not decision.allowed:
        job_eps = epsilon_for(spend_records(events, job), spec.privacy.delta)
        life_eps = epsilon_for(spend_records(events), spec.privacy.delta)
        reason = f"fairness release refused: {decision.reason}"
        ledger.append(_event(site, spec, request, "refusal", release, job_eps, life_eps, data.fingerprint, reason))
        return FairnessReply(site.agency, "refused", np.zeros(0), reason)
    lay = layout(spec.fairness, spec.schema)
    model = build_model(spec.model, FeatureEncoder(spec.schema).width)
    model_from_arrays(model, arrays)
    scores = predict_proba(model, data.x_val) if len(data.y_val) else np.zeros(0)
    counts = count_groups(scores, data.y_val, data.val_groups, lay, spec.fairness.threshold)
    noised = counts + _gaussian(
        counts.shape, release.noise_multiplier * sensitivity(spec.fairness), noise_generator(seed)
    )
    event = _event(
        site, spec, request, "release", release, decision.epsilon_job_after, decision.epsilon_lifetime_after,
        data.fingerprint, None, "fairness",
    )  # fmt: skip
    ledger.append(event)
    return FairnessReply(site.agency, "noised", noised)


@dataclass
class ReleaseReply:
    """The agency's answer to the final evaluation of a job: its noised releases, or the refusal alone."""

    agency: str
    status: Literal["released", "refused"]
    reason: str | None = None
    evaluation: EvaluationRelease | None = None
    fairness: FairnessReply | None = None
    epsilon_job: float = 0.0
    epsilon_lifetime: float = 0.0
    origin: str = ""


def release_round(site: AgencySite, request: TrainRequest, seed: int | None = None) -> ReleaseReply:
    """The final model's evaluation (and fairness counts) for job ``request.job``, as accounted releases.

    Admitted like a round (``clients.admission.admit_release``: the job's plan from the agency's
    spec, the coordinator's record of its ledger, a job this agency trained in, once per job), then
    budget-checked for all its releases together; each is noised and entered in the ledger before
    anything is returned. A refusal is recorded and answered alone.
    """
    torch.set_num_threads(1)
    loaded = site_spec(site)
    spec = loaded.spec
    ledger = site.open_ledger()
    events = ledger.events()
    origin = ledger.origin()
    final = TrainRequest(request.job, spec.training.rounds + 1, request.rounds, request.spec_sha256, [])
    evaluation = evaluation_release(spec)
    fairness = planned_release(spec) if spec.fairness is not None else None

    def refuse(reason: str) -> ReleaseReply:
        job_eps = epsilon_for(spend_records(events, request.job), spec.privacy.delta)
        life_eps = epsilon_for(spend_records(events), spec.privacy.delta)
        ledger.append(_event(site, spec, final, "refusal", evaluation, job_eps, life_eps, "", reason))
        return ReleaseReply(
            site.agency, "refused", reason, epsilon_job=job_eps, epsilon_lifetime=life_eps, origin=origin
        )

    claimed = request.plan(spec.privacy.epsilon, spec.federation.name)
    reason = admit_release(loaded, events, origin, claimed, request.known)
    if reason is not None:
        return refuse(reason)
    decision = check_round(
        events, request.job, evaluation, spec.privacy.delta, spec.privacy.epsilon, spec.privacy.budget,
        (fairness,) if fairness else (),
    )  # fmt: skip
    if not decision.allowed:
        return refuse(f"final evaluation refused: {decision.reason}")
    data = load_local_data(site, loaded)
    released = evaluation_release_of(loaded, data, request.arrays, noise_generator(seed))
    job_after = epsilon_for([*spend_records(events, request.job), evaluation], spec.privacy.delta)
    life_after = epsilon_for([*spend_records(events), evaluation], spec.privacy.delta)
    ledger.append(
        _event(site, spec, final, "release", evaluation, job_after, life_after, data.fingerprint, None, "evaluation")
    )
    counts = fairness_round(site, request.arrays, request.job, None if seed is None else seed + 1)
    if counts.status == "noised":
        job_after, life_after = decision.epsilon_job_after, decision.epsilon_lifetime_after
    return ReleaseReply(site.agency, "released", None, released, counts, job_after, life_after, origin)
