"""What starts a deployed vertical job: the coordinator's signed plan, and how an agency proves who it is.

The coordinator's ServerApp sends each party's SuperNode one ``query.vertical`` Flower message (the
signed ``VerticalJobPlan`` and a fresh challenge for that node); the agency then dials the coordinator's
stream and says ``hello``, signed with its SuperNode key over the challenge (``hello_bytes``). The
coordinator checks it with the node key registered for that agency (``coordinator register``).
``docs/vertical.md``, "In a deployment", is the design.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field

from agencyfl.alignment.remote import RUN_ID
from agencyfl.federation.errors import DeploymentError, MessageRejectedError
from agencyfl.federation.messages import VERTICAL_MESSAGE_TYPE
from agencyfl.federation.spec import LoadedVerticalSpec
from agencyfl.vertical.plan import VerticalPlan

MESSAGE_TYPE = VERTICAL_MESSAGE_TYPE
REQUEST_KEY = "vertical"
REPLY_KEY = "vertical-reply"
HELLO_DOMAIN = b"agencyfl vertical stream hello v1\n"


class VerticalJobPlan(BaseModel):
    """What the coordinator signs for a deployed vertical job; each party rebuilds the privacy part from its
    own spec and refuses a plan that differs (``check_against``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: str
    job: Annotated[str, Field(pattern=RUN_ID)]
    spec_sha256: str
    label_holder: str
    parties: tuple[str, ...]
    iterations: int
    epsilon: float
    delta: float
    noise_multiplier: float
    register_size: int = Field(ge=1)
    stream: str  # host:port of the coordinator's stream

    @classmethod
    def of(
        cls, loaded: LoadedVerticalSpec, plan: VerticalPlan, job: str, register_size: int, stream: str
    ) -> VerticalJobPlan:
        """The plan of ``job`` for this spec (civil affairs first, then the others in spec order)."""
        spec = loaded.spec
        holder = spec.label_agency.name
        others = tuple(a.name for a in spec.agencies if a.name != holder)
        return cls(
            federation=spec.federation.name, job=job, spec_sha256=loaded.sha256, label_holder=holder,
            parties=(holder, *others), iterations=plan.iterations, epsilon=plan.epsilon, delta=plan.delta,
            noise_multiplier=plan.noise_multiplier, register_size=register_size, stream=stream,
        )  # fmt: skip

    def signed_bytes(self) -> bytes:
        """Canonical bytes; ``kind`` keeps them from ever reading as another kind of plan."""
        fields = {"kind": "vertical-train", **self.model_dump(mode="json")}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def check_against(self, loaded: LoadedVerticalSpec, plan: VerticalPlan, agency: str) -> str | None:
        """Why ``agency`` refuses this plan given its own spec (another spec, other noise, not a party), or None."""
        if self.spec_sha256 != loaded.sha256:
            return f"the coordinator's spec (SHA-256 {self.spec_sha256[:16]}...) is not this agency's copy"
        own = VerticalJobPlan.of(loaded, plan, self.job, self.register_size, self.stream)
        if own != self:
            differs = [k for k in self.model_fields if getattr(own, k) != getattr(self, k)]
            return f"the coordinator's job plan differs from this agency's spec in {', '.join(differs)}"
        if agency not in self.parties:
            return f"{agency} is not a party of this federation"
        return None


def hello_bytes(job: str, agency: str, challenge: bytes) -> bytes:
    """What an agency signs with its SuperNode key to open its stream for ``job``."""
    return HELLO_DOMAIN + json.dumps([job, agency, challenge.hex()]).encode()


def sign_hello(node_key: Path, job: str, agency: str, challenge: bytes) -> bytes:
    """The agency's signature (ECDSA P-384, SHA-384) with its SuperNode's private key.

    Raises
    ------
    DeploymentError
        If the key cannot be read.
    """
    try:
        key = serialization.load_ssh_private_key(node_key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise DeploymentError(f"cannot read the SuperNode key {node_key}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeploymentError(f"{node_key} is not an ECDSA key")
    return key.sign(hello_bytes(job, agency, challenge), ec.ECDSA(hashes.SHA384()))


def verify_hello(public_key: str, signature: bytes, job: str, agency: str, challenge: bytes) -> None:
    """Check a hello's signature with the node key registered for ``agency`` (OpenSSH text).

    Raises
    ------
    MessageRejectedError
        If it does not verify.
    """
    try:
        key = serialization.load_ssh_public_key(public_key.encode())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("not an ECDSA key")
        key.verify(signature, hello_bytes(job, agency, challenge), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError, UnicodeError) as exc:
        raise MessageRejectedError(f"{agency}'s hello is not signed by its registered SuperNode key ({exc})") from None
