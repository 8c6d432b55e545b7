"""Run a whole federation on this machine with Flower's simulation engine (in process).

Each agency gets a site under ``WORKDIR/agencies/NAME`` (its ledger and signing key); the coordinator
writes to ``WORKDIR/registry`` and ``WORKDIR/runs``. ``flwr.simulation.run_simulation`` runs the
ServerApp in a thread here and the ClientApps in Ray workers; it passes no run config, so the apps
are built by factories that carry their settings.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from agencyfl.clients.app import make_client_app
from agencyfl.clients.site import AgencySite
from agencyfl.federation.errors import FederationError
from agencyfl.federation.spec import LoadedSpec, load_spec
from agencyfl.federation.table import load_table
from agencyfl.privacy.keys import load_or_create_signing_key, public_pem
from agencyfl.server.app import ServerSettings, make_server_app, new_job_id
from agencyfl.server.strategy import EventSink


def agency_sites(loaded: LoadedSpec, workdir: Path, coordinator_key: Path | None = None) -> list[AgencySite]:
    """One site per agency of the spec, homes under ``workdir/agencies``, trusting ``coordinator_key``."""
    return [
        AgencySite(
            agency=a.name,
            spec_path=loaded.path,
            data_path=loaded.data_path(a.name),
            home=(workdir / "agencies" / a.name).resolve(),
            coordinator_key=coordinator_key,
        )
        for a in loaded.spec.agencies
    ]


def coordinator_public_key(settings: ServerSettings) -> Path:
    """The coordinator's public ledger key beside its signing key (made on first use): the agencies' trust anchor."""
    key = load_or_create_signing_key(settings.signing_key_path)
    public = settings.signing_key_path.with_name("ledger.pub")
    public.write_bytes(public_pem(key.public_key()))
    return public


RAY_STARTS = 3


def start_ray(init_args: dict[str, Any], attempts: int = RAY_STARTS) -> None:
    """Start Ray for the simulation, trying again if its node does not come up in time.

    Ray gives its raylet a fixed 30 s to register and raises otherwise; on a machine whose cores are
    busy (another federation's processes) that can happen once and then succeed. Flower's backend uses
    the running Ray rather than starting its own.

    Raises
    ------
    FederationError
        If Ray did not start in ``attempts`` tries.
    """
    import ray

    # as Flower's backend starts it: Ray's worker processes get this process's import path
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env=runtime_env, **init_args)
            return
        except Exception as exc:  # Ray raises a bare Exception for a node that did not come up
            ray.shutdown()
            if attempt == attempts:
                raise FederationError(f"Ray did not start in {attempts} tries: {exc}") from exc


def run_federation(spec_path: str | Path, workdir: str | Path, on_event: EventSink | None = None) -> dict[str, Any]:
    """Train the spec's model across its agencies; returns the run summary (see ``server.app``).

    Every agency's data file is checked first (the same loader as ``steward check``), so an
    unusable file stops the run before any budget is spent.

    Raises
    ------
    SpecError, DataFileError
        Bad spec or unusable data file.
    FederationError
        The run ended without a model.
    """
    loaded = load_spec(spec_path)
    workdir = Path(workdir).resolve()
    settings = ServerSettings(loaded=loaded, workdir=workdir, job=new_job_id(), min_available=len(loaded.spec.agencies))
    sites = agency_sites(loaded, workdir, coordinator_public_key(settings))
    for site in sites:
        load_table(site.data_path, loaded.spec.schema)
    server_app = make_server_app(settings, on_event)
    client_app = make_client_app(lambda ctx: sites[int(ctx.node_config["partition-id"])])

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)
    init_args: dict[str, Any] = {
        "num_cpus": 2,
        "logging_level": "error",
        "log_to_driver": False,
        "include_dashboard": False,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start_ray(init_args)
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(sites),
                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args},
            )
        except RuntimeError as exc:
            raise FederationError(f"the simulation failed: {exc.__cause__ or exc}") from exc
    summary_path = settings.run_dir / "summary.json"
    if not summary_path.exists():
        raise FederationError("the federation ended without a summary (see the log above)")
    outcome: dict[str, Any] = json.loads(summary_path.read_text())
    if outcome.get("model") is None:
        raise FederationError(f"no model was produced; see {summary_path}")
    outcome["ledgers"] = {s.agency: str(s.ledger_dir) for s in sites}
    outcome["workdir"] = str(workdir)
    return outcome
