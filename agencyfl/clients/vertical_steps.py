"""An agency's side of ``agencyfl coordinator train`` with a vertical spec: one ``query.vertical`` message.

The message carries the coordinator's signed job plan and a challenge for this node. The agency
checks the plan against its *own* spec (signature, spec hash, noise, T, epsilon) before reading a
record, then dials the coordinator's stream, proves it is this node (the challenge signed with its
SuperNode key) and answers the job's frames (``vertical.session``) until the job ends. Its reply to
the Flower message is how it ended: the iterations themselves never travel as Flower messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from pydantic import ValidationError

from agencyfl.clients.alignment_steps import peers_dir
from agencyfl.clients.signed_plan import record_refused_request
from agencyfl.clients.site import AgencySite
from agencyfl.federation.errors import AgencyflError, DeploymentError, MessageRejectedError, SpecError
from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
from agencyfl.privacy.keys import load_signing_key
from agencyfl.privacy.plan_signature import plan_signature_problem
from agencyfl.screening.remote import ScreeningPlan
from agencyfl.vertical.encoding import PartyFiles
from agencyfl.vertical.job import plan_of
from agencyfl.vertical.remote import REPLY_KEY, REQUEST_KEY, VerticalJobPlan, sign_hello
from agencyfl.vertical.session import PartyConfig, PartySession, read_peer_keys
from agencyfl.vertical.stream import Frame, serve_party

if TYPE_CHECKING:
    from agencyfl.screening.session import ScreeningSession

    Session = PartySession | ScreeningSession


def handle(message: Message, context: Context, site: AgencySite) -> Message:
    """Take part in the job the message starts; answer how it ended (ok, refused or failed, one line)."""
    job = ""
    try:
        record = message.content.config_records[REQUEST_KEY]
        screening = record.get("task") == "screen"
        try:
            plan: VerticalJobPlan | ScreeningPlan = (
                ScreeningPlan.model_validate_json(str(record["plan"]))
                if screening
                else VerticalJobPlan.model_validate_json(str(record["plan"]))
            )
        except (ValidationError, KeyError) as exc:
            raise MessageRejectedError(f"a malformed vertical job plan ({exc.__class__.__name__})") from None
        job = plan.job
        raw_challenge = record.get("challenge", b"")
        challenge = raw_challenge if isinstance(raw_challenge, bytes) else b""
        loaded = load_any_spec(site.spec_path)
        if not isinstance(loaded, LoadedVerticalSpec):
            raise SpecError(f"{site.agency}'s spec is horizontal: it takes part in no vertical job")
        refusal = plan_signature_problem(plan.signed_bytes(), record.get("signature"), site.coordinator_key)
        if isinstance(plan, ScreeningPlan):
            refusal = refusal or plan.check_against(loaded, site.agency)
        else:
            refusal = refusal or plan.check_against(loaded, plan_of(loaded), site.agency)
        if refusal is None and len(challenge) != 32:
            refusal = "the job's challenge is not 32 bytes"
        if refusal is not None:
            record_refused_request(site, "vertical", {"job": job}, refusal)
            reply = {"status": "refused", "error": "MessageRejectedError", "reason": refusal}
        elif isinstance(plan, ScreeningPlan):
            reply = _screen(site, loaded, plan, challenge)
        else:
            reply = _take_part(site, loaded, plan, challenge)
    except AgencyflError as exc:
        reply = {"status": "failed", "error": type(exc).__name__, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001  # a one-line reply, never a traceback to the coordinator
        reply = {"status": "failed", "error": "ProtocolError", "reason": f"{site.agency}: {exc.__class__.__name__}"}
    content = ConfigRecord({"party": site.agency, "job": job, **reply})
    return Message(RecordDict({REPLY_KEY: content}), reply_to=message)


def _stream(
    site: AgencySite, plan: VerticalJobPlan | ScreeningPlan, challenge: bytes, session: Session
) -> dict[str, str]:
    """Dial the coordinator's stream, say hello as this node, answer frames until the end."""
    if site.root_certificate is None or site.keys_dir is None:
        raise DeploymentError(f"{site.agency}'s SuperNode was started without its CA certificate or keys folder")
    signature = sign_hello(site.keys_dir / "node.key", plan.job, site.agency, challenge)
    hello = Frame("hello", session.hello_fields(), [signature, session.certificate])
    last = serve_party(plan.stream, site.root_certificate.read_bytes(), hello, session.handle)
    if last.op == "abort":
        return {"status": "stopped", "error": "", "reason": str(last.fields.get("reason", ""))[:300]}
    return {"status": "ok", "error": "", "reason": ""}


def _screen(site: AgencySite, loaded: LoadedVerticalSpec, plan: ScreeningPlan, challenge: bytes) -> dict[str, str]:
    from agencyfl.screening.records import uses_ledger_at
    from agencyfl.screening.session import ScreeningConfig, ScreeningSession

    session = ScreeningSession(
        ScreeningConfig(
            agency=site.agency, loaded=loaded, plan=plan, files=PartyFiles(site.data_path, site.home),
            uses=uses_ledger_at(site.home, site.signing_key_path, site.agency),
            ledger_key=load_signing_key(site.signing_key_path),
            peer_keys=read_peer_keys(peers_dir(site.home), list(plan.parties)),
        )
    )  # fmt: skip
    return _stream(site, plan, challenge, session)


def _take_part(site: AgencySite, loaded: LoadedVerticalSpec, plan: VerticalJobPlan, challenge: bytes) -> dict[str, str]:
    session = PartySession(
        PartyConfig(
            agency=site.agency, loaded=loaded, job=plan, files=PartyFiles(site.data_path, site.home),
            ledger=site.open_ledger(), ledger_key=load_signing_key(site.signing_key_path),
            peer_keys=read_peer_keys(peers_dir(site.home), list(plan.parties)),
        )
    )  # fmt: skip
    return _stream(site, plan, challenge, session)
