"""Exit codes of the ``agencyfl`` command, each with the help text users see in the README."""

from __future__ import annotations

from enum import IntEnum

from agencyfl.federation.errors import (
    AgencyflError,
    AlignmentError,
    DataFileError,
    DeploymentError,
    FederationError,
    HEError,
    LedgerError,
    MessageRejectedError,
    ModelError,
    ProtocolError,
    ScoringError,
    ScreeningRefusedError,
    SpecError,
    TokenError,
)


class ExitCode(IntEnum):
    """What the process exit status means."""

    OK = 0
    INTERNAL_ERROR = 1
    USAGE = 2
    SPEC_INVALID = 3
    DATA_UNUSABLE = 4
    LEDGER_UNVERIFIED = 5
    BUDGET_EXCEEDED = 6
    FEDERATION_FAILED = 7
    MODEL_INVALID = 8
    SCORING_REFUSED = 9
    DEPLOYMENT_FAILED = 10
    LEDGER_ENTRY_DELETED = 11
    LEDGER_REORDERED = 12
    LEDGER_TRUNCATED = 13
    ROUND_MISSING = 14
    EPSILON_MISMATCH = 15
    PRIVACY_CLAIM_REFUTED = 16
    FAIRNESS_GAP_EXCEEDED = 17
    LEDGER_HEADLESS = 18
    LEDGER_PARTY_MISMATCH = 19
    LEDGER_RESTARTED = 20
    CHAIN_ROLLED_BACK = 21
    ALIGNMENT_FAILED = 22
    ALIGNMENT_REJECTED = 23
    SCREENING_REFUSED = 24
    COMPUTATION_DEVIATED = 25


HELP: dict[ExitCode, str] = {
    ExitCode.OK: "Success; for `audit report`, every ledger verified and no cap is exceeded.",
    ExitCode.INTERNAL_ERROR: "An unexpected internal error (a bug): please report it with the command.",
    ExitCode.USAGE: "The command line is wrong (unknown option, missing argument).",
    ExitCode.SPEC_INVALID: "The federation spec is unreadable or invalid; the message names the field.",
    ExitCode.DATA_UNUSABLE: "A data file is unusable as a whole (missing, empty, not a table, missing columns).",
    ExitCode.LEDGER_UNVERIFIED: (
        "A privacy ledger does not verify (altered, deleted, reordered or truncated entries, bad signature); "
        "`audit verify` narrows it: 5 is then an altered byte, a bad signature or a key the keyring lacks; for "
        "`audit replay`, receipts that do not verify (altered, taken out, cut off) or not signed by their party."
    ),
    ExitCode.BUDGET_EXCEEDED: "A ledger verifies but records spend beyond its privacy budget or per-job cap.",
    ExitCode.FEDERATION_FAILED: "The federated run ended without a model (too few agencies trained).",
    ExitCode.MODEL_INVALID: "The model folder is not a registered model, or it does not match the spec.",
    ExitCode.SCORING_REFUSED: (
        "The scoring server refused the request or could not be reached (the message gives the gRPC status)."
    ),
    ExitCode.DEPLOYMENT_FAILED: (
        "A SuperLink or SuperNode did not start or was refused (unregistered key, TLS), or a deployment folder "
        "is incomplete; the message quotes the daemon's reason and names its log."
    ),
    ExitCode.LEDGER_ENTRY_DELETED: "`audit verify`: an entry was taken out of the middle of a chain.",
    ExitCode.LEDGER_REORDERED: "`audit verify`: a chain's entries are out of order.",
    ExitCode.LEDGER_TRUNCATED: "`audit verify`: entries were cut off the end of a chain (or an older copy put back).",
    ExitCode.ROUND_MISSING: (
        "`audit verify`: a round the coordinator's chain records is missing from the agency's ledger, or the reverse."
    ),
    ExitCode.EPSILON_MISMATCH: (
        "`audit verify`: a recorded epsilon disagrees with the recomputation or with the coordinator's record."
    ),
    ExitCode.PRIVACY_CLAIM_REFUTED: (
        "`audit attack`: the empirical lower bound on epsilon exceeds the claimed epsilon (the claim is false)."
    ),
    ExitCode.FAIRNESS_GAP_EXCEEDED: "`audit fairness`: a gap between groups exceeds the spec's tolerance.",
    ExitCode.LEDGER_HEADLESS: (
        "`audit verify`: a ledger is absent, empty or has no signed head, so nothing proves its spend (not zero)."
    ),
    ExitCode.LEDGER_PARTY_MISMATCH: (
        "`audit verify`: a ledger is not bound to its party: an agency without a ledger, two ledgers of one "
        "agency, or a ledger signed with another party's key."
    ),
    ExitCode.LEDGER_RESTARTED: (
        "`audit verify`: an agency's ledger begins elsewhere than the coordinator's chain recorded (restarted or "
        "replaced), or the coordinator refused a reply for that reason."
    ),
    ExitCode.CHAIN_ROLLED_BACK: (
        "`audit verify`: the coordinator's chain lacks a job the agencies record for its federation, or a "
        "registered model (the chain was rolled back)."
    ),
    ExitCode.ALIGNMENT_FAILED: (
        "`align` / `coordinator align` / `screen duplicates`: alignment stopped: no household in common (wrong "
        "inputs, or a salt that differs on both sides), or a roster pair the spec cannot check."
    ),
    ExitCode.ALIGNMENT_REJECTED: (
        "`align` / `coordinator align` / `screen duplicates`: a relayed message failed authentication or is "
        "malformed (tampered in transit, or a party that does not follow the protocol), or a party refused the "
        "run (a plan its coordinator key does not verify, another spec, run keys not signed by the peer key it "
        "holds); nothing was written."
    ),
    ExitCode.SCREENING_REFUSED: (
        "`screen eligible`: refused: the token is not active or not issued for the purpose, the model card does "
        "not list the purpose, or an agency refused to explain so many households; nothing was scored or "
        "disclosed, and the refusal is in the coordinator's uses ledger."
    ),
    ExitCode.COMPUTATION_DEVIATED: (
        "`audit replay`: an agency's products, recomputed from its kept inputs, differ from what the arbiter "
        "released, its operands are not what civil affairs sent, a released product's evidence is missing or "
        "unreadable, or its inputs exceed the federation's row norm."
    ),
}

