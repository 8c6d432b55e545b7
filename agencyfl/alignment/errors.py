"""Domain errors of private alignment. Each says which party and what to fix; none quotes another party's data.

They live in ``agencyfl.federation.errors`` with every other domain error (the exit-code table imports
that module only); this module names them for the alignment package.
"""

from __future__ import annotations

from agencyfl.federation.errors import (
    AlignmentError,
    DuplicateIdError,
    EmptyIntersectionError,
    MessageRejectedError,
    ParameterMismatchError,
    ProtocolError,
)

__all__ = [
    "AlignmentError",
    "DuplicateIdError",
    "EmptyIntersectionError",
    "MessageRejectedError",
    "ParameterMismatchError",
    "ProtocolError",
]
