from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agencyfl.federation.errors import SpecError
from agencyfl.federation.spec import (
    LoadedSpec,
    LoadedVerticalSpec,
    TrainingSection,
    VerticalFederationSpec,
    load_any_spec,
    load_spec,
    parse_any_spec,
    parse_spec,
)

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


# ---------------------------------------------------------------- vertical specs (issue 15)
SCHEMA_FEATURES = ("household_size", "head_employment", "per_capita_income", "pollution_index")
SALT = "00112233445566778899AABBCCDDEEFF"
_FEATURE_TOML = {
    "household_size": 'type = "numeric"\nmin = 1\nmax = 12',
    "head_employment": 'type = "categorical"\ncategories = ["employed", "unemployed"]',
    "per_capita_income": 'type = "numeric"\nmin = 0\nmax = 200000\nnullable = true',
    "pollution_index": 'type = "numeric"\nmin = 0\nmax = 500\nnullable = true',
}


def vertical(
    blocks: dict[str, list[str]], label: tuple[str, ...] = ("civil-affairs",), alignment: str = "", extra: str = ""
) -> str:
    """A vertical spec with the given feature blocks and label agencies."""
    features = "".join(f'[[schema.features]]\nname = "{n}"\n{_FEATURE_TOML[n]}\n' for n in SCHEMA_FEATURES)
    agencies = "".join(
        f'[[agencies]]\nname = "{a}"\ndata = "{a}.csv"\nfeatures = {fs!r}\n'.replace("'", '"')
        + ("label = true\n" if a in label else "")
        for a, fs in blocks.items()
    )
    align = alignment or f'salt = "{SALT}"\nretention_days = 30\n'
    return (
        '[federation]\nname = "mla"\ntopology = "vertical"\n[schema]\nid = "head_id"\nlabel = "eligible"\n'
        f"{features}[privacy]\nepsilon = 3.0\nbudget = 10.0\n[alignment]\n{align}{extra}{agencies}"
    )


BLOCKS = {
    "civil-affairs": ["household_size", "head_employment"],
    "tax": ["per_capita_income"],
    "environment": ["pollution_index"],
}
ROSTERS = """
[[rosters]]
name = "mla-north"
owner = "north-district-office"
programme = "minimum-living-allowance"
data = "rosters/mla-north.csv"
[[rosters]]
name = "special-hardship"
owner = "social-assistance-office"
programme = "special-hardship"
data = "/abs/sh.csv"
[duplicates]
exclusive = [["minimum-living-allowance", "special-hardship"]]
"""


