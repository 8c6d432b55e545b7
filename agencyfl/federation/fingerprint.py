"""A data file's fingerprint: the SHA-256 of its bytes, recorded in ledgers, model cards and alignment notes.

A module of its own (hashlib only): an alignment step's process, one per Flower message in deployment,
needs it and nothing of the table reader's pandas and Arrow.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_fingerprint(path: Path) -> str:
    """SHA-256 of the file's bytes: the dataset fingerprint recorded in ledgers and model cards."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
