"""Private alignment: register alignment for vertical learning and the duplicate check, by DH-PSI over X25519.

Every message between parties is relayed by the coordinator, sealed to its recipient. The design,
what each party learns and what a lying party can do: ``docs/alignment.md``.
"""

from agencyfl.alignment.duplicates import (
    DuplicateCheck,
    ReviewItem,
    RosterOwner,
    check_duplicates,
    conflicting_pairs,
    duplicate_check_multiplications,
)
from agencyfl.alignment.errors import (
    AlignmentError,
    DuplicateIdError,
    EmptyIntersectionError,
    MessageRejectedError,
    ParameterMismatchError,
    ProtocolError,
)
from agencyfl.alignment.inputs import PreparedIds, Quarantined, prepare_ids
from agencyfl.alignment.psi import Blinder, blind, generate_key, hash_to_u, parameter_fingerprint
from agencyfl.alignment.records import AlignmentRecord
from agencyfl.alignment.register import (
    AgencyAlignment,
    RegisterAgency,
    RegisterAlignment,
    RegisterHolder,
    RegisterView,
    align_register,
    register_multiplications,
)
from agencyfl.alignment.relay import Relay, RelayRecord, Transport
from agencyfl.alignment.sealed import Envelope, PartyKeys, PartyPublicKeys, open_envelope, seal

__all__ = [
    "AgencyAlignment",
    "AlignmentError",
    "AlignmentRecord",
    "Blinder",
    "DuplicateCheck",
    "DuplicateIdError",
    "EmptyIntersectionError",
    "Envelope",
    "MessageRejectedError",
    "ParameterMismatchError",
    "PartyKeys",
    "PartyPublicKeys",
    "PreparedIds",
    "ProtocolError",
    "Quarantined",
    "RegisterAgency",
    "RegisterAlignment",
    "RegisterHolder",
    "RegisterView",
    "Relay",
    "RelayRecord",
    "ReviewItem",
    "RosterOwner",
    "Transport",
    "align_register",
    "blind",
    "check_duplicates",
    "conflicting_pairs",
    "duplicate_check_multiplications",
    "generate_key",
    "hash_to_u",
    "open_envelope",
    "parameter_fingerprint",
    "prepare_ids",
    "register_multiplications",
    "seal",
]
