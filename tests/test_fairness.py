"""Fairness counts, tables, intervals and per-group thresholds (federation/fairness.py), and the spec section."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agencyfl.federation.errors import SpecError
from agencyfl.federation.fairness import (
    HIST_BINS,
    count_groups,
    decide,
    fairness_table,
    group_labels,
    group_thresholds,
    layout,
    mitigated_counts,
    newcombe,
    sensitivity,
    wilson,
)
from agencyfl.federation.spec import FairnessSection, SchemaSection, parse_spec
from agencyfl.synth import SynthResult

SCHEMA = SchemaSection.model_validate(
    {
        "id": "id",
        "label": "y",
        "features": [
            {"name": "region", "type": "categorical", "categories": ["urban", "rural"], "nullable": True},
            {"name": "disabled", "type": "boolean", "nullable": True},
            {"name": "age", "type": "numeric", "min": 16, "max": 105, "nullable": True},
        ],
    }
)


def section(**extra: object) -> FairnessSection:
    return FairnessSection.model_validate(
        {"attributes": ["region", "disabled", "age"], "bands": {"age": [40, 65]}, **extra}
    )


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "region": ["urban", "rural", None, "rural"],
            "disabled": ["true", "false", "", "1"],
            "age": [30, 40, 70, None],
        }
    )


def test_groups_come_from_the_spec_with_unknown_for_missing_values() -> None:
    lay = layout(section(), SCHEMA)
    assert lay.groups == {
        "region": ["urban", "rural", "unknown"],
        "disabled": ["yes", "no", "unknown"],
        "age": ["<40", "40-65", ">=65", "unknown"],
    }
    labels = group_labels(frame(), section(), SCHEMA)
    assert list(labels["region"]) == ["urban", "rural", "unknown", "rural"]
    assert list(labels["disabled"]) == ["yes", "no", "unknown", "yes"]
    assert list(labels["age"]) == ["<40", "40-65", ">=65", "unknown"]


def test_groups_of_values_as_written_strip_case_and_blanks_like_the_loader() -> None:
    """Group labels are computed once per distinct value: padded, blank, NaN, numeric and capitalised values
    still land in the group the loader would put them in."""
    odd = pd.DataFrame(
        {
            "region": [" urban ", "", None, np.nan, "rural", 3, "  "],
            "disabled": ["True", " yes", 1.0, 0.0, None, "", "FALSE"],
            "age": ["30", " 70", "", None, 40, 64.5, 105],
        }
    )
    labels = group_labels(odd, section(), SCHEMA)
    assert list(labels["region"]) == ["urban", "unknown", "unknown", "unknown", "rural", "3", "unknown"]
    assert list(labels["disabled"]) == ["yes", "yes", "yes", "no", "unknown", "unknown", "no"]
    assert list(labels["age"]) == ["<40", ">=65", "unknown", "unknown", "40-65", "40-65", ">=65"]


def test_counts_are_the_confusion_cells_per_group() -> None:
    lay = layout(section(), SCHEMA)
    scores, y = np.array([0.9, 0.2, 0.7, 0.4]), np.array([1, 1, 0, 0])
    counts = count_groups(scores, y, group_labels(frame(), section(), SCHEMA), lay, 0.5)
    row = lay.rows.index(("region", "rural"))
    assert list(counts[4 * row : 4 * row + 4]) == [0, 0, 1, 1]  # tp fp fn tn
    for attribute in lay.groups:  # every row counted once per attribute
        rows = [i for i, (a, _) in enumerate(lay.rows) if a == attribute]
        assert sum(counts[4 * i : 4 * i + 4].sum() for i in rows) == 4
    assert lay.size == 4 * len(lay.rows)  # no histograms without mitigation


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 20), st.booleans())
def test_one_household_moves_the_release_by_exactly_the_sensitivity(index: int, mitigate: bool) -> None:
    # The Gaussian noise is calibrated to this L2 sensitivity: adding a household changes one cell per
    # attribute and (with mitigation) one histogram bin.
    sec = section(mitigation="group-thresholds") if mitigate else section()
    lay = layout(sec, SCHEMA)
    rng = np.random.default_rng(index)
    base = pd.DataFrame(
        {
            "region": rng.choice(["urban", "rural", None], 21),
            "disabled": rng.choice(["true", "false", ""], 21),
            "age": rng.choice([20.0, 50.0, 80.0, np.nan], 21),
        }
    )
    scores, y = rng.random(21), rng.integers(0, 2, 21)
    full = count_groups(scores, y, group_labels(base, sec, SCHEMA), lay, 0.5)
    keep = np.arange(21) != index
    without = count_groups(scores[keep], y[keep], group_labels(base[keep], sec, SCHEMA), lay, 0.5)
    assert np.linalg.norm(full - without) == pytest.approx(sensitivity(sec))


def test_wilson_and_newcombe_intervals() -> None:
    lo, hi = wilson(40, 50)
    assert lo < 0.8 < hi and (lo, hi) == pytest.approx((0.6696, 0.8876), abs=1e-3)  # textbook values
    d_lo, d_hi = newcombe((40, 50), (20, 50))
    assert d_lo < 0.4 < d_hi and d_lo > 0.2
    assert wilson(0, 0) == (0.0, 1.0)


def test_table_judges_gaps_between_groups_large_enough() -> None:
    sec = section(max_tpr_gap=0.1, min_group_size=30)
    lay = layout(sec, SCHEMA)
    counts = np.zeros(lay.size)

    def put(attribute: str, group: str, cells: list[int]) -> None:
        row = lay.rows.index((attribute, group))
        counts[4 * row : 4 * row + 4] = cells

    put("region", "urban", [90, 10, 10, 90])  # TPR 0.90
    put("region", "rural", [60, 10, 40, 90])  # TPR 0.60
    put("region", "unknown", [1, 0, 4, 0])  # 5 eligible: too few to judge
    table = fairness_table(counts, sec, lay)
    tpr = table["attributes"]["region"]["gaps"]["tpr"]
    assert tpr["gap"] == pytest.approx(0.3) and tpr["groups"] == ["urban", "rural"] and tpr["passed"] is False
    assert tpr["ci"][0] < 0.3 < tpr["ci"][1]
    assert not table["passed"] and table["failures"][0].startswith("region: tpr gap 0.300")
    assert table["attributes"]["disabled"]["gaps"]["tpr"]["passed"] is None  # no rows at all


def test_group_thresholds_equalise_coverage() -> None:
    # Rural eligible households score lower (under-recorded hardship); per-group thresholds bring their
    # coverage up to the pooled rate, measured on the same histograms.
    sec = section(mitigation="group-thresholds", mitigation_attribute="region")
    lay = layout(sec, SCHEMA)
    rng = np.random.default_rng(1)
    n = 4000
    region = rng.choice(["urban", "rural"], n)
    y = rng.integers(0, 2, n)
    scores = np.clip(rng.normal(np.where(y == 1, 0.7, 0.3) - np.where(region == "rural", 0.15, 0.0), 0.15), 0, 1)
    groups = {
        "region": region.astype(object),
        "disabled": np.full(n, "unknown", object),
        "age": np.full(n, "unknown", object),
    }
    counts = count_groups(scores, y, groups, lay, 0.5)
    before = fairness_table(counts, sec, lay)["attributes"]["region"]["gaps"]["tpr"]["gap"]
    thresholds = group_thresholds(counts, lay, 0.5)
    assert thresholds["rural"] < 0.5 <= thresholds["urban"] + 1 / HIST_BINS
    after_counts = mitigated_counts(counts, lay, thresholds)
    after = fairness_table(after_counts, sec, lay)["attributes"]["region"]["gaps"]["tpr"]["gap"]
    assert before > 0.2 and after < 0.05
    decided = decide(scores, region, 0.5, thresholds)  # the same thresholds applied row by row
    rural_tpr = decided[(region == "rural") & (y == 1)].mean()
    urban_tpr = decided[(region == "urban") & (y == 1)].mean()
    assert abs(rural_tpr - urban_tpr) < 0.05


@pytest.mark.parametrize(
    ("fairness", "message"),
    [
        ('attributes = ["nope"]', "not a schema feature"),
        ('attributes = ["head_age"]', "give its bands"),
        ('attributes = ["region_type"]\nbands = { region_type = [1] }', "takes no bands"),
        ('attributes = ["head_age"]\nbands = { head_age = [65, 40] }', "increase strictly"),
        ('attributes = ["region_type"]\nmitigation_attribute = "head_age"', "not among the attributes"),
    ],
)
def test_spec_errors_name_the_field(small_fed_spec_text: str, fairness: str, message: str) -> None:
    text = small_fed_spec_text.replace("[[agencies]]", f"[fairness]\n{fairness}\n\n[[agencies]]", 1)
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


@pytest.fixture()
def small_fed_spec_text(small_fed: SynthResult) -> str:
    """The synthetic spec without its own [fairness] section."""
    return re.sub(r"\[fairness\]\n(?:[^\[\n].*\n|\n)*", "", small_fed.spec.read_text())


def test_sensitivity_value() -> None:
    assert sensitivity(section()) == pytest.approx(math.sqrt(3))
    assert sensitivity(section(mitigation="group-thresholds")) == pytest.approx(2.0)
