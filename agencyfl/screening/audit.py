"""The auditor's view of every use of every model: each party's uses ledger verified and cross-checked.

Every ``WORKDIR/<party>/uses-ledger`` is verified (with the keyring's key for that party when given);
each of the coordinator's ``screening`` entries must commit to an entry of the requester's ledger for
the same screening (the hash it records), and each requester's screening must be in the coordinator's
ledger: a use recorded on one side only is a ``missing`` finding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agencyfl.privacy.keys import keyring_key
from agencyfl.privacy.ledger import FINDING_ORDER, LEDGER_FILE, Finding, FindingKind, verify_ledger
from agencyfl.screening.records import COORDINATOR, USES_LEDGER, ModelUse


@dataclass
class UsesAudit:
    """Every verified use, by party, and what the audit found."""

    uses: list[tuple[str, ModelUse]] = field(default_factory=list)
    findings: list[tuple[str, Finding]] = field(default_factory=list)

    @property
    def worst(self) -> FindingKind | None:
        """The most serious kind found (decides the exit code), or None."""
        kinds = {f.kind for _, f in self.findings}
        return next((k for k in FINDING_ORDER if k in kinds), None)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready: verified flag, uses (time order) and findings."""
        return {
            "verified": not self.findings,
            "uses": [{"party": p, **u.model_dump()} for p, u in sorted(self.uses, key=lambda x: x[1].time)],
            "findings": [{"party": p, "kind": f.kind, "message": f.message} for p, f in self.findings],
        }


def _entry_hashes(directory: Path) -> dict[str, str]:
    """Entry hash -> screening id, for every entry of a ledger file (already verified)."""
    out: dict[str, str] = {}
    for line in (directory / LEDGER_FILE).read_text().splitlines():
        entry = json.loads(line)
        if entry.get("kind") != "genesis":
            out[str(entry["hash"])] = str(entry.get("screening", ""))
    return out


def audit_uses(workdir: Path, keyring: Path | None = None) -> UsesAudit:
    """Verify every party's uses ledger under ``workdir`` and cross-check the coordinator's entries."""
    result = UsesAudit()
    hashes: dict[str, dict[str, str]] = {}
    for directory in sorted(workdir.glob(f"*/{USES_LEDGER}")):
        party = directory.parent.name
        key = keyring_key(keyring, party) if keyring else None
        if keyring and key is None:
            result.findings.append((party, Finding("party", f"the keyring holds no key for {party!r}")))
            continue
        check = verify_ledger(directory, key, ModelUse)
        result.findings += [(party, f) for f in check.findings]
        result.uses += [(party, use) for use in check.events]
        if check.ok:
            hashes[party] = _entry_hashes(directory)
    coordinator = [u for p, u in result.uses if p == COORDINATOR and u.kind == "screening"]
    requested = {(p, u.screening) for p, u in result.uses if p != COORDINATOR and u.kind == "screening"}
    for use in coordinator:
        committed = hashes.get(use.requester, {}).get(use.requester_entry_sha256 or "")
        if committed != use.screening:
            result.findings.append((COORDINATOR, Finding(
                "missing", f"screening {use.screening}: the requester {use.requester!r} has no entry with hash "
                f"{(use.requester_entry_sha256 or '')[:16]}…"
            )))  # fmt: skip
        requested.discard((use.requester, use.screening))
    for party, screening in sorted(requested):
        result.findings.append((party, Finding("missing", f"screening {screening} is not in the coordinator's ledger")))
    return result
