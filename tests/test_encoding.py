from __future__ import annotations

import numpy as np
import pandas as pd

from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.spec import parse_spec
from tests.test_spec import MINIMAL


def test_scaling_from_schema_ranges_and_missing_indicators() -> None:
    schema = parse_spec(MINIMAL).schema
    enc = FeatureEncoder(schema)
    assert enc.names == [
        "per_capita_income",
        "per_capita_income=missing",
        "head_employment=employed",
        "head_employment=unemployed",
    ]
    frame = pd.DataFrame(
        {
            "per_capita_income": [0.0, 100000.0, 200000.0, np.nan],
            "head_employment": ["employed", "unemployed", "employed", "unemployed"],
        }
    )
    x = enc.encode(frame)
    np.testing.assert_allclose(x[:, 0], [-1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(x[:, 1], [0, 0, 0, 1])
    np.testing.assert_allclose(x[:, 2:], [[1, 0], [0, 1], [1, 0], [0, 1]])
    assert x.dtype == np.float32


def test_log_transform_spreads_skewed_amounts() -> None:
    schema = parse_spec(MINIMAL.replace("nullable = true", 'nullable = true\ntransform = "log"', 1)).schema
    x = FeatureEncoder(schema).encode(
        pd.DataFrame({"per_capita_income": [0.0, 1000.0, 200000.0], "head_employment": ["employed"] * 3})
    )
    assert x[0, 0] == -1.0 and x[2, 0] == 1.0
    assert -0.5 < x[1, 0] < 0.5  # 1,000 of 200,000 lands mid-range on the log scale, not at -0.99


def test_values_the_loader_did_not_type_encode_as_nan_to_num_would() -> None:
    """Categories compared as codes (unknown or missing: no category), a missing boolean 0 with its flag, and
    anything left that is not finite (a string in a numeric column, an infinite boolean) 0 or float32's
    largest, as np.nan_to_num does: the encoder is also handed frames no loader typed."""
    spec = MINIMAL.replace(
        "[privacy]",
        '[[schema.features]]\nname = "disabled"\ntype = "boolean"\nnullable = true\n[privacy]',
    )
    enc = FeatureEncoder(parse_spec(spec).schema)
    frame = pd.DataFrame(
        {
            "per_capita_income": [50000.0, "not a number", None, 1e12],
            "head_employment": ["unemployed", "retired", None, np.nan],
            "disabled": [1.0, np.nan, np.inf, 0.0],
        }
    )
    x = enc.encode(frame)
    assert enc.names[-2:] == ["disabled", "disabled=missing"]
    np.testing.assert_array_equal(x[:, 0], [-0.5, 0.0, 0.0, 1.0])  # the string: NaN, not missing, then 0
    np.testing.assert_array_equal(x[:, 1], [0, 0, 1, 0])
    np.testing.assert_array_equal(x[:, 2:4], [[0, 1], [0, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(x[:, 4], [1.0, 0.0, np.finfo(np.float32).max, -1.0])
    np.testing.assert_array_equal(x[:, 5], [0, 1, 0, 0])
    assert x.dtype == np.float32 and np.isfinite(x).all()
