"""Domain errors shared by every party. The CLI maps each to one line and an exit code."""

from __future__ import annotations


class AgencyflError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""


class SpecError(AgencyflError):
    """The federation spec is unreadable or invalid."""


class DataFileError(AgencyflError):
    """A data file is unusable as a whole (missing, empty, not a table, missing columns)."""


class ModelError(AgencyflError):
    """A registered model is missing, damaged or does not match the spec."""


class LedgerError(AgencyflError):
    """A privacy ledger cannot be read or written."""


class FederationError(AgencyflError):
    """A federated run ended without a model (too few agencies, all rounds refused, ...)."""


class JobStopped(FederationError):
    """An agency's ledger refused a vertical job's release: the job stopped before releasing it (exit 7)."""


class DeploymentError(AgencyflError):
    """A daemon (SuperLink, SuperNode) failed to start or was refused, or a deployment folder is incomplete."""


class ScoringError(AgencyflError):
    """The scoring server refused a request or could not be reached."""


class HEError(AgencyflError):
    """An HE context or ciphertext is unacceptable (secret key present, weak parameters, malformed)."""


class TokenError(AgencyflError):
    """A token operation was asked something wrong (unknown id, no purpose, bad validity): exit 2.

    An unreadable registry file raises ``DataFileError`` (exit 4) instead.
    """


class AlignmentError(AgencyflError):
    """Private alignment (register alignment or the duplicate check) stopped: exit 22 unless a subclass says."""


class DuplicateIdError(AlignmentError, DataFileError):
    """One party's input holds the same normalized resident id more than once (its rows are named): exit 4."""


class ParameterMismatchError(AlignmentError, SpecError):
    """Two parties' alignment parameters (salt, id format, curve, hash) differ; found before any blinding: exit 3."""


class EmptyIntersectionError(AlignmentError):
    """No row of a party matched: wrong inputs, wrong salt on both sides, or a counterpart that lied: exit 22."""


class MessageRejectedError(AlignmentError):
    """A relayed envelope failed authentication or decryption, or is not the message expected: exit 23."""


class ProtocolError(AlignmentError):
    """A counterpart's message is malformed (wrong length, repeated values, a small-order point, a cap): exit 23."""


class ScreeningRefusedError(AgencyflError):
    """A screening or a disclosure of reasons was refused (token, purpose, or too many households): exit 24."""


def error_class(name: str) -> type[AgencyflError]:
    """The domain error class a party's reply or a run summary names by its class name (DeploymentError for any
    other name): how a failure at another host keeps its exit code at the coordinator."""
    kind = globals().get(name)
    if isinstance(kind, type) and issubclass(kind, AgencyflError):
        return kind
    return DeploymentError
