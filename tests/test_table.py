from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.errors import DataFileError
from agencyfl.federation.spec import parse_spec
from agencyfl.federation.table import load_table, quarantine_path_for, validate_frame, validation_mask
from tests.test_spec import MINIMAL

SCHEMA = parse_spec(
    MINIMAL.replace(
        "[privacy]",
        '[[schema.features]]\nname = "disability"\ntype = "boolean"\nnullable = true\n[privacy]',
    )
).schema
HEADER = "household_id,eligible,per_capita_income,head_employment,disability\n"


def write(tmp_path: Path, body: str, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + body)
    return path


def test_each_kind_of_bad_row_is_quarantined_with_row_and_reason(tmp_path: Path) -> None:
    body = (
        "h1,1,1200,employed,true\n"  # good
        "h2,0,abc,employed,false\n"  # not a number
        "h3,1,999999,employed,\n"  # out of range
        "h4,0,100,farmer,\n"  # unknown category
        "h5,1,100,,\n"  # missing required
        "h1,0,100,employed,\n"  # duplicate id
        "h6,2,100,employed,\n"  # bad label
        "h7,1,,unemployed,maybe\n"  # bad boolean (income may be empty: nullable)
        "h8,0,,unemployed,\n"  # good, with missing nullable values
    )
    path = write(tmp_path, body)
    before = path.read_bytes()
    result = load_table(path, SCHEMA)
    assert path.read_bytes() == before  # the input is never modified
    assert list(result.valid["household_id"]) == ["h1", "h8"]
    q = pd.read_csv(quarantine_path_for(path))
    assert list(q["row"]) == [2, 3, 4, 5, 6, 7, 8]
    reasons = list(q["reason"])
    assert "'abc' is not a number" in reasons[0]
    assert "outside [0, 200000]" in reasons[1]
    assert "'farmer' is not one of" in reasons[2]
    assert reasons[3] == "missing head_employment"
    assert "duplicate household_id 'h1'" in reasons[4]
    assert "eligible '2' is not 0/1" in reasons[5]
    assert "disability 'maybe' is not true/false" in reasons[6]
    assert result.total == 9
    assert np.isnan(result.valid["per_capita_income"].iloc[1])


def test_clean_file_removes_a_stale_quarantine(tmp_path: Path) -> None:
    path = write(tmp_path, "h1,1,abc,employed,\n")
    load_table(path, SCHEMA)
    assert quarantine_path_for(path).exists()
    write(tmp_path, "h1,1,100,employed,\n")
    result = load_table(path, SCHEMA)
    assert not quarantine_path_for(path).exists() and result.quarantine_path is None


def test_quarantine_file_is_0600_and_atomic_whatever_the_umask(tmp_path: Path) -> None:
    import os

    path = write(tmp_path, "h1,1,abc,employed,\nh2,0,100,employed,\n")
    path.chmod(0o600)
    old = os.umask(0o022)
    try:
        result = load_table(path, SCHEMA)
    finally:
        os.umask(old)
    target = quarantine_path_for(path)
    assert result.quarantine_path == target and (target.stat().st_mode & 0o777) == 0o600
    assert "abc" in target.read_text()  # full rows: as sensitive as the data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "d.quarantine.csv"]


def test_an_unwritable_quarantine_target_raises_and_leaves_no_records_behind(tmp_path: Path) -> None:
    path = write(tmp_path, "h1,1,abc,employed,\n")
    quarantine_path_for(path).mkdir()  # a folder where the file goes: the rename fails
    with pytest.raises(DataFileError, match="cannot write"):
        load_table(path, SCHEMA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "d.quarantine.csv"]
    assert list(quarantine_path_for(path).iterdir()) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        (HEADER, "no rows"),
        ("household_id,eligible\nh1,1\n", "missing columns ['head_employment']"),
        ("a,b\n1,2,3,4\n\x00\x01", "missing columns"),
    ],
)
def test_unusable_files_fail_with_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_table(path, SCHEMA)


def test_missing_file_directory_and_binary(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="does not exist"):
        load_table(tmp_path / "nope.csv", SCHEMA)
    with pytest.raises(DataFileError, match="not a file"):
        load_table(tmp_path, SCHEMA)
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError, match="not a readable table"):
        load_table(tmp_path / "x.parquet", SCHEMA)
    (tmp_path / "x.xlsx").write_bytes(b"zz")
    with pytest.raises(DataFileError, match="unsupported format"):
        load_table(tmp_path / "x.xlsx", SCHEMA)


def test_parquet_loads_like_csv(tmp_path: Path) -> None:
    csv = write(tmp_path, "h1,1,1200,employed,true\nh2,0,abc,employed,false\nh3,0,,unemployed,\n")
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame.to_parquet(tmp_path / "d.parquet")
    a, b = load_table(csv, SCHEMA), load_table(tmp_path / "d.parquet", SCHEMA)
    assert list(a.valid["household_id"]) == list(b.valid["household_id"]) == ["h1", "h3"]
    assert list(a.quarantined["reason"]) == list(b.quarantined["reason"])


