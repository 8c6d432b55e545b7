"""An agency's side of ``agencyfl coordinator align``: one step per ``query.align`` message.

Each message starts a fresh ClientApp process. The party checks the coordinator's signed plan
against its *own* spec before anything else, then runs its role of ``docs/alignment.md`` for the
step. Its run keys, blinding key and what the next step needs stay in Flower's ``context.state``,
which the SuperNode keeps in memory on this host for the run; nothing secret is written to disk.
Output goes to a staging folder beside ``HOME/alignment`` and replaces it only on ``commit``, which
the coordinator sends after its chain has recorded the run.

Counterparts' run keys are accepted only if certified by the ledger key the steward was handed for
that counterpart (``HOME/peers/NAME.pub``, ``steward start --peer-key``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict

from agencyfl.alignment.errors import MessageRejectedError, ProtocolError
from agencyfl.alignment.psi import generate_key
from agencyfl.alignment.register import AgencyState, HolderState, RegisterAgency, RegisterHolder
from agencyfl.alignment.relay import StepTransport
from agencyfl.alignment.remote import (
    RECORD_DOMAIN,
    REPLY_KEY,
    REQUEST_KEY,
    AlignmentPlan,
    AlignReply,
    AlignRequest,
    Step,
)
from agencyfl.alignment.runs import (
    ProtocolRun,
    abandon_staged,
    abandon_stale,
    add_to_staged,
    commit_staged,
    expiry,
    read_ids,
    stage,
    write_agency_files,
    write_holder_files,
)
from agencyfl.alignment.sealed import PartyKeys, PartyPublicKeys, certified_peers, certify, pack, unpack
from agencyfl.clients.signed_plan import record_refused_request
from agencyfl.clients.site import AgencySite
from agencyfl.federation.errors import AgencyflError, SpecError
from agencyfl.federation.fingerprint import file_fingerprint
from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
from agencyfl.privacy.keys import keyring_key, load_signing_key
from agencyfl.privacy.plan_signature import plan_signature_problem

STATE_KEY = "alignment-run"
RECORD_FILE = "run-record.json"  # the coordinator's signed record of the run, kept with the output
OUTPUT = "alignment"
PEERS = "peers"


def peers_dir(home: Path) -> Path:
    """Where a steward keeps the ledger keys of the parties its agency aligns with."""
    return home / PEERS


def handle(message: Message, context: Context, site: AgencySite) -> Message:
    """Answer one ``query.align`` message with this party's reply (ok, refused or failed)."""
    step: Step = "keys"
    try:
        request = AlignRequest.from_record(message.content.config_records[REQUEST_KEY])
        step = request.step
        loaded = _own_spec(site)
        refusal = _refusal(site, loaded, request)
        if refusal is not None:
            record_refused_request(site, f"align:{step}", {"job": request.run}, refusal)
            reply = AlignReply(party=site.agency, step=step, status="refused", error="MessageRejectedError",
                               reason=refusal)  # fmt: skip
        else:
            reply = _Party(site, loaded, context, request).run()
    except AgencyflError as exc:
        reply = AlignReply(party=site.agency, step=step, status="failed", error=type(exc).__name__, reason=str(exc))
    except KeyError:
        reply = AlignReply(party=site.agency, step=step, status="failed", error="MessageRejectedError",
                           reason="not an alignment request")  # fmt: skip
    except Exception as exc:  # noqa: BLE001  # anything else: a one-line reply, never a traceback to the relay
        reason = f"{site.agency} could not carry out step {step!r} ({exc.__class__.__name__})"
        reply = AlignReply(party=site.agency, step=step, status="failed", error="ProtocolError", reason=reason)
    return Message(RecordDict({REPLY_KEY: reply.to_record()}), reply_to=message)


def _own_spec(site: AgencySite) -> LoadedVerticalSpec:
    loaded = load_any_spec(site.spec_path)
    if not isinstance(loaded, LoadedVerticalSpec):
        raise SpecError(f"{site.agency}'s spec is horizontal: it takes part in no alignment")
    return loaded


