"""A seeded synthetic population split vertically: each agency holds its own columns about the same households.

The households, their features and their true eligibility come from ``synth.population`` (the means
test described there); this module decides who knows what, and writes it as the agencies would.

What each party holds (rates are targets; the realized ones are in ``truth/summary.json``):

- ``civil-affairs`` (the label holder) keeps the household register of its area: every household
  (100%), with its make-up (region, assistance line, size, children, elderly, head's age,
  disability, chronic illness, head's employment). It has assessed about 35% of households
  (85% of the truly eligible, who apply, and 20% of the others); ``eligible`` is the recorded
  outcome of that assessment (with the verification noise of ``population``) and is empty for
  households never assessed. ``enrolled`` says who receives the minimum living allowance now:
  89% of households assessed eligible and 3% of those assessed not eligible (circumstances
  changed since enrolment, not yet reviewed), so about 70% of the truly eligible are enrolled and
  about 4% of enrolled households are not eligible.
- ``hrss`` (human resources and social security: insurance, unemployment registration, pensions)
  knows 75% of households whose head is employed, unemployed or retired and 25% of the others:
  about 69% of households (stated range 60-75%).
- ``tax`` (income, deposits, property, vehicle, housing) knows 80% of households whose declared
  income exceeds 1.2 times the assistance line and 15% of the others: about 62% (range 50-70%).
- ``environment`` (pollution at the home address) knows 97% of households in the five monitored
  districts and 55% in the outlying county: about 90% (range 85-95%).

Every file is keyed by the resident identity number of the household head (``head_id``, GB 11643),
written as each agency's staff write it (``synth_ids.written``: spaces, hyphens, lower-case x,
full-width digits, in different mixes per agency). HRSS and tax mistyped 0.3% of their numbers and
environment 0.1% (a wrong check character or a wrong digit): alignment must quarantine those.

Benefit rosters for the duplicate check: two district offices' minimum-living-allowance rosters
(``mla-north``: districts 0-2, ``mla-south``: districts 3-5; every enrolled household is on its
district's roster) and the special-hardship roster (80% of truly eligible heads aged 60 or more who
live alone with a disability, chronic illness or age 75+; special hardship excludes the allowance,
so they are not enrolled). Planted duplicate enrolments: 1% of enrolled households are also on the
other district's roster, and 3% of special-hardship households also receive the allowance (each at
least one per chunk of households).

``test.csv`` holds 20% of the households, held out: in no agency's file and no roster; each row is
the join of what the agencies would know about it (a block is empty where the agency does not know
the household), with the canonical id and the recorded label. ``truth/`` is for benchmarks and tests
only: every household's true eligibility and what each party holds, the mistyped ids, the planted
duplicates and the realized rates.

Generation runs in chunks of 200,000 households (memory stays bounded) and streams the CSV files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from agencyfl.synth import SPEC_TEMPLATE, population
from agencyfl.synth_ids import HeadIds, mistype, written

AGENCIES = ("civil-affairs", "hrss", "tax", "environment")
LABEL_AGENCY = "civil-affairs"
ID_COLUMN = "head_id"
LABEL = "eligible"

FEATURES = tuple(re.findall(r'\[\[schema\.features\]\]\nname = "([a-z_]+)"', SPEC_TEMPLATE))
"""The schema's features, in order (those of ``synth.SPEC_TEMPLATE``, which this population shares)."""

# Who holds which feature (disjoint; together the schema's features).
BLOCKS: dict[str, tuple[str, ...]] = {
    "civil-affairs": (
        "region_type",
        "assistance_line",
        "household_size",
        "children",
        "elderly",
        "head_age",
        "disability",
        "chronic_illness",
        "head_employment",
    ),
    "hrss": ("months_unemployed", "pension_monthly"),
    "tax": ("per_capita_income", "deposits", "assets", "vehicle", "housing"),
    "environment": ("pollution_index",),
}
_INTEGER = {"assistance_line", "household_size", "children", "elderly", "head_age", "months_unemployed"}
_BOOLEAN = {"disability", "chronic_illness", "vehicle"}
_TEXT = {"region_type", "head_employment", "housing"}
_REQUIRED = {"region_type", "assistance_line"}  # not nullable in the schema: the register always has them

