"""What every spec module shares: the name pattern, the frozen base model, field-located errors."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _FieldError(ValueError):
    """A spec-level check's error that belongs to one field: ``where`` is that field's dotted path.

    Checks that span sections (a vertical agency's features against the schema) run after the whole
    spec is parsed, where pydantic reports no location; ``_format_errors`` puts ``where`` back.
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where


def _repeats(values: Sequence[str]) -> list[str]:
    return sorted({v for v in values if values.count(v) > 1})
