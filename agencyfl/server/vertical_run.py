"""The coordinator's ServerApp for ``agencyfl coordinator train`` with a vertical spec.

Flower starts the job: one ``query.vertical`` message per party's SuperNode carries the signed plan
and that node's challenge. The iterations then run over the streams the agencies dial
(``vertical.stream``), driven by ``vertical.driver``; each party's Flower reply arrives when its
stream ends. ``docs/vertical.md``, "In a deployment", is the design.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from agencyfl.alignment.runs import load_vertical, runs_chain
from agencyfl.federation.errors import AgencyflError, DeploymentError, error_class
from agencyfl.federation.spec import LoadedVerticalSpec
from agencyfl.privacy.coordinator_ledger import open_coordinator_ledger
from agencyfl.privacy.keys import load_signing_key
from agencyfl.privacy.plan_signature import sign_plan
from agencyfl.vertical.driver import DriverSettings, EventSink, authenticator, drive
from agencyfl.vertical.job import plan_of
from agencyfl.vertical.remote import MESSAGE_TYPE, REPLY_KEY, REQUEST_KEY, VerticalJobPlan
from agencyfl.vertical.stream import StreamHub


def stream_port(settings: dict[str, Any]) -> int:
    """The port of the agencies' streams: ``coordinator init --stream-port``, default the SuperLink's + 1."""
    return int(settings.get("stream_port") or int(settings["port"]) + 1)


def aligned_register_size(loaded: LoadedVerticalSpec, workdir: Path, ledger_key: Path) -> int:
    """N from the newest alignment of this federation with these parameters in the coordinator's runs chain.

    Raises
    ------
    DeploymentError
        If the chain records no such alignment (run ``coordinator align`` first).
    """
    spec = loaded.spec
    runs = [
        e for e in runs_chain(workdir, ledger_key).events()
        if e.kind == "register-alignment" and e.federation == spec.federation.name
        and e.parameters_sha256 == spec.alignment_sha256()
    ]  # fmt: skip
    if not runs:
        raise DeploymentError(f"no alignment of {spec.federation.name} is recorded here: run `coordinator align` first")
    return int(runs[-1].sizes[spec.label_agency.name])


def run_vertical_training(grid: Grid, cfg: Any, coordinator: Path, sink: EventSink) -> dict[str, Any]:
    """Start the job (``task`` train, or screen) through Flower and drive it over the streams; the summary.

    A failure before the driver starts (no alignment, an unregistered party) is written as the run's
    summary too, so ``coordinator train`` reports it with its exit code.
    """
    summary_file = coordinator / "work" / "runs" / str(cfg["job"]) / "summary.json"
    summary_file.unlink(missing_ok=True)  # an earlier attempt's (a resumed job): this attempt writes its own
    try:
        if str(cfg.get("task", "train")) == "screen":
            return run_screening(grid, cfg, coordinator, sink)
        return _run(grid, cfg, coordinator, sink)
    except AgencyflError as exc:
        if not summary_file.exists():  # the driver writes its own when it stops
            error = {"class": type(exc).__name__, "message": str(exc)}
            summary_file.parent.mkdir(parents=True, exist_ok=True)
            summary_file.write_text(json.dumps({"job": str(cfg["job"]), "status": "stopped", "error": error}))
        sink({"type": "failed", "error": type(exc).__name__, "message": str(exc)})
        raise


@dataclass
class _Coordinator:
    """The coordinator's folder as a deployed vertical run needs it."""

    root: Path

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    @property
    def ledger_key(self) -> Path:
        return self.root / "keys" / "ledger-signing.key"

    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = json.loads((self.root / "coordinator.json").read_text())
        return settings

    def agencies(self) -> dict[str, Any]:
        registered = self.root / "agencies.json"
        agencies: dict[str, Any] = json.loads(registered.read_text()) if registered.exists() else {}
        return agencies

    def hub(self, job: str, parties: list[str], challenges: dict[str, bytes]) -> tuple[StreamHub, str]:
        """The streams' hub for ``job`` (TLS with the coordinator's certificate), and the address agencies dial."""
        agencies, settings = self.agencies(), self.settings()
        unregistered = [p for p in parties if not agencies.get(p, {}).get("public_key")]
        if unregistered:
            raise DeploymentError(f"no SuperNode key is kept for {', '.join(unregistered)}: `coordinator register` it")
        port, tls = stream_port(settings), self.root / "tls"
        hub = StreamHub(
            f"{settings['bind']}:{port}", (tls / "server.pem").read_bytes(), (tls / "server.key").read_bytes(),
            authenticator(job, challenges, {p: agencies[p]["public_key"] for p in parties}), parties,
        )  # fmt: skip
        return hub, f"{settings['hosts'][0]}:{port}"


