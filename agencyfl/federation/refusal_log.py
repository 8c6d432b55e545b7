"""An agency's logs of what it refused before anything reached its ledger: one JSON object a line.

Two logs use it, both in the agency's home: ``refused-runs.jsonl`` (runs of an app other than the
pinned one, ``clients.supernode``) and ``refused-requests.jsonl`` (requests whose job plan the
coordinator did not sign, ``clients.signed_plan``). They are not the privacy ledger: nothing was
spent, and whoever can reach the SuperLink must not be able to grow the ledger.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def now() -> str:
    """The time stamp of a log entry (UTC, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def append_entry(path: Path, entry: dict[str, Any]) -> None:
    """Append one entry to the log at ``path`` (its folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


def read_entries(path: Path) -> list[dict[str, Any]]:
    """Every readable entry of the log at ``path``, oldest first (none if it does not exist)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found
