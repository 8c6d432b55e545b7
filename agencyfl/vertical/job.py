"""A vertical job on one machine: align, then train, every iteration accounted in every agency's ledger first.

``run_vertical`` is what ``agencyfl run --spec VERTICAL.toml`` runs. Each agency keeps its own folder,
``WORKDIR/<agency>/``: its alignment output, its ledger (``ledger/``) and signing key (``keys/``), and
its own block of the model (``model/weights.npy``); no single file holds the whole model.

Before each iteration's releases every agency's ledger is checked (its per-job and lifetime caps, the
spec's ``[privacy]``) and, only if every agency admits it, one ``release`` entry per agency records the
iteration's Gaussian mechanism (``vertical-gradient``: sensitivity sqrt(K + 1) D, std sigma sqrt(K + 1) D,
``docs/vertical.md``). An agency that would cross a cap records a refusal and the job stops: nothing
more is released. Every agency's records influence every release (the residual mixes all blocks and
the labels), so every ledger records every iteration.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from agencyfl.alignment.runs import COORDINATOR_KEY, align_from_spec
from agencyfl.federation.errors import JobStopped
from agencyfl.federation.fairness import card_fields, count_groups, group_labels, household_totals, layout, pooled_total
from agencyfl.federation.fairness import sensitivity as fairness_sensitivity
from agencyfl.federation.fingerprint import file_fingerprint
from agencyfl.federation.spec import FairnessSection, LoadedVerticalSpec
from agencyfl.privacy.accounting import StepRecord, epsilon_for
from agencyfl.privacy.budget import BudgetDecision, check_round
from agencyfl.privacy.events import EVENT_FORMAT, NEIGHBOURING, GaussianEvent
from agencyfl.privacy.keys import load_or_create_signing_key
from agencyfl.privacy.ledger import Ledger, LedgerEvent, now_utc, spend_records
from agencyfl.server.model_card import CardAgency, ModelCard
from agencyfl.vertical.encoding import WORKDIR_SPEC, LabelData, feature_block, label_block, register_frame
from agencyfl.vertical.evidence import RECEIPTS
from agencyfl.vertical.model import INTERCEPT, register_vertical
from agencyfl.vertical.plan import VerticalPlan
from agencyfl.vertical.protocol import FeatureHolder, LabelHolder
from agencyfl.vertical.train import VerticalResult, train_vertical

Release = Literal["vertical-gradient", "vertical-hessian", "fairness"]


def release_mechanism(loaded: LoadedVerticalSpec, plan: VerticalPlan, release: Release) -> tuple[float, GaussianEvent]:
    """The noise multiplier and mechanism of one release of a vertical job: the fairness counts', the
    Hessian's, or an iteration's."""
    fairness = loaded.spec.fairness
    if release == "fairness" and fairness is not None:
        return fairness.noise_multiplier, fairness_event(fairness)
    if release == "vertical-hessian":
        return plan.noise_multiplier, plan.hessian_event()
    return plan.noise_multiplier, plan.iteration_event()


def ledger_entry(
    loaded: LoadedVerticalSpec,
    plan: VerticalPlan,
    job: str,
    agency: str,
    iteration: int,
    kind: Literal["release", "refusal"],
    epsilons: tuple[float, float],
    reason: str | None,
    release: Release = "vertical-gradient",
) -> LedgerEvent:
    """One agency's ledger entry for a release of a vertical job (or its refusal); ``epsilons``: job, lifetime."""
    spec = loaded.spec
    noise, mechanism = release_mechanism(loaded, plan, release)
    return LedgerEvent(
        kind=kind,
        agency=agency,
        job=job,
        round=iteration,
        noise_multiplier=noise,
        sample_rate=1.0,
        steps=0 if kind == "refusal" else 1,
        max_grad_norm=mechanism.sensitivity,
        delta=spec.privacy.delta,
        epsilon_job=epsilons[0],
        epsilon_lifetime=epsilons[1],
        epsilon_job_cap=spec.privacy.epsilon,
        budget=spec.privacy.budget,
        dataset=loaded.sha256,
        time=now_utc(),
        reason=reason,
        federation=spec.federation.name,
        release=None if kind == "refusal" else release,
        mechanism=None if kind == "refusal" else mechanism,
        mechanism_format=EVENT_FORMAT,
        neighbouring=NEIGHBOURING,
    )


