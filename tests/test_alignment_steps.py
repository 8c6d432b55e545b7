"""A party's side of `coordinator align`, driven message by message as its SuperNode would (in process).

``notebooks/09-deployment-alignment.ipynb`` runs the whole protocol through real daemons (the tests
execute it). Here the abuses a curious coordinator or a careless steward would try on one party are each
shown refused: a run key swapped in transit (the coordinator would then open what it relays), a plan for
another copy of the spec, steps out of order, a counterpart whose ledger key the steward never received,
and a commit of a run the coordinator's chain does not record as it happened. ``LocalGrid`` delivers the
coordinator's messages to the parties' handlers in this process, so the coordinator's own driver runs
unchanged.
"""

from __future__ import annotations

import csv
import json
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_alignment_cli import ids_of, valid

from agencyfl.alignment.errors import EmptyIntersectionError, MessageRejectedError
from agencyfl.alignment.remote import (
    MESSAGE_TYPE,
    RECORD_DOMAIN,
    REPLY_KEY,
    REQUEST_KEY,
    AlignmentPlan,
    AlignReply,
    AlignRequest,
)
from agencyfl.alignment.runs import ProtocolRun, load_vertical, runs_chain
from agencyfl.alignment.sealed import PartyKeys, certify
from agencyfl.clients import alignment_steps
from agencyfl.clients.alignment_steps import handle, peers_dir
from agencyfl.clients.signed_plan import refused_requests
from agencyfl.clients.site import AgencySite
from agencyfl.deployment import keep_peer_keys
from agencyfl.federation.errors import DeploymentError
from agencyfl.federation.resident_id import check_character
from agencyfl.privacy.keys import generate_signing_key, import_public_key, load_signing_key, public_pem
from agencyfl.privacy.plan_signature import sign_plan
from agencyfl.server.alignment_run import AlignmentSettings, _Exchange, _introduce, run_alignment
from agencyfl.server.secure_aggregation import FastPollGrid
from agencyfl.synth_vertical import synthesize_vertical

RUN = "align-test-run"


PARTIES = ("civil-affairs", "hrss", "tax", "environment")


class Parties:
    def __init__(self, root: Path) -> None:
        population = synthesize_vertical(root / "data", households=400, seed=4)
        self.population = population
        self.root = root
        self.loaded = load_vertical(population.spec)
        coordinator = generate_signing_key(root / "coordinator.key")
        (root / "coordinator.pub").write_bytes(public_pem(coordinator.public_key()))
        self.signature = sign_plan(AlignmentPlan.from_spec(self.loaded, RUN).signed_bytes(), coordinator)
        self.sites: dict[str, AgencySite] = {}
        self.contexts: dict[str, Context] = {}
        for party in PARTIES:
            home = root / party
            key = generate_signing_key(home / "keys" / "ledger-signing.key")
            (home / "keys" / "ledger.pub").write_bytes(public_pem(key.public_key()))
            self.sites[party] = AgencySite(agency=party, spec_path=population.spec,
                                           data_path=population.agency_files[party], home=home,
                                           coordinator_key=root / "coordinator.pub")  # fmt: skip
            self.contexts[party] = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        for agency in PARTIES[1:]:
            import_public_key(peers_dir(root / agency), "civil-affairs", root / "civil-affairs" / "keys" / "ledger.pub")

    def trust_every_agency(self) -> None:
        """Civil affairs' steward receives every agency's ledger key (by default it holds none)."""
        for agency in PARTIES[1:]:
            import_public_key(
                peers_dir(self.root / "civil-affairs"), agency, self.root / agency / "keys" / "ledger.pub"
            )

    def send(self, party: str, step: str, **fields: object) -> AlignReply:
        request = AlignRequest.model_validate(
            {"step": step, "run": RUN, "spec_sha256": self.loaded.sha256, "signature": self.signature, **fields}
        )
        message = Message(RecordDict({REQUEST_KEY: request.to_record()}), dst_node_id=1, message_type=MESSAGE_TYPE)
        reply = handle(message, self.contexts[party], self.sites[party])
        return AlignReply.from_record(reply.content.config_records[REPLY_KEY])


