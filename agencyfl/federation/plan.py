"""A job's plan: what a job may spend at an agency, derived from the spec every party holds.

The coordinator names the job and the spec it runs (``JobPlan.claimed``, from a fit request's
config); the agency derives the plan from its *own* copy of the spec (``JobPlan.from_spec``) and
refuses a request whose plan differs (``mismatch``). The plan never comes from the coordinator alone:
the number of rounds decides the noise of every round, so a coordinator that could say "one round"
would put the whole job budget into it.

Issue 11 item 1 (coordinator-signed plans) checks a signature over ``signed_bytes`` at the same place,
``clients.admission.admit``; the fields here are the ones such a signature will cover.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from agencyfl.federation.spec import LoadedSpec


class JobPlan(BaseModel):
    """One job: its id, the spec it runs, its rounds and its per-job epsilon at each agency."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: str
    job: str
    spec_sha256: str
    rounds: int
    epsilon: float

    @classmethod
    def from_spec(cls, loaded: LoadedSpec, job: str) -> JobPlan:
        """The plan of ``job`` as the holder of ``loaded`` must run it."""
        spec = loaded.spec
        return cls(
            federation=spec.federation.name,
            job=job,
            spec_sha256=loaded.sha256,
            rounds=spec.training.rounds,
            epsilon=spec.privacy.epsilon,
        )

    def mismatch(self, other: JobPlan) -> str | None:
        """Why ``other`` (the coordinator's claim) is not this plan, or None when they agree."""
        if other.spec_sha256 != self.spec_sha256:
            return "the coordinator's spec differs from this agency's copy (sha256 mismatch)"
        for name in ("federation", "job", "rounds", "epsilon"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"the coordinator's plan says {name} {theirs!r}; this agency's spec says {mine!r}"
        return None

    def signed_bytes(self) -> bytes:
        """The canonical bytes a coordinator's signature over this plan covers (issue 11 item 1)."""
        return json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":")).encode()
