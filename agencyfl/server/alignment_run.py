"""The coordinator's side of ``agencyfl coordinator align``: drive the steps, relay the envelopes, record the run.

The ServerApp (``task = "align"``) signs the alignment plan with the coordinator's ledger key, sends
each party one ``query.align`` message per step and forwards the sealed envelopes each party
addressed to another (the one-machine ``Relay``, which records what it saw: names, kinds, counts,
sizes). It holds no alignment key and cannot open an envelope. The run is recorded in the runs chain
(a ``ProtocolRun``) before any party moves its output into place; any refusal or failure makes every
party drop its staged output. ``docs/alignment.md``, "In a deployment", is the design.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from agencyfl.alignment.relay import Relay
from agencyfl.alignment.remote import (
    MESSAGE_TYPE,
    RECORD_DOMAIN,
    REPLY_KEY,
    REQUEST_KEY,
    AlignmentPlan,
    AlignReply,
    AlignRequest,
    Step,
)
from agencyfl.alignment.runs import ProtocolRun, expiry, runs_chain
from agencyfl.alignment.sealed import pack, unpack
from agencyfl.federation.errors import AgencyflError, DeploymentError, MessageRejectedError, error_class
from agencyfl.federation.spec import LoadedVerticalSpec
from agencyfl.privacy.keys import load_signing_key
from agencyfl.privacy.plan_signature import sign_plan
from agencyfl.server.secure_aggregation import FastPollGrid

EventSink = Callable[[dict[str, Any]], None]
STEP_TIMEOUT = 600.0  # a step waits at most this long for a party (blinding 1M ids takes minutes)


@dataclass
class AlignmentSettings:
    """What one deployment alignment needs."""

    loaded: LoadedVerticalSpec
    workdir: Path  # the coordinator's work folder: runs/RUN/ and coordinator/runs-ledger
    run: str
    ledger_key: Path  # the coordinator's ledger signing key (signs the plan and the chain)
    requested_by: str = "coordinator"
    connect_timeout: float = 600.0
    step_timeout: float = STEP_TIMEOUT

    @property
    def run_dir(self) -> Path:
        """Where the run's events and summary go."""
        return self.workdir / "runs" / self.run


@dataclass
class _Exchange:
    """The run's state at the coordinator: who is which node, the relay, what each step took."""

    grid: FastPollGrid
    settings: AlignmentSettings
    signature: str
    sink: EventSink
    relay: Relay = field(default_factory=Relay)
    nodes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    record: str = ""
    record_signature: str = ""

    def request(self, step: Step, party: str, certificates: dict[str, bytes] | None = None) -> AlignRequest:
        return AlignRequest(
            step=step, run=self.settings.run, spec_sha256=self.settings.loaded.sha256, signature=self.signature,
            certificates=certificates or {}, envelopes=[pack(e) for e in self.relay.take_all(party)],
            record=self.record if step == "commit" else "",
            record_signature=self.record_signature if step == "commit" else "",
        )  # fmt: skip

    def send(self, step: Step, requests: dict[int, AlignRequest], timeout: float) -> dict[int, AlignReply]:
        """One step: a message per node, every reply (DeploymentError naming whoever did not answer)."""
        start = time.monotonic()
        messages = [
            Message(RecordDict({REQUEST_KEY: r.to_record()}), dst_node_id=node, message_type=MESSAGE_TYPE)
            for node, r in requests.items()
        ]
        replies: dict[int, AlignReply] = {}
        for message in self.grid.send_and_receive(messages, timeout=timeout):
            node = message.metadata.src_node_id
            if message.has_error() or REPLY_KEY not in message.content.config_records:
                error = (message.error.reason or "an error") if message.has_error() else "no alignment reply"
                replies[node] = AlignReply(party=self._name(node), step=step, status="failed",
                                           error="DeploymentError", reason=error)  # fmt: skip
                continue
            replies[node] = AlignReply.from_record(message.content.config_records[REPLY_KEY])
        missing = [self._name(node) for node in requests if node not in replies]
        if missing:
            raise DeploymentError(f"no answer from {', '.join(missing)} to step {step!r} within {timeout:.0f} s")
        self.seconds[step] = round(time.monotonic() - start, 3)
        self.sink({"type": "step", "step": step, "seconds": self.seconds[step]})
        return replies

    def _name(self, node: int) -> str:
        return next((name for name, n in self.nodes.items() if n == node), f"node {node}")

    def step(self, step: Step, parties: Sequence[str], certificates: dict[str, bytes] | None = None) -> None:
        """Run ``step`` with ``parties``; relay what they send; raise the first refusal or failure."""
        replies = self.send(
            step,
            {self.nodes[p]: self.request(step, p, certificates) for p in parties},
            self.settings.step_timeout,
        )
        for node, reply in replies.items():
            party = self._name(node)
            _raise_unless_ok(reply, party)
            if reply.party != party:
                raise MessageRejectedError(f"node {node} answered as {reply.party!r}, it is {party!r}")
            for packed in reply.envelopes:
                envelope = unpack(packed)
                if envelope.sender != party or envelope.recipient not in self.nodes:
                    raise MessageRejectedError(f"{party} sent an envelope from {envelope.sender!r} "
                                               f"to {envelope.recipient!r}: not relayed")  # fmt: skip
                self.relay.post(envelope)


def _raise_unless_ok(reply: AlignReply, party: str) -> None:
    if reply.status == "ok":
        return
    verb = "refused" if reply.status == "refused" else "failed at"
    raise error_class(reply.error)(f"{party} {verb} step {reply.step!r}: {reply.reason}")


