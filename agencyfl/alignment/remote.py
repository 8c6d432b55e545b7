"""The messages of ``agencyfl coordinator align``: the signed plan, a step's request and a party's reply.

The coordinator's ServerApp sends one ``query.align`` message per party per step
(``server.alignment_run``); each party's ClientApp answers it (``clients.alignment_steps``). What
travels besides the plan is what the one-machine relay carries: sealed envelopes (``sealed.pack``)
and, in the first two steps, each party's certified public run keys. ``docs/alignment.md``, "In a
deployment", is the design.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from flwr.app import ConfigRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agencyfl.alignment.errors import MessageRejectedError
from agencyfl.federation.messages import ALIGN_MESSAGE_TYPE
from agencyfl.federation.spec import LoadedVerticalSpec

MESSAGE_TYPE = ALIGN_MESSAGE_TYPE
REQUEST_KEY = "align"
REPLY_KEY = "align-reply"
Step = Literal["keys", "parameters", "blind", "answer", "finish", "commit", "abandon"]
Status = Literal["ok", "refused", "failed"]
_CERT_PREFIX = "cert."
RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$"  # a run id names folders: a safe name, never a path
RECORD_DOMAIN = b"agencyfl alignment record v1\n"  # what the coordinator signs for a commit (never a plan)


class AlignmentPlan(BaseModel):
    """What the coordinator signs for one alignment run, and every party rebuilds from its own spec."""

    model_config = ConfigDict(frozen=True)

    federation: str
    run: Annotated[str, Field(pattern=RUN_ID)]
    spec_sha256: str
    holder: str  # the register holder (civil affairs)
    parties: tuple[str, ...]

    @classmethod
    def from_spec(cls, loaded: LoadedVerticalSpec, run: str) -> AlignmentPlan:
        """The plan of ``run`` as this spec describes it (civil affairs first, then the others in spec order)."""
        spec = loaded.spec
        register = spec.label_agency.name
        others = tuple(a.name for a in spec.agencies if a.name != register)
        return cls(federation=spec.federation.name, run=run, spec_sha256=loaded.sha256, holder=register,
                   parties=(register, *others))  # fmt: skip

    def signed_bytes(self) -> bytes:
        """Canonical bytes; ``kind`` keeps them from ever reading as a training job's plan."""
        fields = {"kind": "register-alignment", **self.model_dump(mode="json")}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


class AlignRequest(BaseModel):
    """One step's message to one party."""

    model_config = ConfigDict(frozen=True)

    step: Step
    run: Annotated[str, Field(pattern=RUN_ID)]
    spec_sha256: str
    signature: str
    certificates: dict[str, bytes] = {}
    envelopes: list[bytes] = []
    record: str = ""  # commit: the coordinator's chain entry of the run (a ``ProtocolRun``, JSON) ...
    record_signature: str = ""  # ... signed with its ledger key (``RECORD_DOMAIN``)

    def to_record(self) -> ConfigRecord:
        """As a Flower ConfigRecord."""
        record: dict[str, str | bytes | list[bytes]] = {
            "step": self.step, "run": self.run, "spec-sha256": self.spec_sha256, "plan-signature": self.signature,
            "envelopes": list(self.envelopes), "record": self.record, "record-signature": self.record_signature,
        }  # fmt: skip
        record.update({_CERT_PREFIX + name: cert for name, cert in self.certificates.items()})
        return ConfigRecord(record)  # type: ignore[arg-type]

    @classmethod
    def from_record(cls, record: ConfigRecord) -> AlignRequest:
        """Read a request; MessageRejectedError if it is not one."""
        try:
            return cls.model_validate({
                "step": record["step"], "run": record["run"], "spec_sha256": record["spec-sha256"],
                "signature": record["plan-signature"], "envelopes": record.get("envelopes") or [],
                "record": record.get("record", ""), "record_signature": record.get("record-signature", ""),
                "certificates": {k[len(_CERT_PREFIX):]: v for k, v in record.items() if k.startswith(_CERT_PREFIX)},
            })  # fmt: skip
        except (KeyError, ValidationError, TypeError) as exc:
            raise MessageRejectedError(f"a malformed alignment request ({exc.__class__.__name__})") from None


class AlignReply(BaseModel):
    """A party's answer to one step: ok with what it sends on, or the refusal or failure alone."""

    model_config = ConfigDict(frozen=True)

    party: str
    step: Step
    status: Status
    error: str = ""  # the error's class name (the coordinator's exit code follows it)
    reason: str = ""
    certificate: bytes = b""
    envelopes: list[bytes] = []

    def to_record(self) -> ConfigRecord:
        """As a Flower ConfigRecord."""
        return ConfigRecord(
            {"party": self.party, "step": self.step, "status": self.status, "error": self.error,
             "reason": self.reason, "certificate": self.certificate, "envelopes": list(self.envelopes)}
        )  # fmt: skip

    @classmethod
    def from_record(cls, record: ConfigRecord) -> AlignReply:
        """Read a reply; MessageRejectedError if it is not one."""
        try:
            return cls.model_validate({
                "party": record["party"], "step": record["step"], "status": record["status"],
                "error": record.get("error", ""), "reason": record.get("reason", ""),
                "certificate": record.get("certificate", b""), "envelopes": record.get("envelopes") or [],
            })  # fmt: skip
        except (KeyError, ValidationError, TypeError) as exc:
            raise MessageRejectedError(f"a malformed alignment reply ({exc.__class__.__name__})") from None