ASSESSED = {"eligible": 0.85, "other": 0.20}
ENROLLED = {"assessed-eligible": 0.89, "assessed-not-eligible": 0.03}
COVERAGE_STATED = {"hrss": (0.60, 0.75), "tax": (0.50, 0.70), "environment": (0.85, 0.95)}
TARGETS: dict[str, tuple[float, float]] = {
    "assessed": (0.35, 0.35),
    "enrolled_of_eligible": (0.70, 0.70),
    "ineligible_of_enrolled": (0.04, 0.04),
    "coverage_civil-affairs": (1.0, 1.0),
    **{f"coverage_{agency}": span for agency, span in COVERAGE_STATED.items()},
}
"""The rates stated above (a range where a range is stated), keyed as ``VerticalSynthResult.rates``."""
UNRECORDED = {"civil-affairs": 0.02, "hrss": 0.03, "tax": 0.03, "environment": 0.03}
"""Share of a known household's fields an agency still left empty (each field independently)."""
MISTYPED = {"civil-affairs": 0.0, "hrss": 0.003, "tax": 0.003, "environment": 0.001}
SPECIAL_HARDSHIP = 0.8
DUPLICATE_DISTRICTS = 0.01
DUPLICATE_EXCLUSIVE = 0.03
TEST_FRACTION = 0.2
CHUNK = 200_000

ID_STYLES: dict[str, dict[str, float]] = {
    "civil-affairs": {"lower_x": 0.3},
    "hrss": {"spaced": 0.35, "lower_x": 0.5},
    "tax": {"fullwidth": 0.2, "hyphen": 0.1},
    "environment": {"fullwidth": 0.1, "ideographic": 0.1, "padded": 0.1, "lower_x": 0.5},
    "mla-north": {"spaced": 0.2},
    "mla-south": {"fullwidth": 0.3},
    "special-hardship": {"hyphen": 0.15, "lower_x": 0.5},
}
ROSTERS: dict[str, tuple[str, str]] = {  # name: (owner, programme)
    "mla-north": ("north-district-office", "minimum-living-allowance"),
    "mla-south": ("south-district-office", "minimum-living-allowance"),
    "special-hardship": ("social-assistance-office", "special-hardship"),
}
EXCLUSIVE = (("minimum-living-allowance", "special-hardship"),)

Mask = npt.NDArray[np.bool_]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class VerticalSynthResult:
    """Where ``synthesize_vertical`` wrote things, row counts per file and the realized rates."""

    spec: Path
    test: Path
    agency_files: dict[str, Path]
    rosters: dict[str, Path]
    truth: Path
    rows: dict[str, int]
    rates: dict[str, float]


def salt_for(seed: int) -> str:
    """The spec's alignment salt: derived from the seed, so that the same seed writes the same files.

    A real federation draws its salt at random (``secrets.token_hex(32)``).
    """
    return hashlib.sha256(f"agencyfl synthetic alignment salt {seed}".encode()).hexdigest()