def _run(grid: Grid, cfg: Any, coordinator: Path, sink: EventSink) -> dict[str, Any]:
    where = _Coordinator(coordinator)
    workdir, ledger_key = where.workdir, where.ledger_key
    loaded = load_vertical(Path(str(cfg["spec"])))
    job, resume = str(cfg["job"]), bool(cfg.get("resume", False))
    plan = plan_of(loaded)
    holder = loaded.spec.label_agency.name
    parties = [holder, *(a.name for a in loaded.spec.agencies if a.name != holder)]
    run_dir = workdir / "runs" / job
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.json").write_text(json.dumps({"job": job, "topology": "vertical", "spec": str(cfg["spec"])}))
    register_size = aligned_register_size(loaded, workdir, ledger_key)
    challenges = {p: secrets.token_bytes(32) for p in parties}
    hub, stream = where.hub(job, parties, challenges)
    try:
        job_plan = VerticalJobPlan.of(loaded, plan, job, register_size, stream)
        signature = sign_plan(job_plan.signed_bytes(), load_signing_key(ledger_key))
        timeout = float(cfg.get("connect-timeout", 600.0))
        sent = _start(grid, "train", job_plan.parties, job_plan.model_dump_json(), signature, challenges,
                      where.agencies(), timeout)  # fmt: skip
        hub.early_failure = _replies_watch(grid, sent)
        sink({"type": "started", "job": job, "parties": parties, "nodes": len(sent)})
        driver = DriverSettings(
            loaded=loaded, plan=plan, job=job_plan, workdir=workdir,
            chain=open_coordinator_ledger(workdir / "coordinator" / "ledger", ledger_key),
            connect_timeout=timeout, resume=resume, receipts_key=load_signing_key(ledger_key),
        )  # fmt: skip
        return drive(hub, driver, sink)
    finally:
        hub.stop(grace=2.0)


SCREENING_REQUEST = "request.json"  # what `coordinator screen` checked, beside the run's events


def run_screening(grid: Grid, cfg: Any, coordinator: Path, sink: EventSink) -> dict[str, Any]:
    """``coordinator screen``: the screening the coordinator's CLI checked (token, purpose) and wrote down in
    ``work/runs/ID/request.json``; the plan is signed here, the parties take part over their streams."""
    from agencyfl.screening.driver import drive_screening
    from agencyfl.screening.records import COORDINATOR, uses_ledger_at
    from agencyfl.screening.remote import ScreeningPlan
    from agencyfl.vertical.model import RegisteredVerticalModel

    where = _Coordinator(coordinator)
    screening = str(cfg["job"])
    run_dir = where.workdir / "runs" / screening
    request = json.loads((run_dir / SCREENING_REQUEST).read_text())
    loaded = load_vertical(Path(str(cfg["spec"])))
    model = RegisteredVerticalModel(where.workdir / "registry" / request["model_version"])
    register_size = aligned_register_size(loaded, where.workdir, where.ledger_key)
    parties = [
        loaded.spec.label_agency.name,
        *sorted(p for p in model.manifest.parts if p != loaded.spec.label_agency.name),
    ]
    challenges = {p: secrets.token_bytes(32) for p in parties}
    hub, stream = where.hub(screening, parties, challenges)
    try:
        plan = ScreeningPlan(
            federation=loaded.spec.federation.name, screening=screening, spec_sha256=loaded.sha256,
            model_version=model.version, model_sha256=model.manifest.sha256(),
            parts={p: part.sha256 for p, part in model.manifest.parts.items()}, purpose=request["purpose"],
            requester=loaded.spec.label_agency.name, token_id=request["token_id"], register_size=register_size,
            stream=stream, review_band=float(request["review_band"]), since=request.get("since"),
            previous=_previous(where, coordinator, request.get("since"), model),
        )  # fmt: skip
        signature = sign_plan(plan.signed_bytes(), load_signing_key(where.ledger_key))
        timeout = float(cfg.get("connect-timeout", 600.0))
        sent = _start(grid, "screen", list(plan.parties), plan.model_dump_json(), signature, challenges,
                      where.agencies(), timeout)  # fmt: skip
        hub.early_failure = _replies_watch(grid, sent)
        uses = uses_ledger_at(coordinator, where.ledger_key, COORDINATOR)
        previous_dir = where.workdir / "registry" / plan.previous.model_version if plan.previous else None
        return drive_screening(hub, plan, model.directory, uses, str(request["token_holder"]), run_dir, sink,
                               connect_timeout=timeout, previous_dir=previous_dir)  # fmt: skip
    finally:
        hub.stop(grace=2.0)


