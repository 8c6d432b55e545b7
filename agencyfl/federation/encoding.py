"""Turn validated table rows into model inputs, with no statistics taken from anyone's records.

Scaling comes from the schema's ranges (``transform = "log"`` for skewed amounts); a missing value is
imputed with the centre of the range and flagged by a missing-indicator column. Because each nullable
feature has its own indicator, the model learns the right offset for "unknown" itself, so no agency
has to publish means or counts for imputation (the constant is immaterial for a linear model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from agencyfl.federation.spec import BooleanFeature, CategoricalFeature, NumericFeature, SchemaSection

MISSING = "missing"


@dataclass(frozen=True)
class EncodedColumn:
    """One model input: its name, the schema feature it comes from, and what it stands for."""

    name: str
    feature: str
    kind: str  # "value", "category" or "missing"


class FeatureEncoder:
    """Encode a typed frame (as returned by the loader) into a float32 matrix.

    Parameters
    ----------
    schema
        The spec's schema; its order fixes the column order, so every party encodes alike.
    """

    def __init__(self, schema: SchemaSection) -> None:
        self.schema = schema
        columns: list[EncodedColumn] = []
        for f in schema.features:
            if isinstance(f, CategoricalFeature):
                columns += [EncodedColumn(f"{f.name}={c}", f.name, "category") for c in f.categories]
            else:
                columns.append(EncodedColumn(f.name, f.name, "value"))
            if f.nullable:
                columns.append(EncodedColumn(f"{f.name}={MISSING}", f.name, "missing"))
        self.columns: tuple[EncodedColumn, ...] = tuple(columns)

    @property
    def names(self) -> list[str]:
        """Names of the encoded columns, in order."""
        return [c.name for c in self.columns]

    @property
    def width(self) -> int:
        """Number of model inputs."""
        return len(self.columns)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode ``frame`` (one column per schema feature, NaN/None for missing) to ``[n, width]``.

        Columns are written into one float32 matrix (no float64 pieces to join: a million rows by 20 inputs),
        categories compared as codes; any NaN or infinity left (a value the loader did not type) becomes 0
        or the largest float32, as ``np.nan_to_num`` does."""
        out = np.zeros((len(frame), self.width), dtype=np.float32)
        j = 0
        for f in self.schema.features:
            raw = frame[f.name]
            missing = raw.isna().to_numpy()
            if isinstance(f, NumericFeature):
                v = np.clip(pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64), f.min, f.max)
                if f.transform == "log":
                    s = np.log1p(v - f.min) / np.log1p(f.max - f.min)
                else:
                    s = (v - f.min) / (f.max - f.min)
                out[:, j] = np.where(missing, 0.0, 2.0 * s - 1.0)
                j += 1
            elif isinstance(f, CategoricalFeature):
                codes = pd.Categorical(raw.astype("object"), categories=f.categories).codes
                for k in range(len(f.categories)):
                    out[:, j + k] = codes == k
                j += len(f.categories)
            elif isinstance(f, BooleanFeature):
                b = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
                out[:, j] = np.where(missing, 0.0, 2.0 * b - 1.0)
                j += 1
            if f.nullable:
                out[:, j] = missing
                j += 1
        if not np.isfinite(out).all():
            np.nan_to_num(out, copy=False)
        return out