def vertical_spec_text(seed: int, rounds: int = 10, epsilon: float = 3.0, budget: float = 10.0) -> str:
    """The ``federation.toml`` of the vertical population: the schema of ``synth.SPEC_TEMPLATE``, split."""
    template = SPEC_TEMPLATE
    features = template[template.index("[[schema.features]]") : template.index("[model]")]
    fairness = (
        template[template.index("[fairness]") : template.index("{agencies}")].replace("{{", "{").replace("}}", "}")
    )
    agencies = "".join(
        f'[[agencies]]\nname = "{a}"\ndata = "{a}.csv"\nfeatures = {json.dumps(list(BLOCKS[a]))}\n'
        + ("label = true\n" if a == LABEL_AGENCY else "")
        + "\n"
        for a in AGENCIES
    )
    rosters = "".join(
        f'[[rosters]]\nname = "{name}"\nowner = "{owner}"\nprogramme = "{programme}"\ndata = "rosters/{name}.csv"\n\n'
        for name, (owner, programme) in ROSTERS.items()
    )
    exclusive = json.dumps([list(pair) for pair in EXCLUSIVE])
    return (
        f"# Federation spec written by `agencyfl data synth --topology vertical` (seed {seed}).\n"
        '[federation]\nname = "minimum-living-allowance"\ntopology = "vertical"\n'
        'purpose = "eligibility-identification"\n\n'
        f'[schema]\nid = "{ID_COLUMN}"\nlabel = "{LABEL}"\n\n{features}'
        f'[model]\nkind = "logistic"\n\n[training]\nrounds = {rounds}\n\n'
        f"[privacy]\nepsilon = {epsilon}\ndelta = 1e-5\nmax_grad_norm = 1.0\nbudget = {budget}\n\n{fairness}"
        "# Synthetic: the salt is derived from the seed so that the same seed writes the same files;\n"
        "# a real federation draws it at random (python -c 'import secrets; print(secrets.token_hex(32))').\n"
        f'[alignment]\nid_column = "{ID_COLUMN}"\nid_format = "gb11643"\nsalt = "{salt_for(seed)}"\n'
        "retention_days = 30\nbatch_size = 65536\n\n"
        f"{agencies}{rosters}[duplicates]\nexclusive = {exclusive}\n"
    )


class _CsvSink:
    """CSV files written chunk by chunk: the header once, then rows without quoting (ids have no commas)."""

    def __init__(self) -> None:
        self._files: dict[Path, IO[bytes]] = {}
        self.rows: dict[Path, int] = {}

    def write(self, path: Path, columns: dict[str, pa.Array]) -> None:
        handle = self._files.get(path)
        if handle is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self._files[path] = path.open("wb")
            handle.write((",".join(columns) + "\n").encode())
            self.rows[path] = 0
        table = pa.table(columns)
        pacsv.write_csv(table, handle, pacsv.WriteOptions(include_header=False, quoting_style="none"))
        self.rows[path] += table.num_rows

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


def _column(pop: pd.DataFrame, name: str, rows: npt.NDArray[np.int64], blank: Mask) -> pa.Array:
    values = pop[name].to_numpy()[rows]
    if name in _TEXT:
        return pa.array(values.astype(str), mask=blank, type=pa.string())
    if name in _BOOLEAN:
        return pa.array(values.astype(bool), mask=blank, type=pa.bool_())
    if name in _INTEGER:
        return pa.array(values.astype(np.int64), mask=blank, type=pa.int64())
    return pa.array(values.astype(np.float64), mask=blank, type=pa.float64())


def _block(
    pop: pd.DataFrame, agency: str, rows: npt.NDArray[np.int64], rng: np.random.Generator
) -> dict[str, pa.Array]:
    columns = {}
    for name in BLOCKS[agency]:
        blank = rng.random(len(rows)) < UNRECORDED[agency]
        columns[name] = _column(pop, name, rows, blank & (name not in _REQUIRED))
    return columns