def refused(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_any_spec(text)
    return str(info.value)


def test_a_vertical_spec_gives_each_agency_its_block(tmp_path: Path) -> None:
    blocks = {"tax": ["per_capita_income"], **BLOCKS}  # features listed out of schema order below
    blocks["civil-affairs"] = ["head_employment", "household_size"]
    spec = parse_any_spec(vertical(blocks))
    assert isinstance(spec, VerticalFederationSpec)
    assert spec.federation.topology == "vertical" and spec.label_agency.name == "civil-affairs"
    assert spec.feature_blocks() == {
        "tax": ("per_capita_income",),
        "civil-affairs": ("household_size", "head_employment"),  # schema order, whatever order was listed
        "environment": ("pollution_index",),
    }
    assert [f.name for f in spec.feature_block("tax")] == ["per_capita_income"]
    block = spec.block_schema("civil-affairs")
    assert (block.id, block.label, [f.name for f in block.features]) == (
        "head_id",
        "eligible",
        ["household_size", "head_employment"],
    )
    assert spec.alignment.id_column == "head_id" and spec.alignment.id_format == "gb11643"
    assert spec.alignment.batch_size == 65536 and spec.alignment.retention_days == 30
    assert spec.alignment.salt == SALT.lower()
    with pytest.raises(SpecError, match="'police' is not in the spec"):
        spec.feature_block("police")
    (tmp_path / "f.toml").write_text(vertical(BLOCKS, extra=ROSTERS))
    loaded = load_any_spec(tmp_path / "f.toml")
    assert isinstance(loaded, LoadedVerticalSpec)
    assert loaded.data_path("tax") == (tmp_path / "tax.csv").resolve()
    assert loaded.roster_path("mla-north") == (tmp_path / "rosters" / "mla-north.csv").resolve()
    assert loaded.roster_path("special-hardship") == Path("/abs/sh.csv")


def test_horizontal_specs_read_the_same_through_either_entry_point(tmp_path: Path) -> None:
    assert parse_any_spec(MINIMAL) == parse_spec(MINIMAL)
    explicit = MINIMAL.replace('name = "mla"', 'name = "mla"\ntopology = "horizontal"')
    assert parse_spec(explicit).federation.topology == "horizontal"
    (tmp_path / "f.toml").write_text(MINIMAL)
    loaded = load_any_spec(tmp_path / "f.toml")
    assert isinstance(loaded, LoadedSpec) and loaded == load_spec(tmp_path / "f.toml")
    # a misspelt topology is named, as before
    assert "federation.topology" in refused(MINIMAL.replace('name = "mla"', 'name = "mla"\ntopology = "diagonal"'))


def test_horizontal_commands_refuse_a_valid_vertical_spec(tmp_path: Path) -> None:
    (tmp_path / "v.toml").write_text(vertical(BLOCKS))
    with pytest.raises(SpecError, match="vertical.*not supported by horizontal commands"):
        load_spec(tmp_path / "v.toml")


def test_a_feature_held_twice_is_refused_naming_both_holders() -> None:
    message = refused(vertical({**BLOCKS, "tax": ["per_capita_income", "household_size"]}))
    assert "agencies.1.features" in message and "'household_size'" in message
    assert "'civil-affairs'" in message and "'tax'" in message


def test_a_feature_held_by_nobody_or_unknown_is_refused() -> None:
    message = refused(vertical({**BLOCKS, "environment": ["per_capita_income"], "tax": ["household_size"]}))
    assert "held by both" in message  # overlap is found first
    message = refused(vertical({k: v for k, v in BLOCKS.items() if k != "environment"}))
    assert message.endswith("agencies: schema features ['pollution_index'] are held by no agency: list each in one")
    message = refused(vertical({**BLOCKS, "environment": ["pollution_index", "pm25"]}))
    assert "agencies.2.features" in message and "'pm25' (agency 'environment') is not a schema feature" in message
    assert "features repeat ['pollution_index']" in refused(
        vertical({**BLOCKS, "environment": ["pollution_index", "pollution_index"]})
    )


@pytest.mark.parametrize(
    ("label", "says"),
    [((), "none has it"), (("civil-affairs", "tax"), "['civil-affairs', 'tax'] all have it")],
)
def test_exactly_one_agency_holds_the_label(label: tuple[str, ...], says: str) -> None:
    message = refused(vertical(BLOCKS, label=label))
    assert "agencies: exactly one agency holds the label 'eligible'" in message and says in message


@pytest.mark.parametrize(
    ("alignment", "field", "quoted"),
    [
        ("salt = 'abcd'\nretention_days = 30\n", "alignment.salt", "at least 16 bytes"),
        (f"salt = '{SALT[:-1]}'\nretention_days = 30\n", "alignment.salt", f"'{SALT[:-1]}'"),
        (f"salt = 'zz{SALT[2:]}'\nretention_days = 30\n", "alignment.salt", f"'zz{SALT[2:]}'"),
        (f"salt = '0x{SALT}'\nretention_days = 30\n", "alignment.salt", "hex digits"),
        ("salt = '" + "ab" * 16 + "'\nretention_days = 30\n", "alignment.salt", "one byte repeated"),
        ("salt = 1234\nretention_days = 30\n", "alignment.salt", "1234"),
        ("retention_days = 30\n", "alignment.salt", "Field required"),
        (f"salt = '{SALT}'\nretention_days = 0\n", "alignment.retention_days", "(got 0)"),
        (f"salt = '{SALT}'\n", "alignment.retention_days", "Field required"),
        (f"salt = '{SALT}'\nretention_days = 30\nid_format = 'ssn'\n", "alignment.id_format", "'ssn'"),
        (f"salt = '{SALT}'\nretention_days = 30\nbatch_size = 0\n", "alignment.batch_size", "(got 0)"),
        (f"salt = '{SALT}'\nretention_days = 30\nid_column = 'pid'\n", "alignment.id_column", "'pid'"),
    ],
)
def test_bad_alignment_parameters_are_refused(alignment: str, field: str, quoted: str) -> None:
    message = refused(vertical(BLOCKS, alignment=alignment))
    assert field in message and quoted in message


def test_vertical_needs_alignment_and_every_agency() -> None:
    text = vertical(BLOCKS)
    assert "alignment: Field required" in refused(text.replace("[alignment]", "[unused]").replace("[unused]\n", ""))
    message = refused(text.replace("[alignment]", "[training]\nmin_agencies = 2\n[alignment]"))
    assert "training.min_agencies" in message and "2 is not the number of agencies (3)" in message
    assert "secure_aggregation" in refused(
        text.replace("[alignment]", "[secure_aggregation]\nenabled = true\n[alignment]")
    )


def test_the_alignment_hash_is_stable_and_detects_every_mismatch() -> None:
    base = parse_any_spec(vertical(BLOCKS))
    assert isinstance(base, VerticalFederationSpec)
    digest = base.alignment_sha256()
    assert len(digest) == 64
    same = vertical(
        BLOCKS, alignment=f"# the same, written differently\nretention_days = 30\nsalt = '{SALT.lower()}'\n"
    )
    other = parse_any_spec(same.replace('name = "mla"', 'name = "mla"\npurpose = "eligibility-identification"'))
    assert isinstance(other, VerticalFederationSpec) and other.alignment_sha256() == digest
    changed = [
        f"salt = '{SALT[:-2]}00'\nretention_days = 30\n",
        f"salt = '{SALT}'\nretention_days = 31\n",
        f"salt = '{SALT}'\nretention_days = 30\nbatch_size = 1024\n",
    ]
    for alignment in changed:
        spec = parse_any_spec(vertical(BLOCKS, alignment=alignment))
        assert isinstance(spec, VerticalFederationSpec) and spec.alignment_sha256() != digest, alignment
    renamed = parse_any_spec(vertical(BLOCKS).replace('name = "mla"', 'name = "mla-2"'))
    assert isinstance(renamed, VerticalFederationSpec) and renamed.alignment_sha256() != digest


def test_rosters_and_duplicates_in_either_topology() -> None:
    horizontal = parse_spec(MINIMAL + ROSTERS)
    assert [r.programme for r in horizontal.rosters] == ["minimum-living-allowance", "special-hardship"]
    assert horizontal.duplicates is not None
    assert horizontal.duplicates.exclusive == [("minimum-living-allowance", "special-hardship")]
    assert horizontal.roster("mla-north").owner == "north-district-office"
    assert horizontal.roster("mla-north").id_column == "head_id"
    with pytest.raises(SpecError, match="roster 'mla-south' is not in the spec"):
        horizontal.roster("mla-south")
    spec = parse_any_spec(vertical(BLOCKS, extra=ROSTERS))
    assert isinstance(spec, VerticalFederationSpec) and len(spec.rosters) == 2
    assert parse_spec(MINIMAL).rosters == [] and parse_spec(MINIMAL).duplicates is None


@pytest.mark.parametrize(
    ("old", "new", "field", "quoted"),
    [
        ('"special-hardship"]]', '"special-hardsihp"]]', "duplicates.exclusive.0", "'special-hardsihp' has no roster"),
        (
            '"minimum-living-allowance", "special-hardship"]]',
            '"special-hardship", "special-hardship"]]',
            "duplicates.exclusive",
            "cannot exclude itself",
        ),
        ('name = "special-hardship"', 'name = "mla-north"', "rosters", "roster names repeat ['mla-north']"),
        ('owner = "north-district-office"', 'owner = "North Office"', "rosters.0.owner", "'North Office'"),
        ('data = "/abs/sh.csv"', "", "rosters.1.data", "Field required"),
    ],
)
def test_bad_rosters_are_refused(old: str, new: str, field: str, quoted: str) -> None:
    for text in (MINIMAL + ROSTERS, vertical(BLOCKS, extra=ROSTERS)):
        message = refused(text.replace(old, new, 1))
        assert field in message and quoted in message
    only_duplicates = ROSTERS[ROSTERS.index("[duplicates]") :]
    assert "duplicates: [duplicates] needs the [[rosters]] it checks" in refused(MINIMAL + only_duplicates)


@given(st.binary(min_size=16, max_size=64), st.booleans())
def test_any_salt_of_16_random_bytes_is_accepted_in_either_case(salt: bytes, upper: bool) -> None:
    text = salt.hex().upper() if upper else salt.hex()
    alignment = f"salt = '{text}'\nretention_days = 30\n"
    if len(set(salt)) == 1:
        assert "one byte repeated" in refused(vertical(BLOCKS, alignment=alignment))
        return
    spec = parse_any_spec(vertical(BLOCKS, alignment=alignment))
    assert isinstance(spec, VerticalFederationSpec) and spec.alignment.salt == salt.hex()


@given(st.text(max_size=80))
def test_a_salt_is_accepted_exactly_when_it_is_16_or_more_hex_bytes(text: str) -> None:
    from hypothesis import assume

    assume("'" not in text and "\\" not in text and "\n" not in text and text.isprintable())
    hex_bytes = len(text) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in text)
    ok = hex_bytes and len(text) >= 32 and len({text[i : i + 2].lower() for i in range(0, len(text), 2)}) > 1
    try:
        parse_any_spec(vertical(BLOCKS, alignment=f"salt = '{text}'\nretention_days = 30\n"))
    except SpecError as exc:
        assert not ok and "alignment.salt" in str(exc)
    else:
        assert ok