def _decide(
    ledger: Ledger, loaded: LoadedVerticalSpec, plan: VerticalPlan, job: str, iteration: int, release: Release
) -> tuple[list[LedgerEvent], BudgetDecision, str]:
    """What one agency's caps say about the release (its ledger verified first), and what it is called."""
    privacy, fairness = loaded.spec.privacy, loaded.spec.fairness
    if release == "fairness" and fairness is not None:
        planned, what = StepRecord(fairness.noise_multiplier, 1.0, 1), "the fairness counts"
    elif release == "vertical-hessian":
        planned, what = StepRecord(plan.noise_multiplier, 1.0, 1), "the Hessian release"
    else:  # each release is checked as it comes (an entry's epsilon is what was spent up to it)
        planned, what = StepRecord(plan.noise_multiplier, 1.0, 1), f"iteration {iteration}"
    events = ledger.events()  # verifies: a ledger that does not verify stops the job
    return events, check_round(events, job, planned, privacy.delta, privacy.epsilon, privacy.budget), what


def _record_refusal(
    ledger: Ledger, loaded: LoadedVerticalSpec, plan: VerticalPlan, job: str, agency: str, iteration: int,
    release: Release, events: list[LedgerEvent], decision: BudgetDecision, what: str,
) -> str:  # fmt: skip
    delta = loaded.spec.privacy.delta
    epsilons = (epsilon_for(spend_records(events, job), delta), epsilon_for(spend_records(events), delta))
    reason = f"vertical {what} refused: {decision.reason}"
    ledger.append(ledger_entry(loaded, plan, job, agency, iteration, "refusal", epsilons, reason, release))
    return f"{agency}'s ledger refused {what}: {decision.reason}"


def admit(
    ledger: Ledger,
    loaded: LoadedVerticalSpec,
    plan: VerticalPlan,
    job: str,
    agency: str,
    iteration: int,
    release: Release = "vertical-gradient",
    reuse: bool = False,
) -> LedgerEvent:
    """Admit one release at one agency (a deployment: each agency its own), recorded before anything leaves.

    ``reuse``: the coordinator's signed plan says iteration ``iteration`` of this (resumed) job was never
    released; if this ledger already admitted it with the mechanism the plan now releases, that entry is
    returned and nothing is recorded again. An admission of other noise (the job began under another
    calibration, e.g. before the exact accounting) is not reused: the release is admitted again.

    Raises
    ------
    JobStopped
        If the agency's caps refuse it (the refusal is recorded).
    """
    if reuse:
        _, mechanism = release_mechanism(loaded, plan, release)
        for event in ledger.events():
            if (
                event.kind == "release" and event.job == job and event.round == iteration
                and event.release == release and event.mechanism == mechanism
            ):  # fmt: skip
                return event
    events, decision, what = _decide(ledger, loaded, plan, job, iteration, release)
    if not decision.allowed:
        raise JobStopped(_record_refusal(ledger, loaded, plan, job, agency, iteration, release, events, decision, what))
    epsilons = (decision.epsilon_job_after, decision.epsilon_lifetime_after)
    entry = ledger_entry(loaded, plan, job, agency, iteration, "release", epsilons, None, release)
    ledger.append(entry)
    return entry


@dataclass
class AgencyLedgers:
    """Every agency's own ledger, opened with its own key, for one vertical job on one machine."""

    loaded: LoadedVerticalSpec
    workdir: Path
    job: str
    plan: VerticalPlan

    def __post_init__(self) -> None:
        self.ledgers = {
            a.name: Ledger(
                self.workdir / a.name / "ledger",
                load_or_create_signing_key(self.workdir / a.name / "keys" / "ledger-signing.key"),
                party=a.name,
            )
            for a in self.loaded.spec.agencies
        }

    def account(self, iteration: int, release: Release = "vertical-gradient") -> None:
        """Admit a release (iteration ``iteration``'s gradients, or the fairness counts) at every agency,
        recording it in each ledger before anything is released; only if every agency admits it.

        Raises
        ------
        JobStopped
            If an agency's caps refuse it (its refusal is recorded; no ledger records the release).
        """
        loaded, plan, job = self.loaded, self.plan, self.job
        decisions = {n: _decide(ledger, loaded, plan, job, iteration, release) for n, ledger in self.ledgers.items()}
        refused = [name for name, (_, decision, _) in decisions.items() if not decision.allowed]
        if refused:
            reasons = [
                _record_refusal(self.ledgers[name], loaded, plan, job, name, iteration, release, *decisions[name])
                for name in refused
            ]
            raise JobStopped(reasons[0])
        for name, (_, decision, _) in decisions.items():
            epsilons = (decision.epsilon_job_after, decision.epsilon_lifetime_after)
            self.ledgers[name].append(
                ledger_entry(loaded, plan, job, name, iteration, "release", epsilons, None, release)
            )

    def epsilons(self) -> dict[str, dict[str, Any]]:
        """Each agency's job and lifetime epsilon, recomputed from its ledger."""
        delta = self.loaded.spec.privacy.delta
        out: dict[str, dict[str, Any]] = {}
        for name, ledger in self.ledgers.items():
            events = ledger.events()
            out[name] = {
                "epsilon_job": epsilon_for(spend_records(events, self.job), delta),
                "epsilon_lifetime": epsilon_for(spend_records(events), delta),
                "ledger": str(ledger.directory),
            }
        return out