@pytest.fixture
def parties(tmp_path: Path) -> Iterator[Parties]:
    # Flower stamps every message with the identity of the task that made it (set by its runtime in a
    # ServerApp or ClientApp process); here one process plays both ends of the message.
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        yield Parties(tmp_path)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_a_run_key_swapped_by_the_coordinator_is_refused_before_anything_is_blinded(
    parties: Parties, tmp_path: Path
) -> None:
    genuine = parties.send("civil-affairs", "keys")
    assert genuine.status == "ok" and len(genuine.certificate) == 128
    assert parties.send("hrss", "keys").status == "ok"
    # The coordinator makes run keys of its own for civil affairs and vouches for them with a key it holds.
    forged = certify(RUN, PartyKeys.generate("civil-affairs").public(), generate_signing_key(tmp_path / "fake.key"))
    refused = parties.send("hrss", "parameters", certificates={"civil-affairs": forged})
    assert refused.status == "failed" and refused.error == "MessageRejectedError"
    assert "not signed by the ledger key this party holds" in refused.reason and refused.envelopes == []
    # Civil affairs' genuine keys for another run do not pass either (the certificate names its run).
    replayed = certify("another-run", PartyKeys.generate("civil-affairs").public(),
                       generate_signing_key(tmp_path / "x.key"))  # fmt: skip
    assert parties.send("hrss", "parameters", certificates={"civil-affairs": replayed}).status == "failed"
    # The genuine certificate is accepted, and hrss then sends its parameters, sealed to civil affairs only.
    accepted = parties.send("hrss", "parameters", certificates={"civil-affairs": genuine.certificate})
    assert accepted.status == "ok" and len(accepted.envelopes) == 1


def test_a_plan_for_another_copy_of_the_spec_or_not_signed_by_the_coordinator_is_refused_and_logged(
    parties: Parties,
) -> None:
    other = parties.send("hrss", "keys", spec_sha256="0" * 64)
    assert other.status == "refused" and "not this agency's copy" in other.reason
    unsigned = parties.send("hrss", "keys", signature=sign_plan(b"x", generate_signing_key(parties.sites["hrss"].home
                                                                                           / "s.key")))  # fmt: skip
    assert unsigned.status == "refused" and "not signed by the coordinator's key" in unsigned.reason
    logged = [e["kind"] for e in refused_requests(parties.sites["hrss"].home)]
    assert logged == ["align:keys", "align:keys"]
    assert not (parties.sites["hrss"].home / "alignment").exists()


def test_steps_out_of_order_and_unknown_counterparts_are_refused(parties: Parties) -> None:
    early = parties.send("hrss", "finish")  # nothing drawn for this run yet
    assert early.status == "failed" and early.error == "ProtocolError" and "out of order" in early.reason
    assert parties.send("civil-affairs", "keys").status == "ok"
    # civil affairs' steward holds no ledger key of hrss: it cannot tell hrss's run keys from anyone's
    unknown = parties.send("civil-affairs", "parameters", certificates={})
    assert unknown.status == "failed" and "holds no ledger key for" in unknown.reason
    assert parties.send("civil-affairs", "commit").status == "failed"  # nothing staged: nothing to commit


class LocalGrid:
    """The coordinator's Grid for the parties' handlers in this process: node i+1 is ``PARTIES[i]``."""

    def __init__(self, parties: Parties) -> None:
        self.parties = parties
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(PARTIES) + 1))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = secrets.token_hex(8)  # the SuperLink would set it
            party = PARTIES[message.metadata.dst_node_id - 1]
            self.replies[message.metadata.message_id] = handle(
                message, self.parties.contexts[party], self.parties.sites[party]
            )
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def aligned_up_to_commit(parties: Parties) -> tuple[_Exchange, AlignmentPlan]:
    for agency in PARTIES[1:]:  # civil affairs trusts every agency's ledger key
        import_public_key(
            peers_dir(parties.root / "civil-affairs"), agency, parties.root / agency / "keys" / "ledger.pub"
        )
    settings = AlignmentSettings(loaded=parties.loaded, workdir=parties.root / "coord", run=RUN,
                                 ledger_key=parties.root / "coordinator.key", step_timeout=30.0)  # fmt: skip
    plan = AlignmentPlan.from_spec(parties.loaded, RUN)
    grid = LocalGrid(parties)
    exchange = _Exchange(FastPollGrid(grid, 30.0), settings, parties.signature, lambda event: None)  # type: ignore[arg-type]
    certificates = _introduce(exchange, plan, grid.get_node_ids())
    exchange.step("parameters", plan.parties, certificates)
    exchange.step("blind", plan.parties)
    exchange.step("answer", [plan.holder])
    exchange.step("finish", plan.parties[1:])
    return exchange, plan