def _previous(where: _Coordinator, coordinator: Path, since: str | None, model: Any) -> Any:
    """``--since``: the earlier screening's model, when it must be run again on today's facts."""
    from agencyfl.screening.remote import previous_model, recorded_screening

    if since is None:
        return None
    recorded = recorded_screening(coordinator, where.ledger_key, since, model)
    return previous_model(where.workdir / "registry", recorded, model)


def _start(
    grid: Grid, task: str, parties: list[str] | tuple[str, ...], plan: str, signature: str,
    challenges: dict[str, bytes], agencies: dict[str, Any], timeout: float,
) -> dict[str, str]:  # fmt: skip
    """One ``query.vertical`` message (``task``: train or screen) to each party's registered node once it is up;
    returns the message ids and whom each went to."""
    wanted = {int(agencies[p]["node_id"]): p for p in parties}
    deadline = time.monotonic() + timeout
    while not set(wanted) <= set(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    absent = [p for node, p in wanted.items() if node not in set(grid.get_node_ids())]
    if absent:
        raise DeploymentError(f"{', '.join(absent)}: SuperNode not connected within {timeout:.0f} s")
    messages = [
        Message(RecordDict({REQUEST_KEY: ConfigRecord({
            "task": task, "plan": plan, "signature": signature, "challenge": challenges[party],
        })}), dst_node_id=node, message_type=MESSAGE_TYPE)
        for node, party in wanted.items()
    ]  # fmt: skip
    ids = list(grid.push_messages(messages))
    return dict(zip(ids, [wanted[m.metadata.dst_node_id] for m in messages], strict=True))


def _replies_watch(grid: Grid, sent: dict[str, str]) -> Callable[[], None]:
    """Raises a party's own error if its reply to the start message already says it refused or failed (so the
    coordinator does not wait out the connect timeout for a party that will never dial)."""

    def check() -> None:
        for reply in grid.pull_messages(list(sent)):
            if reply.has_error() or REPLY_KEY not in reply.content.config_records:
                continue
            record = reply.content.config_records[REPLY_KEY]
            if record.get("status") in ("refused", "failed"):
                party = str(record.get("party", "a party"))
                kind = error_class(str(record.get("error", "")))
                raise kind(f"{party} {record.get('status')!s} the job before dialling: {record.get('reason', '')!s}")

    return check


def coordinator_dry_run(coordinator: Path, loaded: LoadedVerticalSpec) -> dict[str, Any]:
    """``coordinator train --dry-run``: the job's plan, releases and bytes from what the coordinator holds.

    N comes from its runs chain (the signed alignment record); each agency's lifetime epsilon from the last
    report its countersigned chain accepted (0 if none). Nothing is sent to anyone and nothing is written.

    Raises
    ------
    DeploymentError
        If no alignment of this federation is recorded (run ``coordinator align`` first).
    """
    from agencyfl.vertical.dry_run import dry_run

    workdir, ledger_key = coordinator / "work", coordinator / "keys" / "ledger-signing.key"
    size = aligned_register_size(loaded, workdir, ledger_key)
    reported: dict[str, float] = {}
    chain_dir = workdir / "coordinator" / "ledger"
    if chain_dir.exists():
        for entry in open_coordinator_ledger(chain_dir, ledger_key).events():
            for report in entry.agencies:
                if report.accepted:
                    reported[report.agency] = report.epsilon_lifetime
    return dry_run(loaded, workdir, register=(size, "the coordinator's signed alignment record"), lifetime_now=reported)
