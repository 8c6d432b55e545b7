"""Every use of a model on the record: the uses ledgers of the requester, the agencies and the coordinator.

A uses ledger is a signed hash chain (``privacy.ledger.Ledger``) with ``ModelUse`` entries, kept beside
each party's privacy ledger (``WORKDIR/<party>/uses-ledger``, signed with the same ledger key; the
coordinator's at ``WORKDIR/coordinator/uses-ledger``). It spends no epsilon: screening scores
households for the authorised requester (``docs/screening.md``), so it is kept apart from the spend.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from agencyfl.privacy.keys import load_or_create_signing_key
from agencyfl.privacy.ledger import Ledger, verify_ledger

USES_LEDGER = "uses-ledger"
COORDINATOR = "coordinator"

UseKind = Literal["screening", "screening-contribution", "disclosure", "refusal"]


class ModelUse(BaseModel):
    """One use of a model, in the ledger of ``owner``.

    - ``screening`` (the requester's): purpose, model, token id, households scored, each category's count;
    - ``screening`` (the coordinator's): the same without the counts, with ``requester_entry_sha256``
      committing to the requester's entry;
    - ``screening-contribution`` (an agency's): it scored ``households`` positions for ``requester``;
    - ``disclosure`` (an agency's): reasons at ``level`` for the register ``positions`` listed;
    - ``refusal``: a screening or disclosure refused, with ``reason`` (nothing scored or disclosed).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: UseKind
    owner: str
    screening: str
    federation: str
    model_version: str
    purpose: str
    requester: str
    time: str
    token_id: str | None = None
    households: int = 0
    counts: dict[str, int] | None = None
    requester_entry_sha256: str | None = None
    level: Literal["agency", "feature"] | None = None
    positions: list[int] | None = None
    reason: str | None = None
    previous_model: str | None = None
    """``--since`` with another model: that model was run on today's facts as well."""
    nonce: str | None = None
    """128 random bits in the requester's screening entry: the hash the coordinator keeps of it cannot be
    searched for the category counts (every other field is known or guessable)."""

    @property
    def party(self) -> str:
        """Whose chain this entry belongs in."""
        return self.owner


def now_iso() -> str:
    """UTC now, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def uses_ledger(workdir: Path, party: str) -> Ledger[ModelUse]:
    """``party``'s uses ledger, opened with its ledger key (created on first use)."""
    return uses_ledger_at(workdir / party, workdir / party / "keys" / "ledger-signing.key", party)


def uses_ledger_at(folder: Path, key_path: Path, party: str) -> Ledger[ModelUse]:
    """The uses ledger in ``folder`` (``USES_LEDGER``), signed with the key at ``key_path``: a deployment's
    layout (an agency's ``HOME``, the coordinator's folder)."""
    key = load_or_create_signing_key(key_path)
    return Ledger(folder / USES_LEDGER, key, event_type=ModelUse, party=party)


def entry_sha256(use: ModelUse) -> str:
    """SHA-256 of an entry's canonical JSON: what the coordinator's entry commits to."""
    return hashlib.sha256(json.dumps(use.model_dump(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_uses(directory: Path) -> tuple[list[ModelUse], list[str]]:
    """The entries of a uses ledger, verified against its own ``ledger.pub``; returns (entries, problems)."""
    check = verify_ledger(directory, event_type=ModelUse)
    return list(check.events), list(check.problems)
