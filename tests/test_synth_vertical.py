"""The vertical synthetic population (issue 15 item 2): `agencyfl data synth --topology vertical`, and the
regional horizontal one. Files are read back as an agency would (strings), ids checked with resident_id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import invoke
from hypothesis import given
from hypothesis import strategies as st

from agencyfl.exit_codes import ExitCode
from agencyfl.federation.resident_id import InvalidResidentId, check_character, normalize
from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec, load_spec, parse_spec
from agencyfl.synth import BUREAUS, SPEC_TEMPLATE
from agencyfl.synth_ids import STYLES, HeadIds, check_characters, mistype, written
from agencyfl.synth_vertical import BLOCKS, COVERAGE_STATED, synthesize_vertical

HOUSEHOLDS = 3000
AGENCIES = ("civil-affairs", "hrss", "tax", "environment")
ROSTERS = ("mla-north", "mla-south", "special-hardship")


def read(path: Path) -> pd.DataFrame:
    """A CSV as the table loader reads it: every cell a string, nothing parsed."""
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)


def canonical(raw: str) -> str | None:
    try:
        return normalize(raw)
    except InvalidResidentId:
        return None


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("vertical") / "data"
    args = ("data", "synth", "--topology", "vertical", "--out", out, "--households", HOUSEHOLDS, "--seed", 11)
    result = invoke(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    report["out"] = out
    report["truth_households"] = read(out / "truth" / "households.csv")
    report["bad"] = read(out / "truth" / "bad_ids.csv")
    report["duplicates"] = read(out / "truth" / "duplicates.csv")
    return report


def register(synth: dict[str, Any]) -> pd.DataFrame:
    truth: pd.DataFrame = synth["truth_households"]
    return truth[truth["split"] == "register"]


def test_the_spec_parses_and_describes_the_files(synth: dict[str, Any]) -> None:
    loaded = load_any_spec(synth["spec"])
    assert isinstance(loaded, LoadedVerticalSpec)
    spec = loaded.spec
    assert spec.federation.topology == "vertical" and spec.label_agency.name == "civil-affairs"
    assert spec.feature_blocks() == BLOCKS
    # the same schema as the horizontal population, only split
    agencies = "".join(f'[[agencies]]\nname = "{a}"\ndata = "{a}.csv"\n' for a in AGENCIES)
    horizontal = parse_spec(SPEC_TEMPLATE.format(seed=0, rounds=1, epsilon=1.0, budget=2.0, agencies=agencies))
    assert spec.schema.features == horizontal.schema.features
    assert (spec.schema.id, spec.alignment.id_column, spec.alignment.id_format) == ("head_id", "head_id", "gb11643")
    assert spec.alignment.retention_days == 30 and len(spec.alignment.salt) == 64
    assert all(loaded.data_path(a).exists() for a in AGENCIES)
    assert [r.name for r in spec.rosters] == list(ROSTERS)
    assert all(loaded.roster_path(r).exists() for r in ROSTERS)
    assert spec.duplicates is not None
    assert spec.duplicates.exclusive == [("minimum-living-allowance", "special-hardship")]
    assert {r.programme for r in spec.rosters} == {"minimum-living-allowance", "special-hardship"}
    with pytest.raises(Exception, match="not supported by horizontal commands"):
        load_spec(synth["spec"])


def test_each_agency_file_holds_its_block_and_the_id_only(synth: dict[str, Any]) -> None:
    for agency in AGENCIES:
        columns = list(read(Path(synth["files"][agency])).columns)
        extra = ["eligible", "enrolled"] if agency == "civil-affairs" else []
        assert columns == ["head_id", *BLOCKS[agency], *extra], agency


def test_ids_normalize_and_check_except_the_planted_mistypes(synth: dict[str, Any]) -> None:
    bad: pd.DataFrame = synth["bad"]
    truth_ids = set(synth["truth_households"]["head_id"])
    assert len(truth_ids) == HOUSEHOLDS  # every head has a distinct number
    assert all(canonical(i) == i for i in truth_ids)  # truth is canonical, and valid
    raw_forms: dict[str, set[str]] = {}
    for agency in AGENCIES:
        ids = read(Path(synth["files"][agency]))["head_id"]
        invalid = {raw for raw in ids if canonical(raw) is None}
        planted = set(bad.loc[bad["agency"] == agency, "written"])
        assert invalid == planted, agency
        if agency != "civil-affairs":
            assert len(planted) >= 1  # hrss, tax and environment mistyped some
        assert all(canonical(i) in truth_ids for i in ids if i not in planted)
        raw_forms[agency] = {_style(raw) for raw in ids}
    assert bad["error"].isin(["check-character", "digit"]).all() and set(bad["head_id"]) <= truth_ids
    for row in bad.itertuples():  # a mistyped number differs from the true one in one character
        true, typed = str(row.head_id), _plain(str(row.written))
        assert sum(a != b for a, b in zip(true, typed, strict=True)) == 1
        assert (true[17] != typed[17]) == (row.error == "check-character")
    # the agencies write numbers differently: normalization matters
    assert "spaced" in raw_forms["hrss"] and "spaced" not in raw_forms["tax"]
    assert "fullwidth" in raw_forms["tax"] and "fullwidth" not in raw_forms["hrss"]
    assert "ideographic" in raw_forms["environment"] and "lower_x" in raw_forms["civil-affairs"]
    assert raw_forms["civil-affairs"] <= {"canonical", "lower_x"}
    for name in ROSTERS:  # rosters carry valid numbers (formatting noise only)
        ids = read(Path(synth["out"]) / "rosters" / f"{name}.csv")["head_id"]
        assert all(canonical(i) in truth_ids for i in ids), name


def _plain(raw: str) -> str:
    return "".join(ch for ch in raw if not ch.isspace() and ch != "-").translate(
        {0xFF10 + d: ord(str(d)) for d in range(10)} | {0xFF38: ord("X"), 0xFF58: ord("X"), ord("x"): ord("X")}
    )


def _style(raw: str) -> str:
    if "\u3000" in raw:
        return "ideographic"
    if " " in raw.strip():
        return "spaced"
    if raw != raw.strip():
        return "padded"
    if "-" in raw:
        return "hyphen"
    if any("\uff10" <= ch <= "\uff5a" for ch in raw):
        return "fullwidth"
    if raw.endswith("x"):
        return "lower_x"
    return "canonical"


def test_civil_affairs_holds_the_register_and_the_others_part_of_it(synth: dict[str, Any]) -> None:
    reg = register(synth)
    civil = read(Path(synth["files"]["civil-affairs"]))
    assert len(civil) == len(reg) and {normalize(i) for i in civil["head_id"]} == set(reg["head_id"])
    assert (civil["region_type"] != "").all() and (civil["assistance_line"] != "").all()
    bad_by_written = dict(zip(synth["bad"]["written"], synth["bad"]["head_id"], strict=True))
    for agency, (low, high) in COVERAGE_STATED.items():
        ids = read(Path(synth["files"][agency]))["head_id"]
        known = {bad_by_written.get(raw) or normalize(raw) for raw in ids}
        assert len(known) == len(ids)  # one row per household
        assert known == set(reg.loc[reg[f"in_{agency}"] == "1", "head_id"])
        assert low <= len(known) / len(reg) <= high, (agency, len(known) / len(reg))
    test_ids = set(synth["truth_households"].query("split == 'test'")["head_id"])
    assert abs(len(test_ids) / HOUSEHOLDS - 0.2) < 0.03
    for path in [*map(Path, synth["files"].values())]:
        if path.name != "test.csv":
            assert not test_ids & {canonical(raw) for raw in read(path)["head_id"]}, path.name


def test_assessment_and_enrolment_rates_are_near_the_stated_ones(synth: dict[str, Any]) -> None:
    reg = register(synth).set_index("head_id")
    civil = read(Path(synth["files"]["civil-affairs"]))
    civil.index = pd.Index([normalize(i) for i in civil["head_id"]])
    eligible = reg["eligible"].reindex(civil.index) == "1"
    assessed = civil["eligible"] != ""
    enrolled = civil["enrolled"] == "1"
    assert set(civil["eligible"]) == {"", "0", "1"} and set(civil["enrolled"]) == {"0", "1"}
    assert abs(assessed.mean() - 0.35) < 0.04
    assert abs(enrolled[eligible].mean() - 0.70) < 0.06
    assert 0.015 < (~eligible[enrolled]).mean() < 0.07
    assert not (enrolled & ~assessed).any()  # enrolment follows an assessment
    recorded = civil.loc[assessed, "eligible"] == "1"
    assert (recorded == eligible[assessed]).mean() > 0.9  # verification is noisy, not random
    rates = synth["rates"]  # the reported rates are those of the files
    assert rates["assessed"] == pytest.approx(assessed.mean())
    assert rates["enrolled_of_eligible"] == pytest.approx(enrolled[eligible].mean())
    assert rates["ineligible_of_enrolled"] == pytest.approx((~eligible[enrolled]).mean())


def test_test_csv_is_the_labelled_join_of_held_out_households(synth: dict[str, Any]) -> None:
    test = read(Path(synth["files"]["test"]))
    spec = load_any_spec(synth["spec"]).spec
    assert list(test.columns) == ["head_id", *(f.name for f in spec.schema.features), "eligible"]
    assert set(test["eligible"]) == {"0", "1"}
    truth = synth["truth_households"].set_index("head_id")
    assert (truth.loc[test["head_id"], "split"] == "test").all() and len(test) == (truth["split"] == "test").sum()
    assert all(canonical(i) == i for i in test["head_id"])
    for agency in ("hrss", "tax", "environment"):
        unknown = (truth.loc[test["head_id"], f"in_{agency}"] == "0").to_numpy()
        block = test[list(BLOCKS[agency])]
        assert (block[unknown] == "").all().all()  # a block is empty where its agency lacks the household
        assert (block[~unknown] != "").mean().mean() > 0.9
    assert (test["region_type"] != "").all()


def test_planted_duplicates_are_in_the_rosters(synth: dict[str, Any]) -> None:
    rosters = {
        name: {normalize(i) for i in read(Path(synth["out"]) / "rosters" / f"{name}.csv")["head_id"]}
        for name in ROSTERS
    }
    dup: pd.DataFrame = synth["duplicates"]
    same = set(dup.loc[dup["kind"] == "same-programme", "head_id"])
    exclusive = set(dup.loc[dup["kind"] == "exclusive", "head_id"])
    assert same and exclusive and not same & exclusive
    assert rosters["mla-north"] & rosters["mla-south"] == same  # exactly the planted ones
    allowance = rosters["mla-north"] | rosters["mla-south"]
    assert allowance & rosters["special-hardship"] == exclusive
    civil = read(Path(synth["files"]["civil-affairs"]))
    enrolled = {normalize(i) for i, e in zip(civil["head_id"], civil["enrolled"], strict=True) if e == "1"}
    assert allowance == enrolled  # the district rosters are civil affairs' enrolments
    truth = synth["truth_households"].set_index("head_id")
    assert (truth.loc[sorted(rosters["special-hardship"]), "eligible"] == "1").all()
    north = truth.loc[sorted(rosters["mla-north"] - same), "district"].astype(int)
    assert (north <= 2).all()


def test_the_same_seed_writes_the_same_files(synth: dict[str, Any], tmp_path: Path) -> None:
    again = invoke(
        "data",
        "synth",
        "--topology",
        "vertical",
        "--out",
        tmp_path / "b",
        "--households",
        HOUSEHOLDS,
        "--seed",
        11,
        "--format",
        "json",
    )
    assert again.exit_code == 0
    first = sorted(p.relative_to(synth["out"]) for p in Path(synth["out"]).rglob("*") if p.is_file())
    second = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert first == second and len(first) == 13
    for name in first:
        assert (Path(synth["out"]) / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = synthesize_vertical(tmp_path / "c", households=HOUSEHOLDS, seed=12)
    assert other.agency_files["tax"].read_bytes() != (Path(synth["out"]) / "tax.csv").read_bytes()


def test_chunks_keep_ids_unique_and_the_population_whole(tmp_path: Path) -> None:
    result = synthesize_vertical(tmp_path, households=2500, seed=5, chunk_size=700)  # 4 chunks
    truth = read(result.truth / "households.csv")
    assert len(truth) == 2500 and truth["head_id"].is_unique
    assert result.rows["civil-affairs"] == (truth["split"] == "register").sum()
    assert len(read(result.agency_files["civil-affairs"])) == result.rows["civil-affairs"]
    assert (read(result.truth / "duplicates.csv")["kind"] == "exclusive").sum() >= 1
    with pytest.raises(ValueError, match="at least 200"):
        synthesize_vertical(tmp_path, households=10)


def test_the_cli_reports_and_refuses_what_does_not_apply(tmp_path: Path) -> None:
    table = invoke("data", "synth", "--topology", "vertical", "--out", tmp_path / "t", "--households", 400)
    assert table.exit_code == 0 and "coverage hrss" in table.stdout and "60%-75%" in table.stdout
    assert "truth (benchmarks and tests only)" in table.stdout
    refused = invoke("data", "synth", "--topology", "vertical", "--out", tmp_path / "d", "--dirty-rows", 3)
    assert refused.exit_code == ExitCode.USAGE and "--dirty-rows does not apply" in refused.stderr
    assert not (tmp_path / "d").exists()
    assert invoke("data", "synth", "--topology", "diagonal", "--out", tmp_path / "x").exit_code == ExitCode.USAGE


def test_horizontal_topology_is_three_regional_bureaus_of_one_kind(tmp_path: Path) -> None:
    result = invoke(
        "data",
        "synth",
        "--topology",
        "horizontal",
        "--out",
        tmp_path,
        "--households",
        4000,
        "--seed",
        2,
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["files"]) == {*BUREAUS, "test"}
    spec = load_spec(report["spec"]).spec
    assert [a.name for a in spec.agencies] == list(BUREAUS) and spec.federation.topology == "horizontal"
    frames = {b: read(Path(report["files"][b])) for b in BUREAUS}
    header = list(frames["civil-affairs-north"].columns)
    assert all(list(f.columns) == header for f in frames.values())  # the same schema
    filled = {b: {c for c in header if (f[c] != "").any()} for b, f in frames.items()}
    assert len({frozenset(v) for v in filled.values()}) == 1 and "pollution_index" not in filled["civil-affairs-north"]
    ids = [set(f["household_id"]) for f in frames.values()]
    test_ids = set(read(Path(report["files"]["test"]))["household_id"])
    assert not (ids[0] & ids[1] or ids[1] & ids[2] or ids[0] & ids[2] or test_ids & (ids[0] | ids[1] | ids[2]))
    south = frames["civil-affairs-south"]
    assert (
        (south["region_type"] == "rural").mean()
        > 0.9
        > (frames["civil-affairs-north"]["region_type"] == "rural").mean()
    )


@given(st.lists(st.integers(0, 10**17 - 1), min_size=1, max_size=40))
def test_vectorized_check_characters_agree_with_resident_id(numbers: list[int]) -> None:
    first17 = np.array(numbers, dtype=np.int64)
    got = check_characters(first17)
    assert [str(c) for c in got] == [check_character(f"{n:017d}") for n in numbers]


@given(
    st.integers(0, 2**32 - 1),
    st.dictionaries(st.sampled_from(STYLES), st.floats(0.0, 0.19), max_size=len(STYLES)),
)
def test_every_way_of_writing_a_number_normalizes_back_and_every_mistype_is_caught(
    seed: int, styles: dict[str, float]
) -> None:
    rng = np.random.default_rng(seed)
    ids = HeadIds().draw(rng.integers(0, 6, 60), rng.integers(16, 95, 60), rng)
    assert len(set(ids.tolist())) == 60
    shown = written(ids, styles, rng)
    assert [normalize(str(raw)) for raw in shown] == [str(i) for i in ids]
    wrong, _kind = mistype(ids, rng)
    assert all(canonical(str(raw)) is None for raw in written(wrong, styles, rng))