def test_absent_nullable_column_is_treated_as_unknown(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("household_id,eligible,head_employment\nh1,1,employed\n")
    result = load_table(path, SCHEMA)
    assert result.absent_columns == ["per_capita_income", "disability"]
    x = FeatureEncoder(SCHEMA).encode(result.valid)
    names = FeatureEncoder(SCHEMA).names
    assert x[0, names.index("per_capita_income=missing")] == 1.0


def test_validating_leaves_the_callers_frame_as_it_was() -> None:
    """The validator names columns stripped and adds absent nullable ones on its own view of the frame."""
    raw = pd.DataFrame({" household_id ": ["h1", " h2"], "eligible": ["1", "0"], "head_employment": ["employed"] * 2})
    before = raw.copy()
    result = validate_frame(raw, SCHEMA)
    assert list(result.valid["household_id"]) == ["h1", "h2"] and result.absent_columns == [
        "per_capita_income",
        "disability",
    ]
    pd.testing.assert_frame_equal(raw, before)


cell = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["", "1", "0", "true", "employed", "-3", "1e9", "nan", "inf", "h1"]),
    st.integers(-10, 300000).map(str),
    st.floats(allow_nan=True).map(str),
)
COLUMNS = ["household_id", "eligible", "per_capita_income", "head_employment", "disability"]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({c: cell for c in COLUMNS}), min_size=1, max_size=25))
def test_random_rows_never_crash_never_vanish_and_bad_ones_have_a_reason(rows: list[dict[str, str]]) -> None:
    raw = pd.DataFrame(rows, columns=COLUMNS)
    result = validate_frame(raw, SCHEMA)
    assert len(result.valid) + len(result.quarantined) == len(raw)
    assert all(isinstance(r, str) and r for r in result.quarantined["reason"])
    assert result.valid["household_id"].is_unique
    valid = result.valid
    assert valid["per_capita_income"].dropna().between(0, 200000).all()
    assert valid["head_employment"].isin(["employed", "unemployed"]).all()
    assert set(valid["eligible"]) <= {0, 1}
    FeatureEncoder(SCHEMA).encode(valid)  # whatever passed validation can be encoded


def test_validation_split_is_deterministic_and_sized() -> None:
    ids = pd.Series([f"H{i}" for i in range(20000)])
    a, b = validation_mask(ids, 0.2, "fed"), validation_mask(ids, 0.2, "fed")
    assert (a == b).all()
    assert abs(a.mean() - 0.2) < 0.015
    assert (validation_mask(ids, 0.2, "other") != a).any()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.sampled_from(["", "1", "2.5", "1e3", "nan", "inf", "-inf", "Infinity", "+5", ".5", "5.", "1e400", "-0",
                     "abc", "0x10", "1_000", "1,5", "١٢", "1e", "--1", "NaN"]),
    st.floats(allow_nan=False).map(repr), st.integers(-10**20, 10**20).map(str),
), min_size=1, max_size=30))  # fmt: skip
def test_numbers_are_parsed_as_pandas_parses_them(values: list[str]) -> None:
    """The numeric columns' fast path (Arrow's cast) gives pandas' to_numeric values wherever it applies, and
    a column with any value that is not a number goes through pandas, whose NaN marks it for quarantine."""
    from agencyfl.federation.table import _numbers

    col = pd.Series(values, dtype="str")
    expected = pd.to_numeric(col.where(col != ""), errors="coerce").to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(_numbers(col), expected)
    np.testing.assert_array_equal(_numbers(col.astype(object)), expected)  # object columns too


_CSV_CELL = st.sampled_from(["", "1", "h1", " x ", "a b", "é", "中文", "\t", "1.5", "-", "#", "NaN", "null", "\\"])
_CSV_LINE = st.one_of(
    st.lists(_CSV_CELL, min_size=0, max_size=5).map(",".join),  # ragged: fewer or more cells than the header
    st.sampled_from(["", "   ", ",", ",,", '"q, r",1', '"two\nlines",2', "'s',3"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(header="a", lines=["   ", "1"], newline="\n", bom=False)  # one column: pandas skips the spaces
@example(header="a,a,b", lines=["1,2,3"], newline="\r\n", bom=True)
@example(header="a,b,c", lines=["1,2,3", "x,y,z"] * 3, newline="\n", bom=False)  # the fast path itself
@given(
    header=st.sampled_from(["a,b,c", "a,b", "a", "a,a,b", "a,,c", " a , b ", "a,b,c,", "é,中"]),
    lines=st.lists(_CSV_LINE, min_size=0, max_size=8),
    newline=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
)
def test_csv_files_read_as_pandas_reads_them(header: str, lines: list[str], newline: str, bom: bool) -> None:
    """Arrow's fast path gives pandas' frame (every cell as written, the same rows in the same order: the
    quarantine's row numbers depend on it) or pandas' own error; files it cannot read alike go to pandas."""
    import tempfile

    from agencyfl.federation.table import _read_csv

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.csv"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join([header, *lines]).encode() + b"\n")
        try:
            expected = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
        except Exception as exc:  # noqa: BLE001 - whatever pandas raises, ours must raise too
            with pytest.raises(type(exc)):
                _read_csv(path)
            return
        pd.testing.assert_frame_equal(_read_csv(path), expected)


_SPACES = ["", " ", "\t", "\u3000", "\xa0", "\x85", "\u2028", "\x1c", "\u200b", "\ufeff", "\n"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_SPACES), st.text(max_size=4), st.sampled_from(_SPACES)).map("".join),
                min_size=1, max_size=12))  # fmt: skip
def test_columns_are_stripped_as_str_strip_strips_them(values: list[str]) -> None:
    """Validation skips stripping a column none of whose values begins or ends with whitespace: that test
    judges whitespace as the strip itself does (Unicode spaces, and the characters neither counts)."""
    from agencyfl.federation.table import _stripped

    col = pd.Series(values, dtype="str")
    assert _stripped(col).tolist() == col.str.strip().tolist()
    assert _stripped(col.astype(object)).tolist() == col.astype(object).str.strip().tolist()
