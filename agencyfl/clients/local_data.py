"""An agency's records as training reads them: validated, encoded and split, cached per process.

Apart from ``clients.site`` (who the agency is, its keys and ledger) so that a Flower message that
trains nothing (a SecAgg+ key exchange, an alignment step) does not import pandas to find its site.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from agencyfl.clients.site import AgencySite
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.fairness import group_labels
from agencyfl.federation.spec import LoadedSpec
from agencyfl.federation.table import load_table, validation_mask


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

    The split hashes each id with the agency's secret salt (``AgencySite.validation_salt``). Cached
    per process while the file and spec are unchanged, since each round asks for it again.
    """
    stat = os.stat(site.data_path)
    salt = site.validation_salt()
    key = (str(site.data_path), stat.st_mtime_ns, stat.st_size, loaded.sha256 + salt)
    if key not in _CACHE:
        spec = loaded.spec
        check = load_table(site.data_path, spec.schema)
        frame: pd.DataFrame = check.valid
        x = FeatureEncoder(spec.schema).encode(frame)
        y = frame[spec.schema.label].to_numpy(dtype=np.float32)
        val = validation_mask(frame[spec.schema.id], spec.training.validation_fraction, salt)
        groups = {}
        if spec.fairness is not None:
            groups = {a: g[val] for a, g in group_labels(frame, spec.fairness, spec.schema).items()}
        _CACHE[key] = LocalData(x[~val], y[~val], x[val], y[val], check.fingerprint, len(check.quarantined), groups)
    return _CACHE[key]
