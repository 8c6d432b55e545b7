"""The coordinator's Flower ServerApp: FedAvg over the agencies, then the model into the registry.

``make_server_app(settings, on_event)`` builds the app for any engine and records the outcome in
``settings``' run folder (``summary.json``); the module-level ``app`` (the ``[tool.flwr.app]``
component) reads its settings from the run config: ``spec`` and ``workdir``; with ``task = "align"`` it
runs a vertical spec's register alignment instead (``server.alignment_run``, ``coordinator align``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.errors import FederationError
from agencyfl.federation.messages import LedgerRecord
from agencyfl.federation.model import build_model, model_to_arrays
from agencyfl.federation.plan import JobPlan as SignedJobPlan
from agencyfl.federation.spec import LoadedSpec, LoadedVerticalSpec, load_any_spec, load_spec
from agencyfl.privacy.coordinator_ledger import AgencyReport, RoundSummary, open_coordinator_ledger, weights_sha256
from agencyfl.privacy.keys import load_or_create_signing_key
from agencyfl.privacy.ledger import now_utc
from agencyfl.privacy.plan_signature import sign_plan
from agencyfl.server.model_card import CardAgency, ModelCard
from agencyfl.server.registry import checkpoint_dir, latest_checkpoint, register_model, save_checkpoint
from agencyfl.server.secure_aggregation import AgencySecAggPlus, FastPollGrid
from agencyfl.server.strategy import AgencyFedAvg, EventSink, JobPlan, ReleasesClosed, RoundClosed, RunLog


def new_job_id() -> str:
    """A job id: UTC time and 4 random hex digits."""
    return f"job-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(2)}"


@dataclass
class ServerSettings:
    """What the coordinator needs for one job (``resume``: continue it from its last checkpoint)."""

    loaded: LoadedSpec
    workdir: Path
    job: str
    min_available: int
    connect_timeout: float = 600.0
    resume: bool = False
    ledger_key: Path | None = None  # the coordinator's signing key; default WORKDIR/coordinator/keys/

    @property
    def ledger_dir(self) -> Path:
        """The coordinator's countersigned chain of round summaries."""
        return self.workdir / "coordinator" / "ledger"

    @property
    def signing_key_path(self) -> Path:
        """The coordinator's ledger signing key (made on first use when not given)."""
        return self.ledger_key or self.workdir / "coordinator" / "keys" / "ledger-signing.key"

    @property
    def run_dir(self) -> Path:
        """Where this job's summary goes."""
        return self.workdir / "runs" / self.job

    @property
    def checkpoints(self) -> Path:
        """Where this job's per-round checkpoints go."""
        return checkpoint_dir(self.workdir / "registry", self.loaded.spec.federation.name, self.job)


def _wait_for_agencies(grid: Grid | FastPollGrid, want: int, need: int, timeout: float) -> int:
    """Wait up to ``timeout`` for ``want`` nodes; return how many came, at least ``need``.

    Flower samples a round from the nodes connected when it starts, so starting while agencies are
    still connecting would silently leave some of them out.
    """
    deadline = time.monotonic() + timeout
    while (count := len(list(grid.get_node_ids()))) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    if count < need:
        raise FederationError(f"only {count} of {want} agencies connected within {timeout:.0f} s (minimum {need})")
    return count


def known_ledgers(settings: ServerSettings) -> dict[str, LedgerRecord]:
    """Per agency, the origin of its ledger and the last lifetime epsilon it reported, from the chain.

    Only replies the coordinator accepted count, so a restarted ledger never replaces the record.

    Raises
    ------
    LedgerError
        If the coordinator's chain does not verify.
    """
    known: dict[str, LedgerRecord] = {}
    if not settings.ledger_dir.exists():
        return known
    chain = open_coordinator_ledger(settings.ledger_dir, settings.signing_key_path).events()
    for entry in chain:
        for report in entry.agencies:
            if report.accepted and report.origin:
                known[report.agency] = LedgerRecord.following(
                    known.get(report.agency), report.origin, report.epsilon_lifetime, report.epsilon_lifetime_rdp
                )
    return known


