"""What caseworkers found: review outcomes, kept at civil affairs, shown on the next worklist, used as labels.

``WORKDIR/<civil affairs>/screening/outcomes.csv`` (0600): one row per recorded outcome (time,
household, outcome, screening, by, note). An outcome changes no enrolment: it records what a person
found and did through the normal procedure. Confirmed outcomes become labels for the next training
(``outcome_labels``): ``confirmed-invited`` and ``confirmed-enrolled`` say eligible, ``not-eligible``
says not; ``disagreed`` and ``not-reached`` say nothing about eligibility.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal, get_args

from agencyfl.federation.errors import DataFileError
from agencyfl.federation.resident_id import InvalidResidentId, normalize
from agencyfl.screening.records import now_iso

Outcome = Literal["confirmed-invited", "confirmed-enrolled", "not-eligible", "disagreed", "not-reached"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
LABEL_OF: dict[str, int] = {"confirmed-invited": 1, "confirmed-enrolled": 1, "not-eligible": 0}
OUTCOMES_FILE = Path("screening") / "outcomes.csv"
_FIELDS = ("time", "household", "outcome", "screening", "by", "note")


def outcomes_path(workdir: Path, requester: str) -> Path:
    """Where civil affairs keeps its outcomes."""
    return workdir / requester / OUTCOMES_FILE


def record_outcome(
    workdir: Path, requester: str, household: str, outcome: str, screening: str = "", by: str = "", note: str = ""
) -> dict[str, str]:
    """Append one outcome; returns the row written.

    Raises
    ------
    DataFileError
        If the household id is not a valid resident identity number, or the outcome is unknown.
    """
    try:
        canonical = normalize(household)
    except InvalidResidentId as exc:
        raise DataFileError(f"household {household!r} is not a valid resident identity number: {exc}") from None
    if outcome not in OUTCOMES:
        raise DataFileError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
    path = outcomes_path(workdir, requester)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    row = {"time": now_iso(), "household": canonical, "outcome": outcome, "screening": screening, "by": by,
           "note": " ".join(note.split())}  # fmt: skip
    with open(fd, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(_FIELDS))
        if new:
            writer.writeheader()
        writer.writerow(row)
    return row


def latest_outcomes(workdir: Path, requester: str) -> dict[str, str]:
    """Each household's last recorded outcome (canonical id -> outcome); empty when none was recorded."""
    path = outcomes_path(workdir, requester)
    if not path.exists():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return {r["household"]: r["outcome"] for r in csv.DictReader(fh)}
    except (OSError, KeyError, csv.Error) as exc:
        raise DataFileError(f"cannot read the outcomes at {str(path)!r}: {exc}") from None


def outcome_labels(workdir: Path, requester: str) -> dict[str, int]:
    """Labels from confirmed outcomes (canonical id -> 1 eligible, 0 not), for the next training."""
    return {h: LABEL_OF[o] for h, o in latest_outcomes(workdir, requester).items() if o in LABEL_OF}
