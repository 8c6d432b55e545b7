"""Domain errors of private alignment. Each says which party and what to fix; none quotes another party's data."""

from __future__ import annotations

from agencyfl.federation.errors import AgencyflError, DataFileError, SpecError


class AlignmentError(AgencyflError):
    """Base class: private alignment (register alignment or the duplicate check) stopped."""


class DuplicateIdError(AlignmentError, DataFileError):
    """One party's input holds the same normalized resident id more than once (its rows are named)."""


class ParameterMismatchError(AlignmentError, SpecError):
    """Two parties' alignment parameters (salt, id format, curve, hash) differ; found before any blinding."""


class EmptyIntersectionError(AlignmentError):
    """No row of a party matched: wrong inputs, wrong salt on both sides, or a counterpart that lied."""


class MessageRejectedError(AlignmentError):
    """A relayed envelope failed authentication or decryption, or is not the message expected."""


class ProtocolError(AlignmentError):
    """A counterpart's message is malformed (wrong length, repeated values, a small-order point, over a cap)."""