def countersigner(settings: ServerSettings) -> RoundClosed:
    """Append each closed round's summary to the coordinator's signed chain."""
    ledger = open_coordinator_ledger(settings.ledger_dir, settings.signing_key_path)

    def close(job_round: int, reports: list[AgencyReport], weights: list[Any], aggregated: bool) -> None:
        ledger.append(_round_summary(settings, "round", job_round, reports, weights, aggregated))

    return close


def _round_summary(
    settings: ServerSettings,
    kind: Literal["round", "evaluation"],
    job_round: int,
    reports: list[AgencyReport],
    weights: list[Any],
    aggregated: bool,
) -> RoundSummary:
    return RoundSummary(
        kind=kind,
        federation=settings.loaded.spec.federation.name,
        job=settings.job,
        round=job_round,
        spec_sha256=settings.loaded.sha256,
        aggregated=aggregated,
        agencies=reports,
        model_sha256=weights_sha256(weights),
        time=now_utc(),
    )


def release_countersigner(settings: ServerSettings) -> ReleasesClosed:
    """Append the final evaluation's record (which agency released what) to the coordinator's chain."""
    ledger = open_coordinator_ledger(settings.ledger_dir, settings.signing_key_path)

    def close(final_round: int, reports: list[AgencyReport], weights: list[Any]) -> None:
        ledger.append(_round_summary(settings, "evaluation", final_round, reports, weights, False))

    return close


def signed_plan(settings: ServerSettings) -> str:
    """The coordinator's signature over this job's plan: what tells an agency the coordinator started it."""
    plan = SignedJobPlan.from_spec(settings.loaded, settings.job)
    return sign_plan(plan.signed_bytes(), load_or_create_signing_key(settings.signing_key_path))


@dataclass(frozen=True)
class JobStart:
    """Where a job's run starts: the global model, the momentum buffer and the first round to run."""

    weights: list[Any]
    velocity: list[Any] | None
    first_round: int


def start_job(settings: ServerSettings) -> JobStart:
    """Phase 1: the spec's initial model (or the last checkpoint when resuming); the run folder."""
    spec = settings.loaded.spec
    model = build_model(spec.model, FeatureEncoder(spec.schema).width, seed=spec.training.seed)
    start = JobStart(model_to_arrays(model), None, 1)
    last = latest_checkpoint(settings.checkpoints) if settings.resume else None
    if last is not None:
        done, weights, velocity = last
        start = JobStart(weights, velocity, done + 1)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    (settings.run_dir / "job.json").write_text(
        json.dumps({"job": settings.job, "spec": str(settings.loaded.path), "spec_sha256": settings.loaded.sha256})
    )
    return start


def train_rounds(
    grid: FastPollGrid, context: Context, settings: ServerSettings, start: JobStart, connected: int, sink: EventSink
) -> AgencyFedAvg:
    """Phase 3 (after waiting for the agencies): the job's rounds, then the final evaluation round.

    Horizontal: Flower's workflow (SecAgg+ when the spec asks) over ``AgencyFedAvg``; the final
    model's noised validation releases come in its last evaluate round.
    """
    spec = settings.loaded.spec
    secure = spec.secure_aggregation.enabled
    plan = JobPlan(
        settings.job, spec.training.rounds, settings.loaded.sha256, spec.secure_aggregation.max_weight,
        start.first_round, spec.privacy.epsilon, signed_plan(settings),
    )  # fmt: skip
    strategy = AgencyFedAvg(
        plan,
        start.weights,
        velocity=start.velocity,
        min_agencies=spec.training.min_agencies,
        min_available=min(connected, spec.training.min_agencies),
        secure=secure,
        server_learning_rate=spec.training.server_learning_rate,
        server_momentum=spec.training.server_momentum,
        on_event=sink,
        checkpoint=lambda r, w, v: save_checkpoint(settings.checkpoints, r, w, v),
        round_closed=countersigner(settings),
        known=known_ledgers(settings),
        releases_closed=release_countersigner(settings),
    )
    remaining = spec.training.rounds - start.first_round + 1
    sink({"type": "start", "job": settings.job, "rounds": spec.training.rounds, "first_round": start.first_round})
    if remaining > 0:
        fit_workflow = (
            AgencySecAggPlus(
                len(spec.agencies),
                spec.training.min_agencies,
                spec.secure_aggregation.timeout,
                spec.secure_aggregation.max_weight,
            )
            if secure
            else None
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
        logging.getLogger("flwr").setLevel(logging.WARNING)
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)  # type: ignore[arg-type]
    strategy.log.aggregated_rounds += start.first_round - 1  # rounds aggregated before a resume
    return strategy


