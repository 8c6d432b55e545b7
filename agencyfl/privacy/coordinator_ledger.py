"""The coordinator's countersigned chain: one signed entry per round it ran, and one for the final releases.

Each entry records what the coordinator saw in a round: which agencies answered, whether each trained
or refused, the epsilon each reported, its dataset fingerprint, and the SHA-256 of the global model
after the round. It is a ``Ledger`` of ``RoundSummary`` events signed with the coordinator's own key,
so an auditor holding both parties' public keys can cross-check the chains (``privacy.crosscheck``):
an agency cannot quietly drop a round the coordinator saw it train, and the coordinator cannot claim
rounds (or epsilons) an agency never recorded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from agencyfl.federation.messages import Refusal, ReleaseReport, TrainReport
from agencyfl.privacy.keys import load_or_create_signing_key
from agencyfl.privacy.ledger import Ledger


class AgencyReport(BaseModel):
    """One agency's reply in one round, as the coordinator received it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    agency: str
    status: Literal["trained", "refused", "released"]
    epsilon_job: float
    epsilon_lifetime: float
    dataset: str
    reason: str | None = None
    origin: str = ""  # the origin (genesis hash) of the agency's ledger, as it reported it ("" before it did)
    epsilon_lifetime_rdp: float | None = None  # the lifetime by RDP alone, as reported (None: not reported)
    accepted: bool = True  # False: the coordinator refused this reply (ledger restarted, epsilon went down)
    releases: list[Literal["evaluation", "fairness"]] = []  # the noised releases the reply carried

    @classmethod
    def of(cls, reply: TrainReport | ReleaseReport | Refusal, *, judged: str | None) -> AgencyReport:
        """The record of ``reply``; ``judged``: why the coordinator refused it (None: accepted)."""
        releases: list[Literal["evaluation", "fairness"]] = []
        dataset = ""
        if isinstance(reply, TrainReport):
            dataset, releases = reply.dataset, ["evaluation"] if reply.evaluation else []
        elif isinstance(reply, ReleaseReport):
            releases = reply.releases
        return cls(
            agency=reply.agency,
            status=reply.status,
            epsilon_job=reply.epsilon_job,
            epsilon_lifetime=reply.epsilon_lifetime,
            dataset=dataset,
            reason=judged or reply.reason or None,
            origin=reply.origin,
            epsilon_lifetime_rdp=reply.epsilon_lifetime_rdp or None,
            accepted=judged is None,
            releases=releases,
        )


class RoundSummary(BaseModel):
    """What the coordinator countersigns after each round of a job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["round", "evaluation"] = "round"  # evaluation: the final releases, after the last round
    federation: str
    job: str
    round: int
    spec_sha256: str
    aggregated: bool  # False: too few trained updates, the model stayed as it was
    agencies: list[AgencyReport]
    model_sha256: str  # the global model after this round
    time: str

    @property
    def party(self) -> str:
        """Whose ledger this event belongs in: the coordinator's."""
        return "coordinator"


def weights_sha256(arrays: Sequence[np.ndarray]) -> str:
    """A fingerprint of model weights: SHA-256 over each array's dtype, shape and bytes, in order.

    The registry's model card carries the same fingerprint, so a model version links to the round of
    the coordinator's chain that produced it.
    """
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


def open_coordinator_ledger(directory: Path, signing_key_path: Path) -> Ledger[RoundSummary]:
    """The coordinator's chain at ``directory``, signed with the key at ``signing_key_path`` (made on first use)."""
    return Ledger(directory, load_or_create_signing_key(signing_key_path), RoundSummary, party="coordinator")
