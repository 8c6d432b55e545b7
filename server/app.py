"""The coordinator's Flower ServerApp: FedAvg over the agencies, then the model into the registry.

``make_server_app(settings, on_event)`` builds the app for any engine and records the outcome in
``settings``' run folder (``summary.json``); the module-level ``app`` (the ``[tool.flwr.app]``
component) reads its settings from the run config: ``spec`` and ``workdir``.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from federation.encoding import FeatureEncoder
from federation.errors import FederationError
from federation.model import build_model, model_to_arrays
from federation.spec import LoadedSpec, load_spec
from server.registry import register_model
from server.strategy import AgencyFedAvg, EventSink


def new_job_id() -> str:
    """A job id: UTC time and 4 random hex digits."""
    return f"job-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(2)}"


@dataclass
class ServerSettings:
    """What the coordinator needs for one job."""

    loaded: LoadedSpec
    workdir: Path
    job: str
    min_available: int
    round_timeout: float = 600.0

    @property
    def run_dir(self) -> Path:
        """Where this job's summary goes."""
        return self.workdir / "runs" / self.job


def _wait_for_agencies(grid: Grid, count: int, timeout: float) -> None:
    """Block until ``count`` nodes are connected.

    FedAvg sizes its sample from the nodes connected at the moment it configures a round, so a
    round started while agencies are still connecting would silently leave some of them out.
    """
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(list(grid.get_node_ids()))} of {count} agencies connected")
        time.sleep(0.2)


def run_job(grid: Grid, settings: ServerSettings, on_event: EventSink | None = None) -> dict[str, Any]:
    """Run the job's rounds on ``grid``, register the model and return the run summary.

    Raises
    ------
    FederationError
        If no round produced an aggregated model.
    """
    spec = settings.loaded.spec
    sink = on_event or (lambda event: None)
    strategy = AgencyFedAvg(
        min_agencies=spec.training.min_agencies,
        on_event=sink,
        min_available_nodes=settings.min_available,
        server_learning_rate=spec.training.server_learning_rate,
        server_momentum=spec.training.server_momentum,
    )
    model = build_model(spec.model, FeatureEncoder(spec.schema).width, seed=spec.training.seed)
    _wait_for_agencies(grid, settings.min_available, settings.round_timeout)
    sink({"type": "start", "job": settings.job, "rounds": spec.training.rounds})
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model_to_arrays(model)),
        num_rounds=spec.training.rounds,
        timeout=settings.round_timeout,
        train_config=ConfigRecord(
            {"job": settings.job, "rounds": spec.training.rounds, "spec-sha256": settings.loaded.sha256}
        ),
    )
    log = strategy.log
    summary: dict[str, Any] = {
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
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    if log.aggregated_rounds == 0:
        (settings.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        raise FederationError(
            "no round aggregated a model (every round had too few trained updates); see "
            f"{settings.run_dir / 'summary.json'}"
        )
    card = {
        "job": settings.job,
        "agencies": [
            {
                "name": name,
                "epsilon": rec.epsilon_job,
                "epsilon_lifetime": rec.epsilon_lifetime,
                "delta": spec.privacy.delta,
                "rounds_trained": rec.rounds_trained,
                "refusals": rec.refusals,
                "dataset_sha256": rec.dataset,
            }
            for name, rec in log.agencies.items()
        ],
        "metrics": summary["metrics"],
        "metrics_source": "federated validation splits (pooled score histograms)",
        "rounds_aggregated": log.aggregated_rounds,
        "secure_aggregation": False,
    }
    path = register_model(settings.workdir / "registry", settings.loaded, result.arrays.to_numpy_ndarrays(), card)
    summary["model"] = str(path)
    (settings.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    sink({"type": "done", "model": str(path)})
    return summary


def make_server_app(settings: ServerSettings, on_event: EventSink | None = None) -> ServerApp:
    """A ServerApp that runs ``run_job`` with fixed settings (used by the simulation runner)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        run_job(grid, settings, on_event)

    return app


app = ServerApp()


@app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    loaded = load_spec(str(context.run_config["spec"]))
    settings = ServerSettings(
        loaded=loaded,
        workdir=Path(str(context.run_config.get("workdir", "."))),
        job=str(context.run_config.get("job", new_job_id())),
        min_available=loaded.spec.training.min_agencies,
    )
    run_job(grid, settings)
