"""The one gate every request passes at an agency before anything is computed from its records.

``admit`` checks a request against the agency's own spec and ledger: the job's plan (from the
agency's spec, not the coordinator's word), the round's place in the job, replays, where a new job
starts, and the coordinator's record of this agency's ledger. It returns the reason to refuse, or
None. It reads no record: a refused request is answered with the refusal alone.

Issue 11 item 1 adds the coordinator's signature over the plan here (``JobPlan.signed_bytes``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.messages import LedgerRecord
from agencyfl.federation.model import build_model, model_to_arrays
from agencyfl.federation.plan import JobPlan
from agencyfl.federation.spec import LoadedSpec
from agencyfl.privacy.accounting import epsilon_for
from agencyfl.privacy.budget import lifetime_rdp
from agencyfl.privacy.ledger import LedgerEvent, spend_records

_AGREE = 1e-9


def initial_arrays(loaded: LoadedSpec) -> list[np.ndarray]:
    """The model every job of this spec starts from (the spec's seed; the coordinator builds the same)."""
    spec = loaded.spec
    return model_to_arrays(build_model(spec.model, FeatureEncoder(spec.schema).width, seed=spec.training.seed))


def _same_arrays(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _check_record(events: list[LedgerEvent], origin: str, known: LedgerRecord | None) -> str | None:
    """Why the coordinator's record of this agency's ledger contradicts the ledger, or None."""
    if known is None:
        return None
    if known.origin and origin and known.origin != origin:
        return (
            f"the coordinator's chain records this agency's ledger as {known.origin[:12]}, this ledger is "
            f"{origin[:12]}: the ledger was restarted or replaced (restore it)"
        )
    lifetime = epsilon_for(spend_records(events), events[-1].delta) if events else 0.0
    lost = known.lost_spend(lifetime, lifetime_rdp(events))  # like with like (a ledger of releases counts lower now)
    if lost is not None:
        return (
            f"the coordinator's chain records a lifetime epsilon of {lost[1]:.4f} for this "
            f"agency, its ledger holds {lost[0]:.4f}: entries are missing (restore the ledger)"
        )
    return None


def admit(
    loaded: LoadedSpec,
    events: list[LedgerEvent],
    origin: str,
    claimed: JobPlan,
    round_: int,
    arrays: Sequence[np.ndarray],
    steps: int,
    known: LedgerRecord | None = None,
) -> str | None:
    """Why this agency must refuse round ``round_`` of the plan ``claimed``, or None to go on.

    Parameters
    ----------
    loaded
        The agency's own spec.
    events
        Its verified ledger.
    origin
        Its ledger's origin (the genesis hash).
    claimed
        The job plan as the coordinator states it.
    round_
        The round asked for (1-based).
    arrays
        The global model the round starts from.
    steps
        The DP-SGD steps the round would take (from the agency's spec).
    known
        The coordinator's record of this agency's ledger, if it sent one.
    """
    own = JobPlan.from_spec(loaded, claimed.job)
    if (reason := own.mismatch(claimed)) is not None:
        return reason
    if (reason := _check_record(events, origin, known)) is not None:  # the ledger first
        return reason
    if steps <= 0:
        return f"the round would take {steps} DP-SGD steps: nothing to train"
    if not 1 <= round_ <= own.rounds:
        return f"round {round_} is outside the job's plan of {own.rounds} rounds"
    if any(e.kind == "round" and e.job == claimed.job and e.round == round_ for e in events):
        return f"round {round_} of job {claimed.job} was already trained here"
    trained_in_job = any(e.kind == "round" and e.job == claimed.job for e in events)
    if not trained_in_job:
        if round_ != 1:
            return f"job {claimed.job} is new to this agency: it must start at round 1, not {round_}"
        if not _same_arrays(arrays, initial_arrays(loaded)):
            return f"round 1 of job {claimed.job} does not start from the spec's initial model"
    return None


def admit_release(
    loaded: LoadedSpec,
    events: list[LedgerEvent],
    origin: str,
    claimed: JobPlan,
    known: LedgerRecord | None = None,
) -> str | None:
    """Why this agency must refuse the final evaluation of ``claimed``'s job, or None to go on.

    A job's final releases are made once, and only for a job this agency trained in: anything else
    would be an evaluation channel outside the job's plan.
    """
    own = JobPlan.from_spec(loaded, claimed.job)
    if (reason := own.mismatch(claimed)) is not None:
        return reason
    if (reason := _check_record(events, origin, known)) is not None:
        return reason
    if not any(e.kind == "round" and e.job == claimed.job for e in events):
        return f"this agency did not train in job {claimed.job}: nothing of it to evaluate"
    final = own.rounds + 1
    if any(e.kind == "release" and e.job == claimed.job and e.round == final for e in events):
        return f"the final evaluation of job {claimed.job} was already released"
    return None
