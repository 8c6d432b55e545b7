"""The coordinator's signature over a job plan, and the agency's check of it (Ed25519, ``cryptography``).

Anyone who reaches the SuperLink can submit our own (public, deterministically built) app, which
passes an agency's app pin; what tells an agency that the *coordinator* started a job is the job
plan (``federation.plan.JobPlan.signed_bytes``: federation, job id, spec SHA-256, rounds, epsilon)
signed with the coordinator's ledger key, whose public half each steward was handed out of band.
The signature travels in every fit and evaluate config as ``plan-signature`` (base64url).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agencyfl.federation.errors import LedgerError
from agencyfl.privacy.keys import load_public_key

CONFIG_KEY = "plan-signature"
_DOMAIN = b"agencyfl job plan v1\n"  # a plan signature can never be mistaken for a ledger entry's


def sign_plan(plan_bytes: bytes, key: Ed25519PrivateKey) -> str:
    """The coordinator's signature over a plan's canonical bytes (base64url text)."""
    return base64.urlsafe_b64encode(key.sign(_DOMAIN + plan_bytes)).decode()


def plan_signature_problem(plan_bytes: bytes, signature: object, coordinator_key: Path | None) -> str | None:
    """Why the plan must be refused (unsigned, malformed, not the coordinator's), or None if it verifies."""
    if coordinator_key is None:
        return "this agency holds no coordinator key, so it cannot tell who started the job"
    if not isinstance(signature, str) or not signature:
        return "the job plan is not signed"
    try:
        public: Ed25519PublicKey = load_public_key(coordinator_key)
    except LedgerError as exc:
        return f"the coordinator key {coordinator_key} is unreadable: {exc}"
    try:
        public.verify(base64.urlsafe_b64decode(signature.encode()), _DOMAIN + plan_bytes)
    except (InvalidSignature, binascii.Error, ValueError):
        return "the job plan is not signed by the coordinator's key this agency holds"
    return None
