"""`agencyfl align`, `agencyfl screen duplicates`, `agencyfl alignment purge` on the vertical synthetic population.

The truth the protocol never sees (every file, ``truth/``) is the oracle: each agency's positions must
point at exactly its own households in the register, the planted duplicates must all be found and
nothing else, and nothing any party keeps (or the coordinator records) may hold another party's ids.
The abuse a careless steward or hostile requester would try is refused with its exit code, and
nothing is written for a refused run.
"""

from __future__ import annotations

import csv
import json
import shutil
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import invoke

from agencyfl.alignment.runs import purge_expired, runs
from agencyfl.federation.errors import LedgerError
from agencyfl.federation.resident_id import InvalidResidentId, check_character, normalize
from agencyfl.synth_vertical import VerticalSynthResult, synthesize_vertical


def ids_of(path: Path, column: str = "head_id") -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [row[column] for row in csv.DictReader(fh)]


def valid(raw: list[str]) -> list[str | None]:
    out: list[str | None] = []
    for value in raw:
        try:
            out.append(normalize(value))
        except InvalidResidentId:
            out.append(None)
    return out


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> VerticalSynthResult:
    return synthesize_vertical(tmp_path_factory.mktemp("vertical") / "data", households=3000, seed=11)


@pytest.fixture(scope="module")
def aligned(population: VerticalSynthResult, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("aligned")
    done = invoke("align", "--spec", population.spec, "--workdir", work, "--format", "json")
    assert done.exit_code == 0, done.output
    return work, json.loads(done.stdout)


def test_each_agency_learns_exactly_the_register_positions_of_its_own_households(
    population: VerticalSynthResult, aligned: tuple[Path, dict]
) -> None:
    work, report = aligned
    register = [i for i in valid(ids_of(population.agency_files["civil-affairs"])) if i is not None]
    assert report["register"]["size"] == len(register)
    for agency in ("hrss", "tax", "environment"):
        own = valid(ids_of(population.agency_files[agency]))
        with (work / agency / "alignment" / "alignment-positions.csv").open() as fh:
            pairs = [(int(r["row"]), int(r["position"])) for r in csv.DictReader(fh)]
        expected = {(row, register.index(i)) for row, i in enumerate(own) if i is not None and i in register}
        assert set(pairs) == expected and len(pairs) == report["agencies"][agency]["matched"] > 0
        bad = sum(i is None for i in own)
        assert bad > 0 and report["agencies"][agency]["quarantined"] == bad  # the planted mistyped ids
        with (work / agency / "alignment" / "alignment-quarantine.csv").open() as fh:
            reasons = [r["reason"] for r in csv.DictReader(fh)]
        assert len(reasons) == bad and all("check character" in r or "digits" in r for r in reasons)


def test_no_party_keeps_and_the_coordinator_records_no_id(
    population: VerticalSynthResult, aligned: tuple[Path, dict]
) -> None:
    work, report = aligned
    # the 17 digits of every id a party holds, valid or not (its own quarantine may quote its own rows)
    held = {name: {"".join(unicodedata.normalize("NFKC", r).split())[:17] for r in ids_of(f)}
            for name, f in population.agency_files.items()}  # fmt: skip
    everyone = set().union(*held.values())

    def kept(folder: Path) -> bytes:
        return b"".join(
            p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.suffix in {".csv", ".json", ".jsonl"}
        )

    assert not [i for i in everyone if i.encode() in kept(work / "coordinator")]  # the coordinator: no id at all
    for party, own in held.items():  # a party's folder holds no id it did not hold itself (its quarantine may)
        stored = kept(work / party)
        assert stored and not [i for i in everyone - own if i.encode() in stored]
    sizes = json.loads((work / "civil-affairs" / "alignment" / "alignment-sizes.json").read_text())
    assert set(sizes) == {"holder", "register_size", "quarantined", "query_sizes"}  # civil affairs: sizes only
    assert not (work / "civil-affairs" / "alignment" / "alignment-positions.csv").exists()
    (entry,) = [r for r in runs(work) if r.run == report["run"]]
    assert entry.kind == "register-alignment" and entry.parties[0] == "civil-affairs"
    # the coordinator records what its relay saw, sizes, and no match or quarantine count
    assert entry.sizes == {"civil-affairs": report["register"]["size"]} | {
        a: report["agencies"][a]["rows"] for a in ("hrss", "tax", "environment")
    }
    assert "matched" not in entry.model_dump_json() and "quarantined" not in entry.model_dump_json()
    own = json.loads((work / "hrss" / "alignment" / "alignment-record.json").read_text())  # the agency's own count
    assert [r["matched"] for r in own] == [report["agencies"]["hrss"]["matched"]]
    modes = {p.stat().st_mode & 0o777 for p in (work / "hrss" / "alignment").iterdir()}
    assert modes == {0o600} and (work / "hrss" / "alignment").stat().st_mode & 0o777 == 0o700


def test_the_coordinators_record_of_runs_is_a_signed_chain(aligned: tuple[Path, dict], tmp_path: Path) -> None:
    work, _ = aligned
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    ledger = copy / "coordinator" / "runs-ledger" / "ledger.jsonl"
    ledger.write_text(ledger.read_text().replace('"bytes_relayed":', '"bytes_relayed":1', 1))  # a changed figure
    with pytest.raises(LedgerError):
        runs(copy)
    honest = invoke("audit", "runs", work / "coordinator" / "runs-ledger", "--format", "json")
    assert honest.exit_code == 0 and [r["kind"] for r in json.loads(honest.stdout)["runs"]] == ["register-alignment"]
    tampered = invoke("audit", "runs", copy / "coordinator" / "runs-ledger", "--format", "json")
    assert tampered.exit_code == 5 and json.loads(tampered.stdout)["verified"] is False


def test_the_duplicate_check_finds_every_planted_duplicate_and_nothing_else(
    population: VerticalSynthResult, tmp_path: Path
) -> None:
    rosters = population.rosters
    args = [a for name, path in rosters.items() for a in ("--roster", f"{name}={path}")]
    done = invoke("screen", "duplicates", "--spec", population.spec, *args, "--out", tmp_path, "--format", "json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    with (population.truth / "duplicates.csv").open() as fh:
        planted = {(normalize(r["head_id"]), frozenset(r["rosters"].split(";"))) for r in csv.DictReader(fh)}
    members = {name: valid(ids_of(path)) for name, path in rosters.items()}
    found = set()
    for name in rosters:
        folder = Path(report["rosters"][name]["output"])
        with (folder / "duplicates-review.csv").open() as fh:
            for r in csv.DictReader(fh):
                assert r["action"] == "review"  # a list for caseworkers, never a removal
                own = members[name][int(r["row"])]  # the row is the owner's own
                assert own is not None and own in members[r["other_roster"]]  # no false match
                found.add((own, frozenset({name, r["other_roster"]})))
    assert planted and found == planted  # recall 1.0 with the ids' formatting noise, nothing else
    (entry,) = [r for r in runs(tmp_path) if r.kind == "duplicate-check"]
    assert entry.purpose == "duplicate-coverage-review" and entry.requested_by == "coordinator"


@pytest.mark.parametrize(
    ("abuse", "code", "says"),
    [
        ("horizontal spec", 3, "horizontal spec"),
        ("duplicate id in a file", 4, "duplicate resident ids"),
        ("no household in common", 22, "none of"),
        ("a query longer than the agency declared", 23, "more than the 100 allowed"),
    ],
)
def test_bad_inputs_are_refused_with_their_exit_code_and_nothing_is_written(
    population: VerticalSynthResult, small_fed: object, tmp_path: Path, abuse: str, code: int, says: str
) -> None:
    data = tmp_path / "data"
    shutil.copytree(population.spec.parent, data)
    spec = data / "federation.toml"
    if abuse == "horizontal spec":
        spec = small_fed.spec  # type: ignore[attr-defined]
    elif abuse == "a query longer than the agency declared":  # guessed ids added: each one a membership test
        text = spec.read_text()
        start = text.index('name = "tax"')
        spec.write_text(text[:start] + "max_rows = 100\n" + text[start:])
    elif abuse == "duplicate id in a file":
        lines = (data / "tax.csv").read_text().splitlines()
        (data / "tax.csv").write_text("\n".join([*lines, lines[1]]) + "\n")  # a careless steward's repeated row
    else:
        lines = (data / "hrss.csv").read_text().splitlines()
        foreign = [f"1101051949123{n:04d}" for n in range(len(lines) - 1)]  # valid ids of nobody registered
        rows = [f"{f}{check_character(f)},{line.partition(',')[2]}" for f, line in zip(foreign, lines[1:], strict=True)]
        (data / "hrss.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    work = tmp_path / "work"
    done = invoke("align", "--spec", spec, "--workdir", work)
    assert done.exit_code == code and says in done.output, done.output
    assert "Traceback" not in done.output and len(done.output.strip().splitlines()) == 1
    assert not [p for p in work.rglob("*") if p.is_file() and "alignment" in p.parts]  # nothing kept


def test_a_roster_argument_that_is_not_name_equals_file_or_not_in_the_spec_is_refused(
    population: VerticalSynthResult, tmp_path: Path
) -> None:
    north = population.rosters["mla-north"]
    base = ("screen", "duplicates", "--spec", population.spec, "--out", tmp_path)
    malformed = invoke(*base, "--roster", str(north), "--roster", f"x={north}")
    assert malformed.exit_code == 2 and "NAME=FILE" in malformed.output
    unknown = invoke(*base, "--roster", f"mla-north={north}", "--roster", f"elsewhere={north}")
    assert unknown.exit_code == 3 and "elsewhere" in unknown.output
    assert not list(tmp_path.rglob("duplicates-review.csv"))


def test_outputs_are_removed_when_their_retention_ends(aligned: tuple[Path, dict], tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(aligned[0], work)
    assert purge_expired(work) == []  # fresh: kept
    later = datetime.now(UTC) + timedelta(days=31)  # the synthetic spec keeps them 30 days
    removed = purge_expired(work, now=later)
    assert {p.parent.name for p in removed} == {"civil-affairs", "hrss", "tax", "environment"}
    assert not list(work.rglob("alignment-positions.csv")) and not list(work.rglob("*/alignment"))
    assert (work / "coordinator" / "runs-ledger" / "ledger.jsonl").exists()  # the record of the run stays
    shutil.copytree(aligned[0], tmp_path / "again")
    done = invoke("alignment", "purge", "--workdir", tmp_path / "again", "--all", "--format", "json")
    assert done.exit_code == 0 and len(json.loads(done.stdout)["removed"]) == 4


@pytest.mark.parametrize("damage", ["a file where an output folder goes", "a runs chain that does not verify"])
def test_a_run_that_fails_late_leaves_nothing_and_records_nothing(
    population: VerticalSynthResult, aligned: tuple[Path, dict], tmp_path: Path, damage: str
) -> None:
    work = tmp_path / "work"
    shutil.copytree(aligned[0], work)
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    if damage == "a file where an output folder goes":
        shutil.rmtree(work / "tax")
        (work / "tax").write_text("not a folder")
        before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    else:
        ledger = work / "coordinator" / "runs-ledger" / "ledger.jsonl"
        ledger.write_text(ledger.read_text().replace('"register-alignment"', '"duplicate-check"', 1))
        before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    done = invoke("align", "--spec", population.spec, "--workdir", work)
    assert done.exit_code in {4, 5} and len(done.output.strip().splitlines()) == 1, done.output
    after = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert after == before  # the earlier run's outputs untouched, no staging folder left, no entry appended


def test_bad_bytes_in_an_input_file_are_a_data_error_not_a_protocol_error(
    population: VerticalSynthResult, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(population.spec.parent, data)
    with (data / "environment.csv").open("ab") as fh:
        fh.write(b"\xff\xfe not utf-8,1\n")
    done = invoke("align", "--spec", data / "federation.toml", "--workdir", tmp_path / "work")
    assert done.exit_code == 4 and "UTF-8" in done.output, done.output


def test_every_roster_is_read_and_a_roster_nothing_conflicts_with_is_refused(
    population: VerticalSynthResult, tmp_path: Path
) -> None:
    r = population.rosters
    base = ("screen", "duplicates", "--spec", population.spec, "--out", tmp_path)
    missing = invoke(*base, "--roster", f"mla-north={r['mla-north']}", "--roster", f"mla-south={tmp_path / 'gone.csv'}")
    assert missing.exit_code == 4 and "gone.csv" in missing.output
    text = population.spec.read_text().replace('exclusive = [["minimum-living-allowance", "special-hardship"]]', "")
    (population.spec.parent / "no-exclusion.toml").write_text(text)
    spec = population.spec.parent / "no-exclusion.toml"
    pair = ("--roster", f"mla-north={r['mla-north']}", "--roster", f"special-hardship={r['special-hardship']}")
    lonely = invoke("screen", "duplicates", "--spec", spec, "--out", tmp_path, *pair)
    assert lonely.exit_code == 22 and "conflicts with none" in lonely.output
    assert not list(tmp_path.rglob("duplicates-review.csv"))


def test_purge_removes_only_the_files_a_run_wrote(aligned: tuple[Path, dict], tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(aligned[0], work)
    note = work / "tax" / "alignment" / "steward-notes.txt"  # something the run did not write
    note.write_text("keep me")
    removed = purge_expired(work, now=datetime.now(UTC) + timedelta(days=31))
    assert work / "tax" / "alignment" in removed and note.read_text() == "keep me"
    assert sorted(p.name for p in (work / "tax" / "alignment").iterdir()) == ["steward-notes.txt"]
    missing = invoke("alignment", "purge", "--workdir", tmp_path / "nowhere")
    assert missing.exit_code == 4
