from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agencyfl.federation.errors import SpecError
from agencyfl.federation.spec import TrainingSection, load_spec, parse_spec

MINIMAL = """
[federation]
name = "mla"
[schema]
id = "household_id"
label = "eligible"
[[schema.features]]
name = "per_capita_income"
type = "numeric"
min = 0
max = 200000
nullable = true
[[schema.features]]
name = "head_employment"
type = "categorical"
categories = ["employed", "unemployed"]
[privacy]
epsilon = 3.0
budget = 10.0
[[agencies]]
name = "civil-affairs"
data = "civil.csv"
[[agencies]]
name = "tax"
data = "/abs/tax.csv"
"""


def test_minimal_spec_gets_working_defaults() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.training == TrainingSection()
    assert spec.training.sample_rate == 0.02 and spec.training.learning_rate == 2.0
    assert spec.model.kind == "logistic"
    assert spec.privacy.delta == 1e-5 and spec.privacy.max_grad_norm == 1.0
    assert [f.name for f in spec.schema.features] == ["per_capita_income", "head_employment"]


def test_relative_data_paths_resolve_against_the_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "f.toml").write_text(MINIMAL)
    loaded = load_spec(tmp_path / "f.toml")
    assert loaded.data_path("civil-affairs") == (tmp_path / "civil.csv").resolve()
    assert loaded.data_path("tax") == Path("/abs/tax.csv")
    assert len(loaded.sha256) == 64


@pytest.mark.parametrize(
    ("old", "new", "field", "quoted"),
    [
        ("epsilon = 3.0", "epsilon = -1", "privacy.epsilon", "-1"),
        ('type = "numeric"', 'type = "number"', "schema.features.0", "'number'"),
        ('name = "mla"', 'name = "Bad Name!"', "federation.name", "'Bad Name!'"),
        ("[privacy]", "[training]\nsample_rate = 1.5\n[privacy]", "training.sample_rate", "1.5"),
        ("max = 200000", "max = -5", "schema.features.0", "-5"),
        ("budget = 10.0", "budget = 2.0", "privacy", "exceeds the lifetime budget"),
    ],
)
def test_errors_name_the_field_and_quote_the_value(old: str, new: str, field: str, quoted: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(MINIMAL.replace(old, new, 1))
    assert field in str(info.value)
    assert quoted in str(info.value)


def test_vertical_topology_is_refused_clearly() -> None:
    with pytest.raises(SpecError, match="vertical.*not supported"):
        parse_spec(MINIMAL.replace('name = "mla"', 'name = "mla"\ntopology = "vertical"'))


def test_duplicate_agencies_and_columns_are_refused() -> None:
    with pytest.raises(SpecError, match="agency names repeat"):
        parse_spec(MINIMAL.replace('name = "tax"', 'name = "civil-affairs"'))
    with pytest.raises(SpecError, match="column names repeat"):
        parse_spec(MINIMAL.replace('name = "head_employment"', 'name = "per_capita_income"'))


def test_unreadable_and_non_toml_specs(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[federation\nname=")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(tmp_path / "bad.toml")


@given(st.text(max_size=300))
def test_any_text_either_parses_or_raises_spec_error(text: str) -> None:
    try:
        parse_spec(text)
    except SpecError as exc:
        assert str(exc)