def _at_least_one(mask: Mask, share: float, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Indices of about ``share`` of the true entries of ``mask`` (at least one if there is any)."""
    candidates = np.flatnonzero(mask)
    if len(candidates) == 0:
        return candidates
    count = min(len(candidates), max(1, round(share * len(candidates))))
    return np.sort(rng.choice(candidates, count, replace=False))


def _months(count: int, rng: np.random.Generator) -> npt.NDArray[np.str_]:
    start = np.datetime64("2015-01", "M")
    return np.datetime_as_string(start + rng.integers(0, 114, count).astype("timedelta64[M]"), unit="M")


class _Chunk:
    """One chunk of households: who knows what about them, decided with the chunk's own generator."""

    def __init__(self, n: int, seed: int, index: int, ids: HeadIds) -> None:
        self.rng = np.random.default_rng([seed, index, 1])
        self.pop = population(n, int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
        pop, rng = self.pop, self.rng
        self.truth = pop["_truth"].to_numpy().astype(bool)
        self.recorded = pop[LABEL].to_numpy().astype(bool)
        self.district = pop["_district"].to_numpy().astype(np.int64)
        self.ids = ids.draw(self.district, pop["head_age"].to_numpy().astype(np.int64), rng)
        self.test = rng.random(n) < TEST_FRACTION
        register = ~self.test
        ratio = pop["per_capita_income"].to_numpy() / pop["assistance_line"].to_numpy()
        insured = np.isin(pop["head_employment"].to_numpy(), ["employed", "unemployed", "retired"])
        self.known: dict[str, Mask] = {
            "civil-affairs": np.ones(n, dtype=bool),
            "hrss": rng.random(n) < np.where(insured, 0.75, 0.25),
            "tax": rng.random(n) < np.where(ratio > 1.2, 0.80, 0.15),
            "environment": rng.random(n) < np.where(self.district <= 4, 0.97, 0.55),
        }
        alone = pop["household_size"].to_numpy() == 1
        age = pop["head_age"].to_numpy()
        need = pop["disability"].to_numpy() | pop["chronic_illness"].to_numpy() | (age >= 75)
        self.special = register & self.truth & alone & (age >= 60) & need & (rng.random(n) < SPECIAL_HARDSHIP)
        self.assessed = register & (rng.random(n) < np.where(self.truth, ASSESSED["eligible"], ASSESSED["other"]))
        enrol = np.where(self.recorded, ENROLLED["assessed-eligible"], ENROLLED["assessed-not-eligible"])
        self.enrolled = self.assessed & ~self.special & (rng.random(n) < enrol)
        # planted: special-hardship households that also receive the allowance (the programmes exclude each other)
        self.exclusive_dup = _at_least_one(self.special, DUPLICATE_EXCLUSIVE, rng)
        self.enrolled[self.exclusive_dup] = True
        self.assessed[self.exclusive_dup] = True
        # planted: allowance households on both districts' rosters (moved, enrolled again, never removed)
        self.district_dup = _at_least_one(self.enrolled & ~self.special, DUPLICATE_DISTRICTS, rng)

    def agency_rows(self, agency: str) -> npt.NDArray[np.int64]:
        rows = np.flatnonzero(~self.test & self.known[agency])
        return self.rng.permutation(rows)  # every file in its own order: only the ids join them


def _write_agency(chunk: _Chunk, agency: str, out: Path, sink: _CsvSink, bad: list[pd.DataFrame]) -> None:
    rng = chunk.rng
    rows = chunk.agency_rows(agency)
    ids = chunk.ids[rows]
    if MISTYPED[agency] > 0:
        typo = _at_least_one(np.ones(len(rows), dtype=bool), MISTYPED[agency], rng)
        wrong, kind = mistype(ids[typo], rng)
        ids = ids.copy()
        ids[typo] = wrong
    shown = written(ids, ID_STYLES[agency], rng)
    if MISTYPED[agency] > 0:
        bad.append(
            pd.DataFrame({"agency": agency, "written": shown[typo], ID_COLUMN: chunk.ids[rows[typo]], "error": kind})
        )
    columns: dict[str, pa.Array] = {ID_COLUMN: pa.array(shown, type=pa.string())}
    columns |= _block(chunk.pop, agency, rows, rng)
    if agency == LABEL_AGENCY:
        assessed = chunk.assessed[rows]
        columns[LABEL] = pa.array(chunk.recorded[rows].astype(np.int64), mask=~assessed, type=pa.int64())
        columns["enrolled"] = pa.array(chunk.enrolled[rows].astype(np.int64), type=pa.int64())
    sink.write(out / f"{agency}.csv", columns)


def _write_rosters(chunk: _Chunk, out: Path, sink: _CsvSink, duplicates: list[pd.DataFrame]) -> None:
    rng = chunk.rng
    north = chunk.district <= 2
    members: dict[str, Mask] = {
        "mla-north": chunk.enrolled & north,
        "mla-south": chunk.enrolled & ~north,
        "special-hardship": chunk.special.copy(),
    }
    dup = chunk.district_dup
    members["mla-north"][dup] = True
    members["mla-south"][dup] = True
    for name, member in members.items():
        rows = rng.permutation(np.flatnonzero(member))
        shown = written(chunk.ids[rows], ID_STYLES[name], rng)
        sink.write(
            out / "rosters" / f"{name}.csv",
            {
                ID_COLUMN: pa.array(shown, type=pa.string()),
                "since": pa.array(_months(len(rows), rng), type=pa.string()),
            },
        )
    both = np.where(north[dup], "mla-north;mla-south", "mla-south;mla-north")
    exclusive_roster = np.where(north[chunk.exclusive_dup], "mla-north", "mla-south")
    duplicates.append(
        pd.DataFrame(
            {
                ID_COLUMN: np.concatenate([chunk.ids[dup], chunk.ids[chunk.exclusive_dup]]),
                "kind": ["same-programme"] * len(dup) + ["exclusive"] * len(chunk.exclusive_dup),
                "programmes": ["minimum-living-allowance"] * len(dup)
                + ["minimum-living-allowance;special-hardship"] * len(chunk.exclusive_dup),
                "rosters": np.concatenate([both, np.strings.add(exclusive_roster, ";special-hardship")]),
            }
        )
    )


def _write_test(chunk: _Chunk, out: Path, sink: _CsvSink) -> None:
    rows = np.flatnonzero(chunk.test)
    columns: dict[str, pa.Array] = {}
    for agency in AGENCIES:
        unknown = ~chunk.known[agency][rows]  # what a join shows: empty where the agency lacks the household
        for name in BLOCKS[agency]:
            blank = (chunk.rng.random(len(rows)) < UNRECORDED[agency]) | unknown
            columns[name] = _column(chunk.pop, name, rows, blank & (name not in _REQUIRED))
    sink.write(
        out / "test.csv",
        {ID_COLUMN: pa.array(chunk.ids[rows], type=pa.string())}
        | {name: columns[name] for name in FEATURES}
        | {LABEL: pa.array(chunk.recorded[rows].astype(np.int64), type=pa.int64())},
    )


def _write_truth(chunk: _Chunk, out: Path, sink: _CsvSink) -> None:
    flag = {name: pa.array(mask.astype(np.int64)) for name, mask in chunk.known.items() if name != LABEL_AGENCY}
    sink.write(
        out / "truth" / "households.csv",
        {
            ID_COLUMN: pa.array(chunk.ids, type=pa.string()),
            "split": pa.array(np.where(chunk.test, "test", "register"), type=pa.string()),
            "district": pa.array(chunk.district),
            "eligible": pa.array(chunk.truth.astype(np.int64)),
            "recorded": pa.array(chunk.recorded.astype(np.int64)),
            "assessed": pa.array(chunk.assessed.astype(np.int64)),
            "enrolled": pa.array(chunk.enrolled.astype(np.int64)),
            "special_hardship": pa.array(chunk.special.astype(np.int64)),
            **{f"in_{name}": column for name, column in flag.items()},
        },
    )


class _Tally:
    """Counts over all chunks, for the realized rates."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, **counts: int) -> None:
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + int(value)

    def rates(self) -> dict[str, float]:
        c = self.counts
        register = max(c["register"], 1)
        return {
            "assessed": c["assessed"] / register,
            "enrolled_of_eligible": c["enrolled_eligible"] / max(c["eligible"], 1),
            "ineligible_of_enrolled": c["enrolled_ineligible"] / max(c["enrolled"], 1),
            "eligible": c["eligible"] / register,
            **{f"coverage_{a}": c[f"known_{a}"] / register for a in AGENCIES},
        }


def synthesize_vertical(
    out: str | Path,
    households: int = 20000,
    seed: int = 0,
    rounds: int = 10,
    epsilon: float = 3.0,
    budget: float = 10.0,
    progress: Progress | None = None,
    chunk_size: int = CHUNK,
) -> VerticalSynthResult:
    """Write the vertical population into ``out`` (layout and rates: the module docstring).

    Parameters
    ----------
    out
        Folder to write into (created if needed); writes ``federation.toml``, ``AGENCY.csv`` per
        agency, ``test.csv``, ``rosters/NAME.csv`` and ``truth/`` (households, bad_ids, duplicates,
        summary.json).
    households
        Size of the whole population, 20% of it held out in ``test.csv`` (default 20,000).
    seed
        Everything is a function of the seed (and not of the machine).
    rounds, epsilon, budget
        Written into the spec.
    progress
        Called with (households done, households) after each chunk.
    chunk_size
        Households generated at a time (default 200,000): bounds memory. The files depend on it (each
        chunk has its own generator), so keep the default to reproduce a population.

    Raises
    ------
    ValueError
        If ``households`` is below 200 or ``chunk_size`` below 1.
    """
    if households < 200:
        raise ValueError(f"households must be at least 200 (got {households!r})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 (got {chunk_size!r})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sink, ids, tally = _CsvSink(), HeadIds(), _Tally()
    bad: list[pd.DataFrame] = []
    duplicates: list[pd.DataFrame] = []
    try:
        for index, start in enumerate(range(0, households, chunk_size)):
            chunk = _Chunk(min(chunk_size, households - start), seed, index, ids)
            for agency in AGENCIES:
                _write_agency(chunk, agency, out, sink, bad)
            _write_rosters(chunk, out, sink, duplicates)
            _write_test(chunk, out, sink)
            _write_truth(chunk, out, sink)
            register = ~chunk.test
            tally.add(
                register=register.sum(),
                test=chunk.test.sum(),
                assessed=chunk.assessed.sum(),
                eligible=(register & chunk.truth).sum(),
                enrolled=chunk.enrolled.sum(),
                enrolled_eligible=(chunk.enrolled & chunk.truth).sum(),
                enrolled_ineligible=(chunk.enrolled & ~chunk.truth).sum(),
                special_hardship=chunk.special.sum(),
                **{f"known_{a}": (register & chunk.known[a]).sum() for a in AGENCIES},
            )
            if progress is not None:
                progress(start + len(chunk.ids), households)
    finally:
        sink.close()
    truth = out / "truth"
    pd.concat(bad, ignore_index=True).to_csv(truth / "bad_ids.csv", index=False)
    planted = pd.concat(duplicates, ignore_index=True)
    planted.to_csv(truth / "duplicates.csv", index=False)
    rates = tally.rates()
    summary: dict[str, Any] = {
        "seed": seed,
        "households": households,
        "counts": tally.counts | {"bad_ids": sum(len(b) for b in bad), "duplicates": len(planted)},
        "rates": rates,
        "targets": {k: list(v) for k, v in TARGETS.items()} | {"mistyped": MISTYPED},
    }
    (truth / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    spec = out / "federation.toml"
    spec.write_text(vertical_spec_text(seed, rounds=rounds, epsilon=epsilon, budget=budget))
    rows = {path.stem if path.parent == out else f"{path.parent.name}/{path.stem}": n for path, n in sink.rows.items()}
    return VerticalSynthResult(
        spec=spec,
        test=out / "test.csv",
        agency_files={a: out / f"{a}.csv" for a in AGENCIES},
        rosters={name: out / "rosters" / f"{name}.csv" for name in ROSTERS},
        truth=truth,
        rows=rows,
        rates=rates,
    )
