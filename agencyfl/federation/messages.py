"""What crosses a domain in Flower's metric records, encoded one way for every party.

The first piece of the typed messages (issue 14 item 3): the codec of the noised histograms an
agency releases. Metric records hold scalars only, so a histogram travels as bytes.
"""

from __future__ import annotations

import numpy as np


def histogram_bytes(values: np.ndarray | list[float]) -> bytes:
    """Histogram counts as bytes (legacy metrics hold scalars only); float64, since releases are noised."""
    return np.asarray(values, dtype=np.float64).tobytes()


def histogram_from_bytes(data: bytes) -> np.ndarray:
    """The inverse of ``histogram_bytes``."""
    return np.frombuffer(data, dtype=np.float64).astype(float)