@given(st.lists(st.integers(0, 2), min_size=len(SCHEMA_FEATURES), max_size=len(SCHEMA_FEATURES)), st.data())
def test_any_partition_parses_and_any_overlap_or_gap_is_refused(owner: list[int], data: st.DataObject) -> None:
    agencies = ["civil-affairs", "tax", "environment"]
    blocks = {a: [f for f, o in zip(SCHEMA_FEATURES, owner, strict=True) if o == i] for i, a in enumerate(agencies)}
    if any(not block for block in blocks.values()):  # an agency holding nothing is refused (min_length 1)
        assert "features" in refused(vertical(blocks))
        return
    spec = parse_any_spec(vertical(blocks))
    assert isinstance(spec, VerticalFederationSpec)
    assert {a: set(b) for a, b in spec.feature_blocks().items()} == {a: set(b) for a, b in blocks.items()}
    feature = data.draw(st.sampled_from(SCHEMA_FEATURES))
    holder = agencies[owner[SCHEMA_FEATURES.index(feature)]]
    other = data.draw(st.sampled_from([a for a in agencies if a != holder]))
    overlapping = {**blocks, other: [*blocks[other], feature]}
    message = refused(vertical(overlapping))
    assert f"feature {feature!r} is held by both" in message and repr(holder) in message and repr(other) in message
    if len(blocks[holder]) > 1:
        gap = {**blocks, holder: [f for f in blocks[holder] if f != feature]}
        assert f"schema features {[feature]!r} are held by no agency" in refused(vertical(gap))


def test_a_vertical_spec_may_set_block_newtons_damping(tmp_path: Path) -> None:
    from agencyfl.vertical.job import plan_of

    def plan(extra: str) -> float:
        path = tmp_path / "federation.toml"
        path.write_text(vertical(BLOCKS, extra=extra))
        loaded = load_any_spec(path)
        assert isinstance(loaded, LoadedVerticalSpec)
        return plan_of(loaded).damping

    assert plan("") == 0.5  # the default, tuned at 60,000 training households and more
    assert plan("[training]\ndamping = 1.5\n") == 1.5
    for bad, quoted in (("0", "0"), ("-1", "-1"), ("nan", "nan"), ("1000", "1000")):
        message = refused(vertical(BLOCKS, extra=f"[training]\ndamping = {bad}\n"))
        assert "training.damping" in message and quoted in message
    message = refused(MINIMAL.replace("[privacy]", "[training]\ndamping = 1.0\n[privacy]"))
    assert "training.damping" in message and "DP-SGD" in message