def new_vertical_job() -> str:
    """A job id: UTC time and 4 random hex digits."""
    return f"vjob-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(2)}"


AUC_BINS = 10
"""Score bins of the validation histogram the card's AUC is computed from (released with the fairness counts)."""


def fairness_event(section: FairnessSection) -> GaussianEvent:
    """The fairness counts' release: one Gaussian mechanism on the flat counts (``federation.fairness``) and,
    in a vertical job, the validation households' score histogram by label (one more cell per household)."""
    sens = math.sqrt(fairness_sensitivity(section) ** 2 + 1)
    return GaussianEvent(sensitivity=sens, std=section.noise_multiplier * sens)


def score_histogram(scores: npt.NDArray[np.float64], y: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Counts of (label, score bin): row 0 the negatives, row 1 the positives, ``AUC_BINS`` bins on [0, 1]."""
    bins = np.minimum((np.clip(scores, 0.0, 1.0) * AUC_BINS).astype(np.int64), AUC_BINS - 1)
    counts = np.zeros((2, AUC_BINS), dtype=np.float64)
    np.add.at(counts, (np.asarray(y, dtype=np.int64), bins), 1.0)
    return counts


def histogram_auc(counts: npt.NDArray[np.float64]) -> float | None:
    """The AUC of binned scores (ties within a bin count one half), negative noisy counts read as 0; None
    when a label has no count left."""
    negatives, positives = np.clip(counts[0], 0.0, None), np.clip(counts[1], 0.0, None)
    below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])
    pairs = float(positives.sum() * negatives.sum())
    return float((positives * (below + 0.5 * negatives)).sum() / pairs) if pairs > 0 else None


def plan_of(loaded: LoadedVerticalSpec) -> VerticalPlan:
    """The job's public plan from the spec: T = ``training.rounds`` iterations at the per-job epsilon,
    with the fairness counts' release (when ``[fairness]`` noises them) inside the same epsilon, and
    ``training.damping`` when the spec sets it."""
    spec = loaded.spec
    fairness = spec.fairness
    releases = (fairness.noise_multiplier,) if fairness is not None and fairness.noise_multiplier > 0 else ()
    set_in_spec = {} if spec.training.damping is None else {"damping": spec.training.damping}
    return VerticalPlan.model_validate(
        {"agencies": len(spec.agencies), "iterations": spec.training.rounds, "epsilon": spec.privacy.epsilon,
         "delta": spec.privacy.delta, "releases": releases, **set_in_spec}
    )  # fmt: skip


def release_fairness(
    loaded: LoadedVerticalSpec, workdir: Path, ledgers: AgencyLedgers, result: VerticalResult, labels: LabelData,
    rng: np.random.Generator | None = None,
) -> ValidationRelease:  # fmt: skip
    """The card's fairness table from civil affairs' validation households, scored through the encrypted path.

    Civil affairs counts, per group of the attributes it holds, the confusion cells at the threshold; the
    counts depend on every agency's records (through the scores) and on its labels, so the Gaussian-noised
    release is admitted by and recorded in every agency's ledger before it leaves civil affairs. With
    ``noise_multiplier = 0`` nothing is released (exact counts never leave).
    """
    return fairness_release(
        loaded, lambda: register_frame(loaded, workdir), labels, result.validation_logits,
        lambda: ledgers.account(len(result.events) + 1, release="fairness"), rng,
    )  # fmt: skip


@dataclass(frozen=True)
class ValidationRelease:
    """What civil affairs releases about its validation households: the card's fairness fields, the AUC and
    the size pooled from the noised totals (None when nothing noised is released: exact values never leave),
    and otherwise why not."""

    card: dict[str, Any]
    auc: float | None
    households: int | None = None
    withheld: str = ""


def fairness_release(
    loaded: LoadedVerticalSpec,
    frame: Callable[[], pd.DataFrame],
    labels: LabelData,
    logits: npt.NDArray[np.float64],
    account: Callable[[], None],
    rng: np.random.Generator | None = None,
) -> ValidationRelease:
    """The card's fairness fields and validation AUC at civil affairs: ``frame`` its register frame,
    ``logits`` the model's scores of its validation households, ``account`` admits the release in the
    ledgers (JobStopped: nothing released). The AUC rides on the fairness counts' release: the same
    Gaussian mechanism over the counts and a score histogram by label (``fairness_event``)."""
    spec = loaded.spec
    section = spec.fairness
    holder = spec.label_agency.name

    def withheld(reason: str) -> ValidationRelease:
        fields = {} if section is None else card_fields(None, section, spec.schema_, {holder: reason})
        return ValidationRelease(fields, None, None, reason)

    if section is None:
        return withheld("no [fairness] section: nothing about the validation households is released")
    if section.noise_multiplier == 0:
        return withheld("exact counts are not released: set [fairness] noise_multiplier > 0")
    own = {f.name for f in spec.block_schema(holder).features}
    absent = [a for a in section.attributes if a not in own]
    if absent:
        return withheld(f"{absent!r} are not held by {holder}")
    validation = frame().loc[labels.validation].reset_index(drop=True)
    lay = layout(section, spec.schema_)
    scores = 1 / (1 + np.exp(-logits))
    y = labels.y[labels.validation]
    counts = count_groups(scores, y, group_labels(validation, section, spec.schema_), lay, section.threshold)
    histogram = score_histogram(scores, y)
    try:
        account()
    except JobStopped as exc:
        return withheld(str(exc))
    noise = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    std = fairness_event(section).std
    noisy = counts + noise.normal(0.0, std, size=counts.shape)
    released = histogram + noise.normal(0.0, std, size=histogram.shape)
    auc = histogram_auc(released)
    fields = card_fields(noisy, section, spec.schema_, {holder: "released (noised)"})
    # the noised count, never the exact one: every attribute's cells and the histogram sum to it, each with
    # independent noise, so their inverse-variance mean (post-processing, no extra release) is unbiased
    # and tighter than the histogram alone (whose bins, clipped at 0, read high: the cause of a failed test)
    estimates = [*household_totals(noisy, lay), (float(released.sum()), released.size)]
    size = max(0, int(round(pooled_total(estimates))))
    return ValidationRelease(fields, auc, size, "" if auc is not None else "the noised histogram left no pair")


def card_metrics_source(loaded: LoadedVerticalSpec, released: ValidationRelease) -> str:
    """What the card's metrics are: a noised release, or why there is no AUC."""
    holder = loaded.spec.label_agency.name
    if released.auc is None:
        return f"{holder}'s validation households: no AUC released ({released.withheld}; the exact one stays there)"
    return (f"{holder}'s validation households, scored through the encrypted path: AUC and size of a "
            f"Gaussian-noised score histogram ({AUC_BINS} bins by label), released with the fairness "
            "counts")  # fmt: skip


def card_metrics(released: ValidationRelease) -> dict[str, float]:
    """The card's metrics: only what was released with noise."""
    if released.auc is None or released.households is None:
        return {}
    return {"auc": released.auc, "n": float(released.households)}


def vertical_card(
    loaded: LoadedVerticalSpec,
    workdir: Path,
    job: str,
    plan: VerticalPlan,
    epsilons: dict[str, dict[str, Any]],
    result: VerticalResult,
    released: ValidationRelease,
) -> ModelCard:
    """The model card of a vertical job (the registry fills version, spec and inputs); its AUC is the one
    released with noise (``fairness_release``), never the exact one, which stays with civil affairs."""
    spec = loaded.spec
    agencies = [
        CardAgency(
            name=a.name, epsilon=epsilons[a.name]["epsilon_job"], epsilon_lifetime=epsilons[a.name]["epsilon_lifetime"],
            delta=spec.privacy.delta, rounds_trained=len(result.events), refusals=0,
            dataset_sha256=file_fingerprint(loaded.data_path(a.name)),
        )
        for a in spec.agencies
    ]  # fmt: skip
    return ModelCard(
        job=job,
        topology="vertical",
        agencies=agencies,
        metrics=card_metrics(released),
        metrics_source=card_metrics_source(loaded, released),
        rounds_aggregated=len(result.events),
        secure_aggregation=False,
        model_sha256="",
        coordinator_ledger=str(workdir / "coordinator" / "runs-ledger"),
        disclosures={a.name: a.explain for a in spec.agencies},
    )


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None  # NaN is not JSON


def replay_paths(result: VerticalResult, evidence: dict[str, Path]) -> dict[str, Any]:
    """Where each agency's evidence and the receipts of the job are: the arguments of ``audit replay``."""
    folders = {n: str(evidence[n]) for n, p in result.parties.items()
               if isinstance(p, FeatureHolder) and p.evidence is not None}  # fmt: skip  # every key of the job
    label = next(n for n, p in result.parties.items() if isinstance(p, LabelHolder))
    return {"agencies": folders, "receipts": [str(evidence[label] / RECEIPTS), str(evidence["arbiter"] / RECEIPTS)]}


def run_vertical(
    loaded: LoadedVerticalSpec,
    workdir: Path,
    job: str | None = None,
    on_iteration: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Align and train a vertical federation on this machine; returns the run summary (as horizontal runs).

    Raises
    ------
    AlignmentError, DataFileError
        If alignment fails (nothing trained).
    JobStopped
        If an agency's ledger refuses an iteration (what was released before stays accounted).
    """
    spec = loaded.spec
    job = job or new_vertical_job()
    alignment, _ = align_from_spec(loaded, workdir)
    others = [a.name for a in spec.agencies if a.name != spec.label_agency.name]
    features = [feature_block(loaded, name, workdir) for name in others]
    label, labels = label_block(loaded, workdir)
    plan = plan_of(loaded)
    ledgers = AgencyLedgers(loaded, workdir, job, plan)

    def account(iteration: int) -> None:
        ledgers.account(iteration, "vertical-hessian" if iteration == 0 else "vertical-gradient")
        if on_iteration is not None and iteration > 0:
            on_iteration(iteration, plan.iterations)

    # what an audit needs to replay each agency's products (docs/vertical.md, "Accountability"), each in its
    # party's own folder
    evidence = {a.name: workdir / a.name / "evidence" / job for a in spec.agencies}
    evidence["arbiter"] = workdir / "coordinator" / "evidence" / job
    # signed with the ledger keys an auditor already holds: civil affairs' and the coordinator's
    signers = {label.agency: load_or_create_signing_key(workdir / label.agency / "keys" / "ledger-signing.key"),
               "arbiter": load_or_create_signing_key(workdir / COORDINATOR_KEY)}  # fmt: skip
    result: VerticalResult = train_vertical(features, label, labels, plan, before_release=account, evidence=evidence,
                                            receipt_keys=signers)  # fmt: skip
    models = {}
    for name, weights in result.weights.items():
        folder = workdir / name / "model"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        np.save(folder / "weights.npy", weights)  # this agency's block only (the latest job's)
        models[name] = str(folder / "weights.npy")
    inputs = {block.agency: list(block.names) for block in features}
    inputs[label.agency] = [*label.names, INTERCEPT]
    released = release_fairness(loaded, workdir, ledgers, result, labels)
    epsilons = ledgers.epsilons()
    card = vertical_card(loaded, workdir, job, plan, epsilons, result, released)
    card = card.model_copy(update=released.card)
    version = register_vertical(workdir, loaded, result.weights, inputs, card, plan.score_clip)
    summary: dict[str, Any] = {
        "job": job,
        "topology": "vertical",
        "federation": spec.federation.name,
        "rounds_planned": plan.iterations,
        "rounds_aggregated": len(result.events),
        "alignment": {"register": alignment.view.register_size,
                      "matched": {n: a.matched for n, a in alignment.agencies.items()}},
        "agencies": {name: {**epsilons[name], "model_block": models[name]} for name in epsilons},
        # the released (noised) AUC; the exact one is civil affairs' own, shown only because every party is on
        # this machine (a deployment's summary never holds it)
        "metrics": {"validation_auc": released.auc, "validation_auc_exact_one_machine": _finite(result.validation_auc)},
        "noise_multiplier": plan.noise_multiplier,
        "sensitivity": plan.sensitivity,
        "optimizer": plan.optimizer,
        "plan": plan.public_fields(),  # the order, averaging, learning rate and damping the model was made with
        "hessian": None if result.hessian is None else {
            "sensitivity": plan.hessian_sensitivity, "seconds": result.hessian.seconds,
            "bytes": result.hessian.sent_bytes},
        "seconds_per_iteration": float(np.mean([i.seconds for i in result.iterations])),
        "bytes_per_iteration": {k: float(np.mean([i.sent_bytes[k] for i in result.iterations]))
                                for k in result.iterations[0].sent_bytes},
        "model": {name: models[name] for name in models},
        "evidence": replay_paths(result, evidence),
        "model_version": f"{spec.federation.name}/{version.name}",
        "registry": str(version),
    }  # fmt: skip
    # Which spec this workdir's parties were set up with: screening finds each party's files through it.
    (workdir / WORKDIR_SPEC).write_text(json.dumps({"spec": str(loaded.path.resolve())}) + "\n")
    (workdir / "runs" / job).mkdir(parents=True, exist_ok=True)
    (workdir / "runs" / job / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
