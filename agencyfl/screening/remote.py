"""What starts a screening in a deployment: the coordinator's signed screening plan (``docs/screening.md``).

The coordinator checks the token and the purpose first (a refusal is recorded and nothing is sent),
then its ServerApp signs a ``ScreeningPlan`` and sends it, with a challenge per node, in the same
``query.vertical`` message that starts a vertical job; each party checks it against its own spec and
its own part of the model, then takes part over its stream (``screening.session``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field

from agencyfl.alignment.remote import RUN_ID
from agencyfl.federation.errors import DataFileError
from agencyfl.federation.spec import LoadedVerticalSpec
from agencyfl.screening.records import COORDINATOR, ModelUse

if TYPE_CHECKING:
    from agencyfl.vertical.model import RegisteredVerticalModel

TASK = "screen"


MODEL_VERSION = r"^[A-Za-z0-9][A-Za-z0-9._-]*/v[0-9]{4,}$"  # FEDERATION/vNNNN: never a path elsewhere


class PreviousModel(BaseModel):
    """The model an earlier screening used, as the registry holds it (hashes only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_version: Annotated[str, Field(pattern=MODEL_VERSION)]
    model_sha256: str
    parts: dict[str, str]


class ScreeningPlan(BaseModel):
    """What the coordinator signs for one screening; each party checks it against its own spec and part."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: str
    screening: Annotated[str, Field(pattern=RUN_ID)]
    spec_sha256: str
    model_version: Annotated[str, Field(pattern=MODEL_VERSION)]
    model_sha256: str  # the manifest's SHA-256 (the card's model_sha256)
    parts: dict[str, str]  # each party's part SHA-256, from the manifest
    purpose: str
    requester: str  # civil affairs: the only party that decrypts the scores
    token_id: str
    register_size: int = Field(ge=1)
    stream: str
    review_band: float = Field(ge=0.0, le=0.5)
    since: Annotated[str, Field(pattern=RUN_ID)] | None = None
    """An earlier screening whose worklist (at civil affairs) this one is compared with (``--since``)."""
    previous: PreviousModel | None = None
    """That screening's model when it was another version still in the registry: re-scored on today's facts
    to tell a change of facts from a change of model."""

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
        if self.previous is not None and (
            self.since is None
            or self.previous.model_version == self.model_version
            or set(self.previous.parts) != set(self.parts)
        ):
            return "the previous model is named without an earlier screening, is this one, or has other parties"
        if self.purpose != spec.federation.purpose:
            return f"the purpose {self.purpose!r} is not this federation's ({spec.federation.purpose!r})"
        return None


def recorded_screening(folder: Path, key_path: Path, screening: str, model: RegisteredVerticalModel) -> ModelUse:
    """The coordinator's own record of the earlier ``screening`` of ``model``'s federation (``--since``).

    Raises
    ------
    DataFileError
        If its uses ledger records no such screening.
    """
    from agencyfl.screening.records import uses_ledger_at

    if not re.fullmatch(RUN_ID, screening):
        raise DataFileError(f"{screening[:60]!r} is not a screening id")
    found = [
        e for e in uses_ledger_at(folder, key_path, COORDINATOR).events()
        if e.kind == "screening" and e.screening == screening and e.federation == model.manifest.federation
    ]  # fmt: skip
    if not found:
        raise DataFileError(f"this coordinator recorded no screening {screening} of {model.manifest.federation}")
    return found[-1]


def previous_model(registry: Path, recorded: ModelUse, current: RegisteredVerticalModel) -> PreviousModel | None:
    """The earlier screening's model, when it is another version still in the registry (else None: the same
    model needs no second scoring, and a model no longer registered cannot be run)."""
    from agencyfl.vertical.model import RegisteredVerticalModel

    if recorded.model_version == current.version or not (registry / recorded.model_version / "manifest.json").exists():
        return None
    old = RegisteredVerticalModel(registry / recorded.model_version)
    if old.loaded.sha256 != current.loaded.sha256:  # trained under another spec: it cannot run on today's blocks
        return None
    return PreviousModel(
        model_version=old.version, model_sha256=old.manifest.sha256(),
        parts={p: part.sha256 for p, part in old.manifest.parts.items()},
    )  # fmt: skip