def _refusal(site: AgencySite, loaded: LoadedVerticalSpec, request: AlignRequest) -> str | None:
    """Why this agency refuses the request (another spec, not the coordinator's plan, not a party), or None."""
    if request.spec_sha256 != loaded.sha256:
        return (
            f"the coordinator's spec (SHA-256 {request.spec_sha256[:16]}...) is not this agency's copy "
            f"({loaded.sha256[:16]}...)"
        )
    plan = AlignmentPlan.from_spec(loaded, request.run)
    if site.agency not in plan.parties:
        return f"{site.agency} is not a party of this federation's alignment"
    return plan_signature_problem(plan.signed_bytes(), request.signature, site.coordinator_key)


class _Party:
    """This agency's role (register holder or agency) for one step, resumed from the run state."""

    def __init__(self, site: AgencySite, loaded: LoadedVerticalSpec, context: Context, request: AlignRequest) -> None:
        self.site, self.loaded, self.context, self.request = site, loaded, context, request
        self.spec = loaded.spec
        self.plan = AlignmentPlan.from_spec(loaded, request.run)
        self.is_register = site.agency == self.plan.holder
        self.peers = [p for p in self.plan.parties if p != site.agency] if self.is_register else [self.plan.holder]
        self.output = site.home / OUTPUT

    # -------------------------------------------------------------- run state (SuperNode memory)
    def _state(self) -> ConfigRecord:
        state = self.context.state.config_records.get(STATE_KEY)
        if state is None or state.get("run") != self.request.run:
            raise ProtocolError(
                f"{self.site.agency}: step {self.request.step!r} of run {self.request.run} out of order"
            )
        return state

    def _bytes(self, key: str) -> bytes:
        value = self._state().get(key, b"")
        if not isinstance(value, bytes) or not value:
            raise ProtocolError(f"{self.site.agency}: the run state lacks {key!r} (a step out of order)")
        return value

    def _keys(self) -> PartyKeys:
        return PartyKeys.from_private_bytes(self.site.agency, self._bytes("keys"))

    def _directory(self) -> dict[str, PartyPublicKeys]:
        directory = {self.site.agency: self._keys().public()}
        for peer in self.peers:
            raw = self._bytes(f"peer.{peer}")
            directory[peer] = PartyPublicKeys(name=peer, sealing=raw[:32], signing=raw[32:])
        return directory

    def _role(self) -> RegisterHolder | RegisterAgency:
        salt, run, batch = bytes.fromhex(self.spec.alignment.salt), self.request.run, self.spec.alignment.batch_size
        key = self._bytes("blinding")
        if self.is_register:
            return RegisterHolder(self._keys(), self._directory(), salt=salt, run=run, batch_size=batch, key=key)
        return RegisterAgency(
            self._keys(), self._directory(), register=self.plan.holder, salt=salt, run=run, batch_size=batch, key=key
        )

    def _resumed(self) -> RegisterHolder | RegisterAgency:
        role = self._role()
        saved = self._bytes("role")
        if isinstance(role, RegisterHolder):
            role.resume(HolderState.model_validate_json(saved))
        else:
            role.resume(AgencyState.model_validate_json(saved))
        return role

    def _keep(self, role: RegisterHolder | RegisterAgency) -> None:
        self._state()["role"] = role.suspend().model_dump_json().encode()

    # -------------------------------------------------------------- steps
    def run(self) -> AlignReply:
        step = self.request.step
        certificate = b""
        transport = StepTransport([unpack(e) for e in self.request.envelopes])
        if step == "keys":
            certificate = self._draw_keys()
        elif step == "parameters":
            self._accept_certificates()
            role = self._role()
            try:
                role.send_parameters(transport, self.peers)
            finally:
                role.close()
        elif step == "blind":
            self._blind(transport)
        elif step == "answer":
            self._answer(transport)
        elif step == "finish":
            self._finish(transport)
        elif step == "commit":
            self._state()  # refuses a commit of another run
            add_to_staged(self.output, self.request.run, RECORD_FILE, self._recorded_run())
            commit_staged(self.output, self.request.run)
            self.context.state.config_records.pop(STATE_KEY, None)
        else:  # abandon: whatever happened elsewhere, nothing of this run stays here
            abandon_staged(self.output, self.request.run)
            state = self.context.state.config_records.get(STATE_KEY)
            if state is not None and state.get("run") == self.request.run:  # another run's state is not ours to end
                self.context.state.config_records.pop(STATE_KEY, None)
        return AlignReply(party=self.site.agency, step=step, status="ok", certificate=certificate,
                          envelopes=[pack(e) for e in transport.outbound])  # fmt: skip

    def _recorded_run(self) -> str:
        """The coordinator's chain entry of this run, checked: signed by its key, this run, these parties and
        parameters, and this party's own input size as the relay saw it. A party commits nothing else."""
        problem = plan_signature_problem(
            RECORD_DOMAIN + self.request.record.encode(), self.request.record_signature, self.site.coordinator_key
        )
        if problem is not None:
            raise MessageRejectedError(f"the coordinator's record of run {self.request.run}: {problem}")
        try:
            record = ProtocolRun.model_validate_json(self.request.record)
        except ValueError:
            raise MessageRejectedError(f"the coordinator's record of run {self.request.run} is malformed") from None
        own_rows = int(self._state().get("rows", -1))  # type: ignore[arg-type]
        expected = (self.request.run, "register-alignment", self.spec.alignment_sha256(), list(self.plan.parties))
        got = (record.run, record.kind, record.parameters_sha256, record.parties)
        if got != expected or record.sizes.get(self.site.agency) != own_rows:
            raise MessageRejectedError(
                f"the coordinator's record of run {self.request.run} is not the run {self.site.agency} took part in "
                f"(run, parties, parameters or its own size {own_rows} differ)"
            )
        return record.model_dump_json(indent=2)

    def _draw_keys(self) -> bytes:
        abandon_stale(self.output, self.request.run)  # output staged by runs that never ended
        keys = PartyKeys.generate(self.site.agency)
        state = ConfigRecord({"run": self.request.run, "keys": keys.private_bytes(), "blinding": generate_key()})
        self.context.state.config_records[STATE_KEY] = state
        return certify(self.request.run, keys.public(), load_signing_key(self.site.signing_key_path))

    def _accept_certificates(self) -> None:
        state = self._state()
        held = {p: k for p in self.peers if (k := keyring_key(peers_dir(self.site.home), p)) is not None}
        directory = certified_peers(
            self.request.run, self.site.agency, self.peers, self.request.certificates, held, "align"
        )
        for peer, public in directory.items():
            state[f"peer.{peer}"] = public.sealing + public.signing

    def _blind(self, transport: StepTransport) -> None:
        # the note of what was aligned is the file as it was read, not as it may be by the last step
        self._state()["file-sha256"] = file_fingerprint(self.site.data_path)
        role = self._role()
        try:
            role.check_parameters(transport, self.peers)
            ids = read_ids(self.site.data_path, self.spec.alignment.id_column)
            if isinstance(role, RegisterHolder):
                role.send_register(transport, ids, self.peers)
            else:
                role.send_rows(transport, ids)
            self._keep(role)
            self._state()["rows"] = transport.outbound[0].rows if transport.outbound else 0
        finally:
            role.close()

    def _answer(self, transport: StepTransport) -> None:
        role = self._resumed()
        if not isinstance(role, RegisterHolder):
            raise ProtocolError(f"{self.site.agency} is not the register holder: it answers no query")
        try:
            for peer in self.peers:  # each row is a membership test: the spec may cap an agency's query
                role.answer(transport, peer, max_rows=self.spec.agency(peer).max_rows)
            view, quarantine, records = role.view(), role.quarantine, role.records()
        finally:
            role.close()
        self._stage(lambda folder, sha: write_holder_files(
            folder, quarantine, view, records, sha, self.spec.alignment_sha256(), self.request.run))  # fmt: skip

    def _finish(self, transport: StepTransport) -> None:
        role = self._resumed()
        if not isinstance(role, RegisterAgency):
            raise ProtocolError(f"{self.site.agency} is the register holder: it has no rows to finish")
        try:
            result = role.finish(transport)
        finally:
            role.close()
        self._stage(lambda folder, sha: write_agency_files(
            folder, result, [result.record()], sha, self.spec.alignment_sha256(), self.request.run))  # fmt: skip

    def _stage(self, write: Callable[[Path, str], list[str]]) -> None:
        now = datetime.now(UTC)
        sha = str(self._state()["file-sha256"])
        stage(self.output, self.request.run, now, expiry(now, self.spec.alignment.retention_days),
              lambda folder: write(folder, sha))  # fmt: skip