def test_the_coordinators_driver_aligns_every_party_and_each_keeps_the_signed_record(parties: Parties) -> None:
    for agency in PARTIES[1:]:
        import_public_key(
            peers_dir(parties.root / "civil-affairs"), agency, parties.root / agency / "keys" / "ledger.pub"
        )
    settings = AlignmentSettings(loaded=parties.loaded, workdir=parties.root / "coord", run=RUN,
                                 ledger_key=parties.root / "coordinator.key", step_timeout=30.0)  # fmt: skip
    summary = run_alignment(LocalGrid(parties), settings, lambda event: None)  # type: ignore[arg-type]
    assert summary["status"] == "recorded"
    register = [i for i in valid(ids_of(parties.population.agency_files["civil-affairs"])) if i is not None]
    for agency in PARTIES[1:]:
        own = valid(ids_of(parties.population.agency_files[agency]))
        with (parties.root / agency / "alignment" / "alignment-positions.csv").open() as fh:
            got = {(int(r["row"]), int(r["position"])) for r in csv.DictReader(fh)}
        assert got == {(row, register.index(i)) for row, i in enumerate(own) if i is not None and i in register}
    for party in PARTIES:
        record = json.loads((parties.root / party / "alignment" / "run-record.json").read_text())
        assert record["run"] == RUN and record["sizes"] == summary["sizes"]
        assert (
            "run-record.json"
            in json.loads((parties.root / party / "alignment" / "retention.json").read_text())["files"]
        )


def test_a_commit_of_a_run_the_chain_does_not_record_as_it_happened_is_refused(parties: Parties) -> None:
    """A curious coordinator that records hrss's input size wrong (or signs the record with another key)
    cannot get any party to commit: each checks the signed record against the run it took part in."""
    exchange, plan = aligned_up_to_commit(parties)
    honest = {"civil-affairs": 0, **{a: 0 for a in PARTIES[1:]}}
    for record in exchange.relay.records:
        if record.kind in ("register", "query"):
            honest[record.sender] = record.rows
    spec = parties.loaded.spec
    event = ProtocolRun(kind="register-alignment", federation=spec.federation.name, run=RUN, requested_by="c",
                        purpose="x", parameters_sha256=spec.alignment_sha256(), parties=list(plan.parties),
                        sizes=honest | {"hrss": honest["hrss"] + 1}, pairs=[], bytes_relayed=0, time="t",
                        expires="e")  # fmt: skip
    key = load_signing_key(parties.root / "coordinator.key")
    exchange.record = event.model_dump_json()
    exchange.record_signature = sign_plan(RECORD_DOMAIN + exchange.record.encode(), key)
    with pytest.raises(MessageRejectedError, match="hrss failed at step 'commit'.*not the run hrss took part in"):
        exchange.step("commit", ["hrss"])
    exchange.record = event.model_copy(update={"sizes": honest}).model_dump_json()
    exchange.record_signature = sign_plan(RECORD_DOMAIN + exchange.record.encode(),
                                          generate_signing_key(parties.root / "other.key"))  # fmt: skip
    with pytest.raises(MessageRejectedError, match="not signed by the coordinator's key"):
        exchange.step("commit", ["tax"])
    assert not (parties.root / "hrss" / "alignment").exists() and not (parties.root / "tax" / "alignment").exists()
    exchange.record_signature = sign_plan(RECORD_DOMAIN + exchange.record.encode(), key)
    exchange.step("commit", list(plan.parties))  # the true record: every party commits
    assert all((parties.root / p / "alignment" / "run-record.json").exists() for p in PARTIES)


