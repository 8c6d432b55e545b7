"""The coordinator's side of a deployed vertical job: the arbiter, the relay and the chain, over the streams.

``drive`` runs the iterations of ``docs/vertical.md`` with every agency on its own stream
(``vertical.stream``): it relays the sealed envelopes (it cannot open them), holds the CKKS secret key
as the arbiter, releases an iteration only after every agency's ledger admitted it and its own chain
recorded the iteration, and registers the manifest and card at the end. The ServerApp
(``server.vertical_run``) starts the hub and the job through Flower; the tests drive it in process.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agencyfl.alignment.sealed import unpack
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.errors import AgencyflError, JobStopped, MessageRejectedError
from agencyfl.federation.spec import LoadedVerticalSpec
from agencyfl.privacy.coordinator_ledger import AgencyReport, RoundSummary
from agencyfl.privacy.ledger import Ledger, now_utc
from agencyfl.server.model_card import CardAgency, ModelCard
from agencyfl.vertical.evidence import RECEIPTS, Receipts
from agencyfl.vertical.job import ValidationRelease, card_metrics, card_metrics_source
from agencyfl.vertical.model import ModelPart, new_version, register_parts
from agencyfl.vertical.optim import joint_scale, sweep_starts_fresh
from agencyfl.vertical.plan import VerticalPlan
from agencyfl.vertical.protocol import Arbiter, GradientMessage
from agencyfl.vertical.remote import VerticalJobPlan, verify_hello
from agencyfl.vertical.stream import Authenticate, Frame, StreamHub

EventSink = Callable[[dict[str, Any]], None]
STEP_TIMEOUT = 600.0


def block_widths(loaded: LoadedVerticalSpec) -> dict[str, int]:
    """Each party's number of weights, from the spec alone (inputs, not-held, civil affairs' intercept)."""
    spec = loaded.spec
    holder = spec.label_agency.name
    return {
        a.name: len(FeatureEncoder(spec.block_schema(a.name)).names) + 1 + (a.name == holder) for a in spec.agencies
    }


def authenticator(job: str, challenges: dict[str, bytes], node_keys: dict[str, str]) -> Authenticate:
    """The hub's check of a hello: a party of ``job``, signed with the node key registered for it over the
    challenge sent to its node (``challenges``); each challenge opens one stream only."""
    used: set[str] = set()
    lock = threading.Lock()

    def check(hello: Frame) -> str:
        agency, claimed = hello.fields.get("agency"), hello.fields.get("job")
        if not isinstance(agency, str) or agency not in challenges:
            raise MessageRejectedError(f"{str(agency)[:40]!r} is not a party of job {job}")
        if claimed != job:
            raise MessageRejectedError(f"{agency}'s hello is for job {str(claimed)[:80]!r}, not {job}")
        if len(hello.blobs) != 2:
            raise MessageRejectedError(f"{agency}'s hello must carry a signature and its run keys' certificate")
        key = node_keys.get(agency)
        if not key:
            raise MessageRejectedError(f"no SuperNode key is registered for {agency} (`coordinator register`)")
        verify_hello(key, hello.blobs[0], job, agency, challenges[agency])
        with lock:
            if agency in used:
                raise MessageRejectedError(f"{agency}'s challenge was used already: a stream opens once")
            used.add(agency)
        return agency

    return check


@dataclass
class DriverSettings:
    """What the coordinator needs to drive one job."""

    loaded: LoadedVerticalSpec
    plan: VerticalPlan
    job: VerticalJobPlan
    workdir: Path  # the coordinator's work folder: registry/ and runs/JOB/
    chain: Ledger[RoundSummary]  # its countersigned chain (work/coordinator/ledger)
    receipts_key: Ed25519PrivateKey  # its ledger key, signing the arbiter's receipts (``audit replay``)
    connect_timeout: float = 600.0
    step_timeout: float = STEP_TIMEOUT
    noise_rng: np.random.Generator | None = None  # the arbiter's DP noise (inject only to reproduce in tests)
    resume: bool = False  # continue the job from the last iteration every party checkpointed

    @property
    def run_dir(self) -> Path:
        return self.workdir / "runs" / self.job.job


@dataclass
class _Traffic:
    """Bytes each party sent in the current iteration (blobs of its replies)."""

    sent: dict[str, int] = field(default_factory=dict)

    def add(self, replies: dict[str, Frame]) -> dict[str, Frame]:
        for party, frame in replies.items():
            self.sent[party] = self.sent.get(party, 0) + frame.nbytes
        return replies


def _envelopes(replies: dict[str, Frame], allowed: set[str]) -> dict[str, list[bytes]]:
    """The sealed envelopes each party addressed, by recipient; refuses one from or to the wrong party."""
    out: dict[str, list[bytes]] = {}
    for party, frame in replies.items():
        for blob in frame.blobs:
            envelope = unpack(blob)
            if envelope.sender != party or envelope.recipient not in allowed:
                raise MessageRejectedError(
                    f"{party} sent an envelope from {envelope.sender!r} to {envelope.recipient!r}: not relayed"
                )
            out.setdefault(envelope.recipient, []).append(blob)
    return out


def drive(hub: StreamHub, settings: DriverSettings, sink: EventSink) -> dict[str, Any]:
    """Run the job on the parties' streams; returns the summary (also written to ``runs/JOB/summary.json``).

    Raises
    ------
    AgencyflError
        A party's refusal (JobStopped: a ledger refused; exit 7) or failure, a party that dropped
        (PartyDropped, exit 10). Every other party is told to stop; nothing more is released.
    """
    job, plan, loaded = settings.job, settings.plan, settings.loaded
    holder = job.label_holder
    features = [p for p in job.parties if p != holder]
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"job": job.job, "topology": "vertical", "deployment": True,
                               "federation": job.federation, "rounds_planned": job.iterations,
                               "status": "started"}  # fmt: skip
    done, seconds, traffic_log = 0, [], []
    epsilons: dict[str, dict[str, float]] = {}
    try:
        hellos = hub.wait_for_all(settings.connect_timeout)
        checkpoints = {p: int(h.fields.get("checkpoint", 0)) for p, h in hellos.items()}
        resume_from = min(checkpoints.values()) if settings.resume else 0
        released = _released_through(settings.chain, job.job) if settings.resume else 0
        done = resume_from
        summary["resumed_from"] = resume_from
        sink({"type": "connected", "parties": sorted(hellos), "resumed_from": resume_from})
        arbiter = Arbiter(
            block_widths(loaded), plan.noise_std / job.register_size,
            settings.noise_rng if settings.noise_rng is not None else np.random.default_rng(secrets.randbits(128)),
            hessian_std=plan.hessian_std(job.register_size) if plan.releases_hessian else 0.0,
            label_holder=job.label_holder if plan.shapes_noise else None,
        )  # fmt: skip
        context = arbiter.public_context()
        receipts = settings.workdir / "evidence" / job.job / RECEIPTS  # for `audit replay`
        arbiter.receipts = Receipts(receipts, arbiter.name, context, settings.receipts_key, job.label_holder, job.job)
        names = list(hellos)
        # resumed before any party checkpointed an iteration but after the Hessian release reached every party:
        # each restores its own copy instead of a second release (which the job's sigma has no room for)
        restore = bool(settings.resume and plan.releases_hessian and resume_from == 0
                       and all(h.fields.get("hessian") is True for h in hellos.values()))  # fmt: skip
        setup = Frame(
            "setup", {"certificates": names, "resume_from": resume_from, "released_through": released,
                      "resumed": settings.resume, "restore_hessian": restore},
            [context, *(hellos[n].blobs[1] for n in names)],
        )  # fmt: skip
        hub.call_all({p: setup for p in job.parties}, settings.step_timeout)
        timeout = settings.step_timeout
        if plan.releases_hessian and resume_from == 0 and not restore:  # else each restored its own copy
            epsilons = _hessian(hub, arbiter, settings, features)
            sink({"type": "hessian", "epsilon": {p: e["epsilon_job"] for p, e in epsilons.items()}})
        factor = 1.0
        for iteration in range(resume_from + 1, job.iterations + 1):
            start, traffic = time.perf_counter(), _Traffic()
            if plan.order == "sequential":  # each agency's scores of the last sweep hold unless rescaled
                fresh = sweep_starts_fresh(iteration, resume_from + 1, factor)
                reports, norms = _sweep(hub, arbiter, settings, iteration, traffic, fresh)
            else:
                reports, norms = _iteration(hub, arbiter, settings, iteration, traffic)
            factor = 1.0
            if plan.projection == "joint":
                factor = joint_scale([float(norms[p].fields["squared_norm"]) for p in job.parties], plan.weight_bound)
            hub.call_all({p: Frame("rescale", {"factor": factor, "iteration": iteration}) for p in job.parties},
                         timeout)  # fmt: skip
            done = iteration
            seconds.append(time.perf_counter() - start)
            traffic_log.append(traffic.sent)
            epsilons = {
                r.agency: {"epsilon_job": r.epsilon_job, "epsilon_lifetime": r.epsilon_lifetime} for r in reports
            }
            sink({"type": "iteration", "round": iteration, "seconds": round(seconds[-1], 3), "bytes": traffic.sent,
                  "epsilon": {p: e["epsilon_job"] for p, e in epsilons.items()}})  # fmt: skip
        _validate(hub, arbiter, settings, features)
        validation = _fairness(hub, settings, job.iterations + 1)
        version = new_version(settings.workdir, loaded)
        finished = hub.call_all({p: Frame("finish", {"version": version.name}) for p in job.parties}, timeout)
        parts = {
            p: ModelPart(holder=p, path=str(f.fields["path"]), inputs=list(f.fields["inputs"]),
                         sha256=str(f.fields["sha256"]))
            for p, f in finished.items()
        }  # fmt: skip
        card = _card(settings, finished, validation, done).model_copy(update=validation.card)
        register_parts(version, loaded, parts, card, plan.score_clip)
    except BaseException as exc:
        # only the class travels: one party's message is no business of the others
        hub.end(Frame("abort", {"reason": f"stopped at the coordinator ({type(exc).__name__})"}))
        summary.update(status="stopped", iterations_done=done,
                       error={"class": type(exc).__name__, "message": str(exc)})  # fmt: skip
        _write(settings.run_dir / "summary.json", summary)
        sink({"type": "failed", "error": type(exc).__name__, "message": str(exc), "iterations_done": done})
        if not isinstance(exc, AgencyflError):
            raise
        raise
    hub.end(Frame("end"))
    summary.update(
        status="registered", rounds_aggregated=done, metrics={"validation_auc": validation.auc},
        agencies={p: {"epsilon_job": float(f.fields["epsilon_job"]),
                      "epsilon_lifetime": float(f.fields["epsilon_lifetime"]),
                      "model_block": f"{p}:{f.fields['path']}"} for p, f in finished.items()},
        noise_multiplier=plan.noise_multiplier, sensitivity=plan.sensitivity, plan=plan.public_fields(),
        seconds_per_iteration=float(np.mean(seconds)) if seconds else 0.0,
        bytes_per_iteration={p: float(np.mean([t.get(p, 0) for t in traffic_log])) for p in job.parties}
        if traffic_log else {},
        model=f"{job.federation}/{version.name}", model_version=f"{job.federation}/{version.name}",
        registry=str(version),
    )  # fmt: skip
    _write(settings.run_dir / "summary.json", summary)
    sink({"type": "done", "model": summary["model"]})
    return summary


def _countersign(settings: DriverSettings, iteration: int, reports: list[AgencyReport], digest: str) -> None:
    """The iteration's summary on the coordinator's chain: countersigned before anything of it is released."""
    job = settings.job
    settings.chain.append(RoundSummary(
        kind="round", federation=job.federation, job=job.job, round=iteration, spec_sha256=job.spec_sha256,
        aggregated=True, agencies=reports, model_sha256=digest, time=now_utc(),
    ))  # fmt: skip


def _iteration(
    hub: StreamHub, arbiter: Arbiter, settings: DriverSettings, iteration: int, traffic: _Traffic
) -> tuple[list[AgencyReport], dict[str, Frame]]:
    """One simultaneous iteration: every agency's scores, one residual, every party's masked gradient (each
    ledger admits it first), the chain's countersignature, the releases. Returns the reports and the replies
    to the releases (each party's squared norm)."""
    job, timeout = settings.job, settings.step_timeout
    holder = job.label_holder
    features = [p for p in job.parties if p != holder]
    partials = _envelopes(traffic.add(hub.call_all({p: Frame("partial") for p in features}, timeout)), {holder})
    residuals = _envelopes(
        traffic.add({holder: hub.call(holder, Frame("residuals", blobs=partials.get(holder, [])), timeout)}),
        set(features),
    )
    asked = {p: Frame("gradient", {"iteration": iteration}, residuals.get(p, [])) for p in features}
    asked[holder] = Frame("gradient", {"iteration": iteration})
    gradients = traffic.add(hub.call_all(asked, timeout))  # each ledger admitted the iteration first
    digest = hashlib.sha256(b"".join(b for p in job.parties for b in gradients[p].blobs)).hexdigest()
    reports = _reports(gradients, job.parties)
    _countersign(settings, iteration, reports, digest)
    order = [*features, holder]  # the one-machine order of the arbiter's noise draws (tests compare)
    noised = arbiter.release_iteration({p: GradientMessage(p, gradients[p].blobs, _gains(gradients[p]))
                                        for p in order})  # fmt: skip
    return reports, hub.call_all({p: Frame("release", {"values": v}) for p, v in noised.items()}, timeout)


def _sweep(
    hub: StreamHub, arbiter: Arbiter, settings: DriverSettings, iteration: int, traffic: _Traffic, fresh: bool
) -> tuple[list[AgencyReport], dict[str, Frame]]:
    """One sequential sweep (``docs/vertical.md``, "Sequential sweeps"): every ledger admits the sweep first, and
    the chain countersigns it just before its first release (a drop before then leaves it unreleased; after,
    it counts on resume, even for the parties whose turn never came); each party in turn (the agencies in spec order,
    then civil affairs: the one-machine order) gets its residual from civil affairs, sends its masked
    gradient, takes its noised release, and an agency sends civil affairs its new scores. Every agency sends its
    scores first only when ``fresh`` (the session's first sweep, or the last projection rescaled)."""
    job, timeout = settings.job, settings.step_timeout
    holder = job.label_holder
    features = [p for p in job.parties if p != holder]
    order = [*features, holder]
    admitted = hub.call_all({p: Frame("admit", {"iteration": iteration}) for p in job.parties}, timeout)
    reports = _reports(admitted, job.parties)
    stds = arbiter.set_stds({p: _gains(admitted[p]) for p in order})
    sweep = {"iteration": iteration}
    if fresh:
        asked = {p: Frame("partial") for p in features}
        partials = _envelopes(traffic.add(hub.call_all(asked, timeout)), {holder})
        hub.call(holder, Frame("partials", sweep, partials.get(holder, [])), timeout)
    norms: dict[str, Frame] = {}
    for party in order:
        residual = traffic.add({holder: hub.call(holder, Frame("residual", sweep | {"to": party}), timeout)})
        blobs = _envelopes(residual, {party} - {holder}).get(party, [])
        gradient = traffic.add({party: hub.call(party, Frame("gradient", sweep, blobs), timeout)})[party]
        if party == order[0]:  # countersigned just before the sweep's first release, as an iteration's
            digest = hashlib.sha256(b"".join(gradient.blobs)).hexdigest()
            _countersign(settings, iteration, reports, digest)
        values = arbiter.release(GradientMessage(party, gradient.blobs), stds[party])
        norms[party] = hub.call(party, Frame("release", {"values": values}), timeout)
        if party != holder:
            scores = _envelopes(traffic.add({party: hub.call(party, Frame("partial"), timeout)}), {holder})
            hub.call(holder, Frame("partials", sweep, scores.get(holder, [])), timeout)
    return reports, norms


def _gains(reply: Frame) -> tuple[float, ...]:
    """The gains a party reported with its gradient: a list of at most two numbers (empty if none or anything
    else: the arbiter then noises every coordinate alike, which costs accuracy, never privacy)."""
    reported = reply.fields.get("gains", [])
    if not isinstance(reported, list) or len(reported) > 2:
        return ()
    if not all(isinstance(g, int | float) and not isinstance(g, bool) for g in reported):
        return ()
    try:
        return tuple(float(g) for g in reported)
    except OverflowError:  # a JSON integer beyond any float
        return ()


def _rdp_figure(reply: Frame) -> float | None:
    """The lifetime by RDP alone a party reported (None if not, or not a finite non-negative number)."""
    value = reply.fields.get("epsilon_lifetime_rdp")
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < float("inf"):
        return None
    return float(value)


def _reports(replies: dict[str, Frame], parties: Sequence[str]) -> list[AgencyReport]:
    """What each party's reply says its ledger admitted (job and lifetime epsilon, its ledger's origin)."""
    return [
        AgencyReport(agency=p, status="trained", epsilon_job=float(replies[p].fields["epsilon_job"]),
                     epsilon_lifetime=float(replies[p].fields["epsilon_lifetime"]), dataset="",
                     epsilon_lifetime_rdp=_rdp_figure(replies[p]), origin=str(replies[p].fields.get("origin", "")))
        for p in parties
    ]  # fmt: skip


def _hessian(hub: StreamHub, arbiter: Arbiter, settings: DriverSettings, features: list[str]) -> dict[str, Any]:
    """Block Newton's Hessian release (round 0 of the chain): civil affairs' sealed Enc(m c / 4) relayed to
    each feature holder, every ledger admits the release, the chain records it, then the arbiter noises and
    decrypts each masked triangle for its own party only."""
    job, holder, timeout = settings.job, settings.job.label_holder, settings.step_timeout
    weights = _envelopes({holder: hub.call(holder, Frame("hessian-weights"), timeout)}, set(features))
    asked = {p: Frame("hessian", blobs=weights.get(p, [])) for p in features}
    asked[holder] = Frame("hessian")
    masked = hub.call_all(asked, timeout)  # each ledger admitted the release first
    reports = _reports(masked, job.parties)
    digest = hashlib.sha256(b"".join(b for p in job.parties for b in masked[p].blobs)).hexdigest()
    settings.chain.append(RoundSummary(
        kind="round", federation=job.federation, job=job.job, round=0, spec_sha256=job.spec_sha256,
        aggregated=True, agencies=reports, model_sha256=digest, time=now_utc(),
    ))  # fmt: skip
    released = {
        p: arbiter.release_hessian(GradientMessage(p, masked[p].blobs), packed=p == holder) for p in [*features, holder]
    }  # the one-machine order of the noise draws
    hub.call_all({p: Frame("hessian-release", {"values": v}) for p, v in released.items()}, timeout)
    return {r.agency: {"epsilon_job": r.epsilon_job, "epsilon_lifetime": r.epsilon_lifetime} for r in reports}


def _released_through(chain: Ledger[RoundSummary], job: str) -> int:
    """The last iteration of ``job`` the chain records (recorded before its release: possibly released)."""
    return max((e.round for e in chain.events() if e.job == job and e.kind == "round"), default=0)


def _validate(hub: StreamHub, arbiter: Arbiter, settings: DriverSettings, features: list[str]) -> None:
    """Civil affairs' validation households scored through the encrypted path (the arbiter sees masked values)."""
    holder, timeout = settings.job.label_holder, settings.step_timeout
    partials = _envelopes(hub.call_all({p: Frame("partial") for p in features}, timeout), {holder})
    masked = hub.call(holder, Frame("masked-scores", blobs=partials.get(holder, [])), timeout)
    values = arbiter.decrypt_masked_scores(holder, masked.blobs)
    hub.call(holder, Frame("scores", blobs=[np.asarray(values, dtype="<f8").tobytes()]), timeout)
    # the exact AUC and count stay with civil affairs (the card gets noised ones, ``_fairness``)


def _fairness(hub: StreamHub, settings: DriverSettings, release: int) -> ValidationRelease:
    """The card's fairness fields and the validation AUC and size released with them (noised; None if
    nothing is released): admitted at every agency first when counts would be released."""
    loaded, holder = settings.loaded, settings.job.label_holder
    section = loaded.spec.fairness
    if section is None:
        return ValidationRelease({}, None, None, "no [fairness] section: nothing about the validation households "
                                 "is released")  # fmt: skip
    own = {f.name for f in loaded.spec.block_schema(holder).features}
    if section.noise_multiplier > 0 and all(a in own for a in section.attributes):
        try:
            hub.call_all({p: Frame("admit-fairness", {"iteration": release}) for p in settings.job.parties},
                         settings.step_timeout)  # fmt: skip
        except JobStopped as exc:
            from agencyfl.federation.fairness import card_fields

            reason = str(exc)
            return ValidationRelease(card_fields(None, section, loaded.spec.schema_, {holder: reason}), None, None,
                                     reason)  # fmt: skip
    reply = hub.call(holder, Frame("fairness"), settings.step_timeout)
    auc, size = reply.fields.get("auc"), reply.fields.get("n")
    return ValidationRelease(
        dict(reply.fields["card"]),
        float(auc) if isinstance(auc, float | int) and not isinstance(auc, bool) else None,
        int(size) if isinstance(size, int) and not isinstance(size, bool) else None,
        str(reply.fields.get("withheld", "")),
    )


def _card(settings: DriverSettings, finished: dict[str, Frame], released: ValidationRelease, done: int) -> ModelCard:
    spec, loaded = settings.loaded.spec, settings.loaded
    agencies = [
        CardAgency(name=p, epsilon=float(f.fields["epsilon_job"]), epsilon_lifetime=float(f.fields["epsilon_lifetime"]),
                   delta=spec.privacy.delta, rounds_trained=done, refusals=0, dataset_sha256=str(f.fields["dataset"]))
        for p, f in finished.items()
    ]  # fmt: skip
    return ModelCard(
        job=settings.job.job, topology="vertical", agencies=agencies,
        metrics=card_metrics(released), metrics_source=card_metrics_source(loaded, released),
        rounds_aggregated=done, secure_aggregation=False, model_sha256="",
        coordinator_ledger=str(settings.workdir / "coordinator" / "ledger"),
        disclosures={a.name: a.explain for a in spec.agencies}, spec_sha256=loaded.sha256,
    )  # fmt: skip


def _write(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2))
