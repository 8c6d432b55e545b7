"""What starts a screening in a deployment: the coordinator's signed screening plan (``docs/screening.md``).

The coordinator checks the token and the purpose first (a refusal is recorded and nothing is sent),
then its ServerApp signs a ``ScreeningPlan`` and sends it, with a challenge per node, in the same
``query.vertical`` message that starts a vertical job; each party checks it against its own spec and
its own part of the model, then takes part over its stream (``screening.session``).
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from agencyfl.alignment.remote import RUN_ID
from agencyfl.federation.spec import LoadedVerticalSpec

TASK = "screen"


class ScreeningPlan(BaseModel):
    """What the coordinator signs for one screening; each party checks it against its own spec and part."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: str
    screening: Annotated[str, Field(pattern=RUN_ID)]
    spec_sha256: str
    model_version: str
    model_sha256: str  # the manifest's SHA-256 (the card's model_sha256)
    parts: dict[str, str]  # each party's part SHA-256, from the manifest
    purpose: str
    requester: str  # civil affairs: the only party that decrypts the scores
    token_id: str
    register_size: int = Field(ge=1)
    stream: str
    review_band: float = Field(ge=0.0, le=0.5)

    @property
    def parties(self) -> tuple[str, ...]:
        """The requester first, then the agencies with a part."""
        return (self.requester, *sorted(p for p in self.parts if p != self.requester))

    @property
    def job(self) -> str:
        """The id the streams' hellos name (the screening)."""
        return self.screening

    def signed_bytes(self) -> bytes:
        """Canonical bytes; ``kind`` keeps them from ever reading as a training or alignment plan."""
        fields = {"kind": "screening", **self.model_dump(mode="json")}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def check_against(self, loaded: LoadedVerticalSpec, agency: str) -> str | None:
        """Why ``agency`` refuses this plan given its own spec, or None."""
        spec = loaded.spec
        if self.spec_sha256 != loaded.sha256:
            return f"the coordinator's spec (SHA-256 {self.spec_sha256[:16]}...) is not this agency's copy"
        if self.federation != spec.federation.name or self.requester != spec.label_agency.name:
            return "the screening names another federation or another requester than this agency's spec"
        if set(self.parts) != {a.name for a in spec.agencies}:
            return "the screening's model has parts for other parties than this agency's spec lists"
        if agency not in self.parts:
            return f"{agency} is not a party of this federation"
        if self.purpose != spec.federation.purpose:
            return f"the purpose {self.purpose!r} is not this federation's ({spec.federation.purpose!r})"
        return None
