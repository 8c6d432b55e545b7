"""Worklists from scores: who to invite, whose enrolment to review with them, who a person should look at.

Categories (``docs/screening.md``), with each household's cutoff c from the model card's decision rule
and the review band B:

- ``invite`` (漏保 candidates): not enrolled, score >= c + B;
- ``review-enrolment`` (错保 candidates): enrolled, score < c - B;
- ``human-review``: |score - c| <= B, unless enrolled with score >= c (the model agrees).

Nothing here changes an enrolment: these are lists for people. ``compare`` marks each listed household
against a previous worklist (new, unchanged, changed) and says why it changed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from agencyfl.federation.errors import DataFileError

Category = Literal["invite", "review-enrolment", "human-review"]
CATEGORIES: tuple[Category, ...] = ("invite", "review-enrolment", "human-review")
COLUMNS = (
    "household", "category", "score", "cutoff", "enrolled", "change", "previous_category", "cause",
    "review_status", "reasons", "model_version", "screening",
)  # fmt: skip


def categorize(
    scores: npt.NDArray[np.float64], cutoff: npt.NDArray[np.float64], enrolled: npt.NDArray[np.bool_], band: float
) -> npt.NDArray[np.str_]:
    """Each household's category, or "" when it is on no list."""
    near = np.abs(scores - cutoff) <= band
    out = np.full(len(scores), "", dtype=object)
    out[~enrolled & (scores >= cutoff + band) & ~near] = "invite"
    out[enrolled & (scores < cutoff - band) & ~near] = "review-enrolment"
    out[near & ~(enrolled & (scores >= cutoff))] = "human-review"
    return np.asarray(out, dtype=str)


@dataclass(frozen=True)
class PreviousWorklist:
    """A worklist written before: each listed household's category, the model version and the screening."""

    path: Path
    categories: dict[str, str]
    model_version: str
    screening: str


def read_worklist(path: Path) -> PreviousWorklist:
    """Read a ``worklist.csv`` (or the folder holding one).

    Raises
    ------
    DataFileError
        If it is missing or not a worklist.
    """
    path = path / "worklist.csv" if path.is_dir() else path
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise DataFileError(f"cannot read the previous worklist {str(path)!r}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataFileError(f"{str(path)!r} is not a worklist CSV: {exc}") from None
    if rows and not {"household", "category", "model_version", "screening"} <= set(rows[0]):
        raise DataFileError(f"{str(path)!r} is not a worklist (no household/category/model_version columns)")
    versions = {r["model_version"] for r in rows}
    screenings = {r["screening"] for r in rows}
    return PreviousWorklist(
        path,
        {r["household"]: r["category"] for r in rows},
        next(iter(versions)) if versions else "",
        next(iter(screenings)) if screenings else "",
    )


def change_of(household: str, category: str, previous: PreviousWorklist) -> str:
    """``new``, ``unchanged`` or ``changed`` against the previous worklist."""
    before = previous.categories.get(household)
    if before is None:
        return "new"
    return "unchanged" if before == category else "changed"


def cause_of(previous_category: str, category: str, old_model_category: str | None, same_model: bool) -> str:
    """Why a household's category moved: the household's facts, the model, or both.

    ``old_model_category`` is the category the previous model gives on today's facts ("" for none),
    None when that model could not be run.
    """
    if same_model:
        return "facts"
    if old_model_category is None:
        return "unknown (the previous model is not in the registry)"
    if old_model_category == category:
        return "facts"  # the new model agrees with the old one on today's facts
    if old_model_category == previous_category:
        return "model"  # on today's facts the old model still says what it said
    return "facts and model"
