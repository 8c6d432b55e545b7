"""A party's side of `coordinator align`, driven message by message as its SuperNode would (in process).

The deployment test (``test_deployment_alignment.py``) runs the whole protocol through real daemons; here the
abuses a curious coordinator or a careless steward would try on one party are each shown refused: a run key
swapped in transit (the coordinator would then open what it relays), a plan for another copy of the spec,
steps out of order, a counterpart whose ledger key the steward never received.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from agencyfl.alignment.remote import MESSAGE_TYPE, REPLY_KEY, REQUEST_KEY, AlignmentPlan, AlignReply, AlignRequest
from agencyfl.alignment.runs import load_vertical
from agencyfl.alignment.sealed import PartyKeys, certify
from agencyfl.clients.alignment_steps import handle, peers_dir
from agencyfl.clients.signed_plan import refused_requests
from agencyfl.clients.site import AgencySite
from agencyfl.privacy.keys import generate_signing_key, import_public_key, public_pem
from agencyfl.privacy.plan_signature import sign_plan
from agencyfl.synth_vertical import synthesize_vertical

RUN = "align-test-run"


class Parties:
    def __init__(self, root: Path) -> None:
        population = synthesize_vertical(root / "data", households=400, seed=4)
        self.loaded = load_vertical(population.spec)
        coordinator = generate_signing_key(root / "coordinator.key")
        (root / "coordinator.pub").write_bytes(public_pem(coordinator.public_key()))
        self.signature = sign_plan(AlignmentPlan.from_spec(self.loaded, RUN).signed_bytes(), coordinator)
        self.sites: dict[str, AgencySite] = {}
        self.contexts: dict[str, Context] = {}
        for party in ("civil-affairs", "hrss"):
            home = root / party
            key = generate_signing_key(home / "keys" / "ledger-signing.key")
            (home / "keys" / "ledger.pub").write_bytes(public_pem(key.public_key()))
            self.sites[party] = AgencySite(agency=party, spec_path=population.spec,
                                           data_path=population.agency_files[party], home=home,
                                           coordinator_key=root / "coordinator.pub")  # fmt: skip
            self.contexts[party] = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        import_public_key(peers_dir(root / "hrss"), "civil-affairs", root / "civil-affairs" / "keys" / "ledger.pub")

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