def _wait_for_nodes(grid: Grid, want: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    if len(nodes) < want:
        raise DeploymentError(f"only {len(nodes)} of the {want} parties' SuperNodes connected within {timeout:.0f} s")
    return nodes


def run_alignment(grid: Grid, settings: AlignmentSettings, sink: EventSink) -> dict[str, Any]:
    """Align every party of the spec through their SuperNodes; returns the summary (also in ``run_dir``).

    Raises
    ------
    AgencyflError
        The first party's refusal or failure (its own class: exit 22 or 23 for alignment errors), a
        party that does not answer (DeploymentError), or a runs chain that does not verify (LedgerError).
        Every party has then dropped its staged output and nothing is recorded.
    """
    loaded = settings.loaded
    plan = AlignmentPlan.from_spec(loaded, settings.run)
    chain = runs_chain(settings.workdir, settings.ledger_key)  # verified before anything is sent
    key = load_signing_key(settings.ledger_key)
    signature = sign_plan(plan.signed_bytes(), key)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    exchange = _Exchange(FastPollGrid(grid, settings.step_timeout), settings, signature, sink)
    summary: dict[str, Any] = {"run": settings.run, "kind": "register-alignment", "parties": list(plan.parties),
                               "status": "started"}  # fmt: skip
    sink({"type": "started", "run": settings.run, "parties": list(plan.parties)})
    try:
        nodes = _wait_for_nodes(grid, len(plan.parties), settings.connect_timeout)
        certificates = _introduce(exchange, plan, nodes)
        others = [p for p in plan.parties if p != plan.holder]
        exchange.step("parameters", plan.parties, certificates)
        exchange.step("blind", plan.parties)
        exchange.step("answer", [plan.holder])
        exchange.step("finish", others)
        now = datetime.now(UTC)
        sizes = _sizes(exchange.relay, plan)
        event = ProtocolRun(
            kind="register-alignment", federation=loaded.spec.federation.name, run=settings.run,
            requested_by=settings.requested_by, purpose=loaded.spec.federation.purpose,
            parameters_sha256=loaded.spec.alignment_sha256(), parties=list(plan.parties), sizes=sizes,
            pairs=[(plan.holder, name) for name in others], bytes_relayed=exchange.relay.bytes_sent(),
            time=now.isoformat(timespec="seconds"), expires=expiry(now, loaded.spec.alignment.retention_days),
        )  # fmt: skip
        chain.append(event)
        # each party commits only the run the chain recorded: the entry goes with the commit, signed
        exchange.record = event.model_dump_json()
        exchange.record_signature = sign_plan(RECORD_DOMAIN + exchange.record.encode(), key)
        exchange.step("commit", plan.parties)
    except Exception as exc:
        _abandon(exchange)
        if not isinstance(exc, AgencyflError):
            raise
        summary.update(status="failed", error={"class": type(exc).__name__, "message": str(exc)},
                       seconds=exchange.seconds)  # fmt: skip
        _write(settings.run_dir / "summary.json", summary)
        sink({"type": "failed", "error": type(exc).__name__, "message": str(exc)})
        raise
    summary.update(status="recorded", sizes=sizes, bytes_relayed=event.bytes_relayed, expires=event.expires,
                   seconds=exchange.seconds, relayed=[r.model_dump() for r in exchange.relay.records],
                   chain=str(settings.workdir / "coordinator" / "runs-ledger"))  # fmt: skip
    _write(settings.run_dir / "summary.json", summary)
    sink({"type": "done", "run": settings.run})
    return summary


def _introduce(exchange: _Exchange, plan: AlignmentPlan, nodes: list[int]) -> dict[str, bytes]:
    """The ``keys`` step to every connected node: who is which party, and each party's certified run keys."""
    requests = {node: exchange.request("keys", f"node {node}") for node in nodes}
    replies = exchange.send("keys", requests, exchange.settings.step_timeout)
    certificates: dict[str, bytes] = {}
    for node, reply in replies.items():
        _raise_unless_ok(reply, reply.party)
        if reply.party not in plan.parties or reply.party in exchange.nodes:
            raise MessageRejectedError(
                f"node {node} answered as {reply.party!r}: not a party of this alignment, or a party twice"
            )
        exchange.nodes[reply.party] = node
        certificates[reply.party] = reply.certificate
    absent = [p for p in plan.parties if p not in exchange.nodes]
    if absent:
        raise DeploymentError(f"no SuperNode answered as {', '.join(absent)}")
    return certificates


def _sizes(relay: Relay, plan: AlignmentPlan) -> dict[str, int]:
    """Each party's input size, as the relay saw it (the row counts of the register list and the queries)."""
    sizes: dict[str, int] = {}
    for record in relay.records:
        if record.kind in ("register", "query"):
            sizes[record.sender] = record.rows
    return {p: sizes.get(p, 0) for p in plan.parties}


def _abandon(exchange: _Exchange) -> None:
    """Best effort: every party that answered drops what it staged for the run.

    If a commit fails at one party after others committed, the chain holds the run and those parties keep
    its output (each with the signed record); the failing party keeps its previous output, and
    ``coordinator align`` reports the failure: align again.
    """
    if not exchange.nodes:
        return
    try:
        requests = {node: exchange.request("abandon", party) for party, node in exchange.nodes.items()}
        exchange.send("abandon", requests, min(60.0, exchange.settings.step_timeout))
    except Exception:  # noqa: BLE001
        pass  # a party that does not answer keeps a staging folder; its next run's first step removes it


def _write(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2))