def run_summary(settings: ServerSettings, log: RunLog) -> dict[str, Any]:
    """The run's summary (``summary.json``): rounds, pooled metrics per round, what each agency reported."""
    spec = settings.loaded.spec
    return {
        "job": settings.job,
        "federation": spec.federation.name,
        "rounds_planned": spec.training.rounds,
        "rounds_aggregated": log.aggregated_rounds,
        "history": log.rounds,
        "agencies": {name: vars(rec) for name, rec in log.agencies.items()},
        "metrics": {k: v for k, v in log.rounds[-1].items() if k in {"auc", "accuracy", "brier", "n", "positives"}}
        if log.rounds
        else {},
        "model": None,
    }


def card_of(settings: ServerSettings, log: RunLog, weights: list[Any], metrics: dict[str, float]) -> ModelCard:
    """Phase 4a: the model card of the job's model, from what the agencies reported and released."""
    spec = settings.loaded.spec
    agencies = [
        CardAgency(
            name=name,
            epsilon=rec.epsilon_job,
            epsilon_lifetime=rec.epsilon_lifetime,
            delta=spec.privacy.delta,
            rounds_trained=rec.rounds_trained,
            refusals=rec.refusals,
            dataset_sha256=rec.dataset,
        )  # fmt: skip
        for name, rec in log.agencies.items()
    ]
    return ModelCard(
        job=settings.job,
        topology=spec.federation.topology,
        agencies=agencies,
        metrics=metrics,
        metrics_source="federated validation splits (pooled score histograms)",
        rounds_aggregated=log.aggregated_rounds,
        secure_aggregation=spec.secure_aggregation.enabled,
        model_sha256=weights_sha256(weights),
        coordinator_ledger=str(settings.ledger_dir),
        **fairness_card(settings.loaded, log),
    )