def test_a_steward_cannot_take_the_coordinators_or_its_own_key_for_a_peers(tmp_path: Path) -> None:
    """With the coordinator's key in HOME/peers the coordinator could vouch for run keys of its own and open
    every envelope it relays; a later different key for a peer is a decision, not an accident."""
    home = tmp_path / "home"
    home.mkdir()
    coordinator = generate_signing_key(tmp_path / "coordinator.key")
    (home / "coordinator.pub").write_bytes(public_pem(coordinator.public_key()))
    own = generate_signing_key(tmp_path / "own.key")
    (tmp_path / "own.pub").write_bytes(public_pem(own.public_key()))
    peer = generate_signing_key(tmp_path / "peer.key")
    (tmp_path / "peer.pub").write_bytes(public_pem(peer.public_key()))
    with pytest.raises(DeploymentError, match="the coordinator's key, not civil-affairs's"):
        keep_peer_keys(home, {"civil-affairs": home / "coordinator.pub"}, own=tmp_path / "own.key")
    with pytest.raises(DeploymentError, match="this agency's own key"):
        keep_peer_keys(home, {"civil-affairs": tmp_path / "own.pub"}, own=tmp_path / "own.key")
    keep_peer_keys(home, {"civil-affairs": tmp_path / "peer.pub"}, own=tmp_path / "own.key")
    keep_peer_keys(home, {"civil-affairs": tmp_path / "peer.pub"}, own=tmp_path / "own.key")  # the same: fine
    generate_signing_key(tmp_path / "new.key")
    (tmp_path / "new.pub").write_bytes(public_pem(load_signing_key(tmp_path / "new.key").public_key()))
    with pytest.raises(DeploymentError, match="different key"):
        keep_peer_keys(home, {"civil-affairs": tmp_path / "new.pub"})


def test_a_party_failing_after_others_staged_leaves_every_output_and_the_chain_as_they_were(
    parties: Parties, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tax's file turns out to hold nobody on the register (wrong file, a careless steward): tax fails at
    `finish`, after civil affairs staged its sizes and hrss and environment their positions. Every party
    drops what it staged, the chain does not grow, the earlier run's outputs stay, and the error is the
    failing party's own one line (exit 22 at the coordinator's command)."""
    parties.trust_every_agency()

    def settings(run: str) -> AlignmentSettings:
        return AlignmentSettings(loaded=parties.loaded, workdir=parties.root / "coord", run=run,
                                 ledger_key=parties.root / "coordinator.key", step_timeout=30.0)  # fmt: skip

    def run(name: str) -> dict[str, object]:
        parties.signature = sign_plan(
            AlignmentPlan.from_spec(parties.loaded, name).signed_bytes(),
            load_signing_key(parties.root / "coordinator.key"),
        )
        return run_alignment(LocalGrid(parties), settings(name), lambda event: None)  # type: ignore[arg-type]

    assert run("align-first")["status"] == "recorded"
    kept = {p: (parties.root / p / "alignment" / "retention.json").read_bytes() for p in PARTIES}
    chain = runs_chain(parties.root / "coord", parties.root / "coordinator.key")
    recorded = chain.events()
    tax = parties.population.agency_files["tax"]
    original = tax.read_text()
    lines = original.splitlines()
    foreign = [f"1101051949123{n:04d}" for n in range(len(lines) - 1)]  # valid ids of nobody registered
    rows = [f"{f}{check_character(f)},{line.partition(',')[2]}" for f, line in zip(foreign, lines[1:], strict=True)]
    tax.write_text("\n".join([lines[0], *rows]) + "\n")
    staged: list[str] = []
    original_stage = alignment_steps.stage

    def watched(final: Path, run_id: str, *args: object) -> None:
        staged.append(final.parent.name)
        original_stage(final, run_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(alignment_steps, "stage", watched)
    try:
        with pytest.raises(EmptyIntersectionError, match="tax failed at step 'finish': none of tax's"):
            run("align-second")
    finally:
        tax.write_text(original)
    assert {"civil-affairs", "hrss", "environment"} <= set(staged)  # they had staged before tax failed
    assert chain.events() == recorded
    for party in PARTIES:
        assert (parties.root / party / "alignment" / "retention.json").read_bytes() == kept[party]
        assert not list((parties.root / party).glob(".alignment.*"))  # nothing left staged
