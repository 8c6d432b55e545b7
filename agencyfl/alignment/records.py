"""What an alignment run leaves for a ledger entry: who, for what, and counts (never ids)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agencyfl.alignment.inputs import Quarantined

Purpose = Literal["register-alignment", "duplicate-check"]


class AlignmentRecord(BaseModel):
    """One party's account of one alignment with one counterpart.

    Not a differential-privacy release: the counts are the stated leakage of the protocol
    (``docs/alignment.md``, "Messages").
    """

    model_config = ConfigDict(frozen=True)

    party: str
    purpose: Purpose
    counterpart: str
    own_rows: int = Field(ge=0)
    """Valid ids this party put into the protocol."""
    counterpart_rows: int = Field(ge=0)
    """The counterpart's set size, as this party learned it."""
    matched: int | None = Field(default=None, ge=0)
    """Own rows found in the counterpart's set; None where this party does not learn it (the register holder)."""
    quarantined: int = Field(ge=0)
    """Own rows kept out for an invalid id."""


def write_quarantine(path: Path, quarantine: tuple[Quarantined, ...]) -> Path:
    """Write a party's own quarantined rows and reasons as CSV (``row,reason``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "reason"])
        writer.writerows((q.row, q.reason) for q in quarantine)
    return path