def register_job_model(settings: ServerSettings, card: ModelCard, weights: list[Any], summary: dict[str, Any]) -> Path:
    """Phase 4b: the model into the registry, and the summary beside the run."""
    path = register_model(settings.workdir / "registry", settings.loaded, weights, card)
    summary["model"] = str(path)
    summary["coordinator_ledger"] = str(settings.ledger_dir)
    (settings.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return path


def run_job(
    grid: Grid, context: Context, settings: ServerSettings, on_event: EventSink | None = None
) -> dict[str, Any]:
    """Run the job's phases on ``grid`` (start, wait, train and evaluate, register); return the summary.

    Raises
    ------
    FederationError
        If too few agencies connect, or no round produced an aggregated model.
    """
    spec = settings.loaded.spec
    sink = on_event or (lambda event: None)
    start = start_job(settings)
    fast_grid = FastPollGrid(grid, spec.secure_aggregation.timeout)
    connected = _wait_for_agencies(
        fast_grid, settings.min_available, spec.training.min_agencies, settings.connect_timeout
    )
    strategy = train_rounds(fast_grid, context, settings, start, connected, sink)
    summary = run_summary(settings, strategy.log)
    if strategy.log.aggregated_rounds == 0:
        (settings.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        raise FederationError(
            "no round aggregated a model (every round had too few trained updates); see "
            f"{settings.run_dir / 'summary.json'}"
        )
    card = card_of(settings, strategy.log, strategy.weights, summary["metrics"])
    path = register_job_model(settings, card, strategy.weights, summary)
    sink({"type": "done", "model": str(path)})
    return summary


def fairness_card(loaded: LoadedSpec, log: RunLog) -> dict[str, Any]:
    """The card's fairness table (and mitigation thresholds) from the pooled counts, if the spec asks."""
    from agencyfl.federation.fairness import card_fields

    section = loaded.spec.fairness
    if section is None:
        return {}
    return card_fields(log.fairness_counts, section, loaded.spec.schema, log.fairness_status)


def make_server_app(settings: ServerSettings, on_event: EventSink | None = None) -> ServerApp:
    """A ServerApp that runs ``run_job`` with fixed settings (used by the simulation runner)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        run_job(grid, context, settings, on_event)

    return app


app = ServerApp()
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")  # a job or alignment run id: a safe folder name


@app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    """The deployment's ServerApp: acts only on a run the coordinator's CLI authorized (``run_authorization``).

    The ledger key and the work folder come from the coordinator's folder (its SuperExec's environment),
    never from the run config, which anyone who reaches the SuperLink can write.
    """
    from agencyfl.federation.refusal_log import append_entry
    from agencyfl.federation.refusal_log import now as timestamp
    from agencyfl.server.run_authorization import ENV, refusal

    cfg = context.run_config
    coordinator = Path(os.environ.get(ENV, ""))
    job = str(cfg.get("job") or "")
    if not os.environ.get(ENV):
        raise FederationError(f"this ServerApp runs only under the coordinator's SuperExec (${ENV} is not set)")
    reason = refusal(coordinator, cfg) if RUN_ID.fullmatch(job) else f"the run id {job[:80]!r} is not a safe name"
    if reason is not None:
        append_entry(coordinator / "refused-runs.jsonl",
                     {"time": timestamp(), "run_id": context.run_id, "job": job[:80], "reason": reason})  # fmt: skip
        return
    workdir, ledger_key = coordinator / "work", coordinator / "keys" / "ledger-signing.key"
    if str(cfg.get("task", "train")) == "align":
        _align(grid, cfg, workdir, ledger_key)
        return
    if isinstance(load_any_spec(str(cfg["spec"])), LoadedVerticalSpec):
        from agencyfl.server.vertical_run import run_vertical_training

        run_vertical_training(grid, cfg, coordinator, _events_to_file(workdir / "runs" / job / "events.jsonl"))
        return
    loaded = load_spec(str(cfg["spec"]))
    settings = ServerSettings(
        loaded=loaded,
        workdir=workdir,
        job=job,
        min_available=len(loaded.spec.agencies),
        connect_timeout=float(cfg.get("connect-timeout", 600.0)),
        resume=bool(cfg.get("resume", False)),
        ledger_key=ledger_key,
    )
    run_job(grid, context, settings, _events_to_file(settings.run_dir / "events.jsonl"))


def _align(grid: Grid, cfg: Any, workdir: Path, ledger_key: Path) -> None:
    """``coordinator align``: the register alignment of a vertical spec through the parties' SuperNodes."""
    from agencyfl.alignment.runs import load_vertical
    from agencyfl.server.alignment_run import AlignmentSettings, run_alignment

    settings = AlignmentSettings(
        loaded=load_vertical(Path(str(cfg["spec"]))),
        workdir=workdir,
        run=str(cfg["job"]),
        ledger_key=ledger_key,
        requested_by=str(cfg.get("requested-by") or "coordinator"),
        connect_timeout=float(cfg.get("connect-timeout", 600.0)),
    )
    run_alignment(grid, settings, _events_to_file(settings.run_dir / "events.jsonl"))


def _events_to_file(path: Path) -> EventSink:
    """Append each event as a JSON line: how ``coordinator train`` follows a run it did not start in process."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def sink(event: dict[str, Any]) -> None:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")

    return sink