FINDING_CODES: dict[str, ExitCode] = {
    "altered": ExitCode.LEDGER_UNVERIFIED,
    "deleted": ExitCode.LEDGER_ENTRY_DELETED,
    "reordered": ExitCode.LEDGER_REORDERED,
    "truncated": ExitCode.LEDGER_TRUNCATED,
    "headless": ExitCode.LEDGER_HEADLESS,
    "party": ExitCode.LEDGER_PARTY_MISMATCH,
    "restarted": ExitCode.LEDGER_RESTARTED,
    "rollback": ExitCode.CHAIN_ROLLED_BACK,
    "missing": ExitCode.ROUND_MISSING,
    "epsilon": ExitCode.EPSILON_MISMATCH,
    "overspend": ExitCode.BUDGET_EXCEEDED,
}
"""The exit code of ``audit verify`` for the most serious kind of finding (``privacy.ledger.FINDING_ORDER``)."""

_BY_ERROR: list[tuple[type[AgencyflError], ExitCode]] = [
    (SpecError, ExitCode.SPEC_INVALID),
    (DataFileError, ExitCode.DATA_UNUSABLE),
    (LedgerError, ExitCode.LEDGER_UNVERIFIED),
    (FederationError, ExitCode.FEDERATION_FAILED),
    (DeploymentError, ExitCode.DEPLOYMENT_FAILED),
    (ModelError, ExitCode.MODEL_INVALID),
    (ScoringError, ExitCode.SCORING_REFUSED),
    (HEError, ExitCode.SCORING_REFUSED),
    (TokenError, ExitCode.USAGE),
    (ScreeningRefusedError, ExitCode.SCREENING_REFUSED),
    (MessageRejectedError, ExitCode.ALIGNMENT_REJECTED),
    (ProtocolError, ExitCode.ALIGNMENT_REJECTED),
    (AlignmentError, ExitCode.ALIGNMENT_FAILED),
]


def exit_code_for(error: AgencyflError) -> ExitCode:
    """The exit code for a domain error."""
    for kind, code in _BY_ERROR:
        if isinstance(error, kind):
            return code
    return ExitCode.INTERNAL_ERROR
