"""Differential privacy accounting, budget enforcement, signing keys and the privacy ledger."""

from privacy.accounting import StepRecord, accountant_for, calibrate_noise, epsilon_for
from privacy.budget import BudgetDecision, check_round
from privacy.keys import key_id, load_or_create_signing_key, load_public_key
from privacy.ledger import Ledger, LedgerEvent, LedgerVerification, spend_records, verify_ledger

__all__ = [
    "BudgetDecision",
    "Ledger",
    "LedgerEvent",
    "LedgerVerification",
    "StepRecord",
    "accountant_for",
    "calibrate_noise",
    "check_round",
    "epsilon_for",
    "key_id",
    "load_or_create_signing_key",
    "load_public_key",
    "spend_records",
    "verify_ledger",
]
