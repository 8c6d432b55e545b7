"""An agency's site: its spec copy, its data file and its home folder (ledger and keys).

Everything here stays in the agency's domain: records are read from ``data_path`` and never leave;
the ledger signing key is created under ``home/keys`` on first use and never travels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from federation.encoding import FeatureEncoder
from federation.fairness import group_labels
from federation.spec import LoadedSpec, load_spec
from federation.table import load_table, validation_mask
from privacy.keys import load_or_create_signing_key
from privacy.ledger import Ledger


class AgencySite(BaseModel):
    """Where one agency keeps what it needs to take part."""

    model_config = ConfigDict(frozen=True)

    agency: str
    spec_path: Path
    data_path: Path
    home: Path
    keys_dir: Path | None = None  # default: home/keys

    @property
    def ledger_dir(self) -> Path:
        """The agency's privacy ledger folder."""
        return self.home / "ledger"

    @property
    def signing_key_path(self) -> Path:
        """The agency's ledger signing key (secret; owner-only permissions)."""
        return (self.keys_dir or self.home / "keys") / "ledger-signing.key"

    def open_ledger(self) -> Ledger:
        """The agency's ledger, with its signing key (created on first use)."""
        return Ledger(self.ledger_dir, load_or_create_signing_key(self.signing_key_path))


@dataclass(frozen=True)
class LocalData:
    """An agency's encoded records, split by a hash of the id into training and validation rows."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    fingerprint: str
    quarantined: int
    val_groups: dict[str, np.ndarray] = field(default_factory=dict)  # fairness groups of validation rows


_CACHE: dict[tuple[str, int, int, str], LocalData] = {}


def load_local_data(site: AgencySite, loaded: LoadedSpec) -> LocalData:
    """Load, validate (bad rows to quarantine), encode and split the site's data.

    Cached per process while the file and spec are unchanged, since each round asks for it again.
    """
    stat = os.stat(site.data_path)
    key = (str(site.data_path), stat.st_mtime_ns, stat.st_size, loaded.sha256)
    if key not in _CACHE:
        spec = loaded.spec
        check = load_table(site.data_path, spec.schema)
        frame: pd.DataFrame = check.valid
        x = FeatureEncoder(spec.schema).encode(frame)
        y = frame[spec.schema.label].to_numpy(dtype=np.float32)
        val = validation_mask(frame[spec.schema.id], spec.training.validation_fraction, spec.federation.name)
        groups = {}
        if spec.fairness is not None:
            groups = {a: g[val] for a, g in group_labels(frame, spec.fairness, spec.schema).items()}
        _CACHE[key] = LocalData(x[~val], y[~val], x[val], y[val], check.fingerprint, len(check.quarantined), groups)
    return _CACHE[key]


def site_spec(site: AgencySite) -> LoadedSpec:
    """The agency's own copy of the spec."""
    return load_spec(site.spec_path)
