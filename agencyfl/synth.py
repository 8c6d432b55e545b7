"""A seeded synthetic population of households, split across four agencies as real records would be.

Ground truth follows a means test in the spirit of minimum-living-allowance (dibao) rules: annual
per-capita income under the local assistance line, deposits under a multiple of it, no vehicle (unless
a member is disabled), no large property; or a special-hardship category (severe disability, chronic
illness, elderly head) with income under 1.3x the line. Verification is noisy: some eligible
households are recorded as not eligible (missed) and some the other way round, and declared income is
under-reported by some households.

Each agency holds the households it has cases for (non-IID sub-populations, different sizes and label
rates, some households in several agencies) and only the fields it would know; the rest are empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

AGENCIES = ("civil-affairs", "hrss", "tax", "environment")
EMPLOYMENT = ["employed", "unemployed", "retired", "student", "unable"]
HOUSING = ["owned", "rented", "public", "none"]
ALWAYS = ["household_id", "region_type", "assistance_line", "eligible"]

# Fields each agency records (besides ALWAYS).
KNOWN: dict[str, list[str]] = {
    "civil-affairs": [
        "household_size",
        "children",
        "elderly",
        "head_age",
        "disability",
        "chronic_illness",
        "head_employment",
        "per_capita_income",
        "deposits",
        "vehicle",
        "housing",
    ],
    "hrss": [
        "household_size",
        "head_age",
        "head_employment",
        "months_unemployed",
        "pension_monthly",
        "per_capita_income",
    ],
    "tax": [
        "household_size",
        "head_age",
        "per_capita_income",
        "deposits",
        "assets",
        "vehicle",
        "housing",
    ],
    "environment": [
        "household_size",
        "children",
        "elderly",
        "head_age",
        "housing",
        "pollution_index",
    ],
}

SPEC_TEMPLATE = """\
# Federation spec written by `agencyfl data synth` (seed {seed}).
[federation]
name = "minimum-living-allowance"
topology = "horizontal"
purpose = "eligibility-identification"

[schema]
id = "household_id"
label = "eligible"

[[schema.features]]
name = "region_type"
type = "categorical"
categories = ["urban", "rural"]
label = "urban or rural household registration"

[[schema.features]]
name = "assistance_line"
type = "numeric"
min = 3000
max = 30000
label = "local assistance line (yuan per person per year)"

[[schema.features]]
name = "household_size"
type = "numeric"
min = 1
max = 12
nullable = true
label = "household size"

[[schema.features]]
name = "children"
type = "numeric"
min = 0
max = 10
nullable = true
label = "children under 16"

[[schema.features]]
name = "elderly"
type = "numeric"
min = 0
max = 6
nullable = true
label = "members aged 65 or over"

[[schema.features]]
name = "head_age"
type = "numeric"
min = 16
max = 105
nullable = true
label = "age of the household head"

[[schema.features]]
name = "disability"
type = "boolean"
nullable = true
label = "a member with a registered disability"

[[schema.features]]
name = "chronic_illness"
type = "boolean"
nullable = true
label = "a member with a serious chronic illness"

[[schema.features]]
name = "head_employment"
type = "categorical"
categories = ["employed", "unemployed", "retired", "student", "unable"]
nullable = true
label = "employment of the household head"

[[schema.features]]
name = "months_unemployed"
type = "numeric"
min = 0
max = 240
nullable = true
label = "months the head has been unemployed"

[[schema.features]]
name = "pension_monthly"
type = "numeric"
min = 0
max = 30000
transform = "log"
nullable = true
label = "household pension income (yuan per month)"

[[schema.features]]
name = "per_capita_income"
type = "numeric"
min = 0
max = 500000
transform = "log"
nullable = true
label = "income per person (yuan per year)"

[[schema.features]]
name = "deposits"
type = "numeric"
min = 0
max = 10000000
transform = "log"
nullable = true
label = "bank deposits (yuan)"

[[schema.features]]
name = "assets"
type = "numeric"
min = 0
max = 50000000
transform = "log"
nullable = true
label = "property assets (yuan)"

[[schema.features]]
name = "vehicle"
type = "boolean"
nullable = true
label = "owns a vehicle"

[[schema.features]]
name = "housing"
type = "categorical"
categories = ["owned", "rented", "public", "none"]
nullable = true
label = "housing situation"

[[schema.features]]
name = "pollution_index"
type = "numeric"
min = 0
max = 500
nullable = true
label = "air pollution index where the household lives"

[model]
kind = "logistic"

[training]
rounds = {rounds}

[privacy]
epsilon = {epsilon}
delta = 1e-5
max_grad_norm = 1.0
budget = {budget}

[fairness]
attributes = ["region_type", "disability", "head_age"]
bands = {{ head_age = [40, 65] }}
max_tpr_gap = 0.10
max_fpr_gap = 0.10

{agencies}
"""


@dataclass(frozen=True)
class SynthResult:
    """Where ``synthesize`` wrote things, and how many rows each file has."""

    spec: Path
    test: Path
    agency_files: dict[str, Path]
    rows: dict[str, int]
    label_rates: dict[str, float]


def population(households: int, seed: int, rural_income_noise: float = 0.0) -> pd.DataFrame:
    """The full (true) population: every field known, the verified label ``eligible``.

    ``rural_income_noise`` plants a recording disparity for fairness experiments: rural households'
    recorded income carries extra log-normal error of that sigma (farm income estimated, not
    documented), while their eligibility still follows their true income.
    """
    rng = np.random.default_rng(seed)
    n = households
    district = rng.integers(0, 6, n)
    rural = (district >= 4) | (rng.random(n) < 0.15)
    line = np.where(rural, rng.choice([7200, 8400, 9600], n), rng.choice([10800, 12000, 14400], n))
    size = np.clip(1 + rng.poisson(1.8, n), 1, 10)
    elderly = np.minimum(rng.binomial(size, 0.18), size)
    children = np.minimum(rng.binomial(size - elderly, 0.3), size - elderly)
    head_age = np.where(elderly > 0, rng.integers(65, 95, n), rng.integers(20, 65, n))
    disability = rng.random(n) < (0.05 + 0.06 * (elderly > 0))
    chronic = rng.random(n) < (0.08 + 0.1 * (elderly > 0))
    emp_idx = np.where(
        head_age >= 60,
        rng.choice([0, 2, 4], n, p=[0.15, 0.75, 0.10]),
        rng.choice([0, 1, 3, 4], n, p=[0.82, 0.12, 0.02, 0.04]),
    )
    emp_idx = np.where(disability & (rng.random(n) < 0.5), 4, emp_idx)
    employment = np.array(EMPLOYMENT)[emp_idx]
    months_unemployed = np.where(emp_idx == 1, np.minimum(rng.geometric(1 / 10, n), 240), 0)
    pension = np.where(emp_idx == 2, rng.lognormal(np.where(rural, 6.6, 8.1), 0.4, n), 0.0) * (1 + (elderly > 1))
    adults = np.maximum(size - children - elderly, 0)
    earners = np.where(emp_idx == 0, np.maximum(1, rng.binomial(adults, 0.6)), rng.binomial(adults, 0.4))
    wage = rng.lognormal(np.where(rural, 10.5, 11.2), 0.55, n)
    income_pc = (earners * wage + 12 * pension + rng.exponential(4000, n)) / size
    deposits = rng.lognormal(np.log(np.maximum(income_pc, 500)) + 0.4, 0.9, n)
    housing_idx = np.where(
        income_pc < line, rng.choice(4, n, p=[0.45, 0.25, 0.2, 0.1]), rng.choice(4, n, p=[0.75, 0.2, 0.04, 0.01])
    )
    housing = np.array(HOUSING)[housing_idx]
    assets = np.where(housing_idx == 0, rng.lognormal(np.log(np.maximum(income_pc, 1000)) + 2.8, 0.7, n), 0.0)
    vehicle = rng.random(n) < np.clip((income_pc / line - 0.8) * 0.3, 0.02, 0.8)
    pollution = np.clip(rng.normal(60 + 25 * district - 20 * rural, 20, n), 5, 480)

    means_test = (income_pc < line) & (deposits < line * size) & (~vehicle | disability) & (assets < 40 * line)
    hardship = (disability | chronic | (head_age >= 75)) & (income_pc < 1.3 * line) & (deposits < 1.5 * line * size)
    truth = means_test | hardship
    # Verification noise: 6% of eligible households recorded as not eligible, 1.5% the other way.
    flip = np.where(truth, rng.random(n) < 0.06, rng.random(n) < 0.015)
    label = truth ^ flip
    # Declared income: measurement noise, and 10% of households under-report by a third.
    declared = income_pc * rng.lognormal(0, 0.1, n) * np.where(rng.random(n) < 0.1, 0.67, 1.0)
    if rural_income_noise > 0:  # drawn last: without it the population is exactly as before
        declared = declared * np.where(rural, rng.lognormal(0, rural_income_noise, n), 1.0)

    return pd.DataFrame(
        {
            "household_id": [f"H{seed:03d}{i:07d}" for i in range(n)],
            "region_type": np.where(rural, "rural", "urban"),
            "assistance_line": line,
            "household_size": size,
            "children": children,
            "elderly": elderly,
            "head_age": head_age,
            "disability": disability,
            "chronic_illness": chronic,
            "head_employment": employment,
            "months_unemployed": months_unemployed,
            "pension_monthly": np.round(pension, 0),
            "per_capita_income": np.round(np.clip(declared, 0, 500000), 0),
            "deposits": np.round(np.clip(deposits, 0, 1e7), 0),
            "assets": np.round(np.clip(assets, 0, 5e7), -2),
            "vehicle": vehicle,
            "housing": housing,
            "pollution_index": np.round(pollution, 1),
            "eligible": label.astype(int),
            "_district": district,
            "_truth": truth,
        }
    )


def _membership(pop: pd.DataFrame, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ratio = pop["per_capita_income"].to_numpy() / pop["assistance_line"].to_numpy()
    n = len(pop)
    emp = pop["head_employment"].to_numpy()
    return {
        # Civil affairs holds applicants: mostly low-income and hardship households.
        "civil-affairs": rng.random(n) < np.where(ratio < 1.5, 0.55, 0.04) + 0.2 * pop["disability"].to_numpy(),
        # Human resources and social security: the insured, the registered unemployed, pensioners.
        "hrss": rng.random(n) < np.where(np.isin(emp, ["employed", "unemployed", "retired"]), 0.35, 0.05),
        # Tax: households with taxable income or property, rarely the poorest.
        "tax": rng.random(n) < np.where(ratio > 1.2, 0.45, 0.08),
        # Environment: households in the three monitored districts.
        "environment": (pop["_district"].to_numpy() >= 3) & (rng.random(n) < 0.3),
    }


def _agency_view(pop: pd.DataFrame, agency: str, rng: np.random.Generator) -> pd.DataFrame:
    columns = [c for c in pop.columns if not c.startswith("_")]
    view = pop[columns].astype("object").copy()
    for column in columns:
        if column in ALWAYS:
            continue
        if column not in KNOWN[agency]:
            view[column] = ""
        else:  # fields an agency knows are still sometimes unrecorded
            view.loc[rng.random(len(view)) < 0.03, column] = ""
    for column in ("disability", "chronic_illness", "vehicle"):
        view[column] = view[column].map(lambda v: "" if v == "" else ("true" if v else "false"))
    return view


def _dirty(view: pd.DataFrame, count: int, rng: np.random.Generator) -> pd.DataFrame:
    """Append ``count`` malformed rows of the kinds stewards meet, to exercise the quarantine."""
    kinds = [
        ("per_capita_income", "about 3000"),
        ("head_employment", "farmer"),
        ("household_size", "-2"),
        ("eligible", "maybe"),
        ("region_type", ""),
    ]
    rows = []
    for i in range(count):
        row = view.iloc[int(rng.integers(len(view)))].copy()
        column, value = kinds[i % len(kinds)]
        row[column] = value
        if i % 6 == 5:  # a duplicated id, values otherwise fine
            row = view.iloc[int(rng.integers(len(view)))].copy()
        else:
            row["household_id"] = f"{row['household_id']}-X{i}"
        rows.append(row)
    return pd.concat([view, pd.DataFrame(rows)], ignore_index=True) if rows else view


def synthesize(
    out: str | Path,
    households: int = 20000,
    seed: int = 0,
    dirty_rows: int = 0,
    rounds: int = 10,
    epsilon: float = 3.0,
    budget: float = 10.0,
    test_fraction: float = 0.2,
    rural_income_noise: float = 0.0,
    test_views: bool = False,
) -> SynthResult:
    """Write four agency files, a held-out ``test.csv`` and ``federation.toml`` into ``out``.

    Parameters
    ----------
    out
        Folder to write into (created if needed).
    households
        Size of the whole population; ``test_fraction`` of it is held out and in no agency's file.
    seed
        Everything is a function of the seed.
    dirty_rows
        Malformed rows appended to each agency file (to see the quarantine at work).
    rounds, epsilon, budget
        Written into the spec.
    rural_income_noise
        A planted disparity (see ``population``); 0 plants none.
    test_views
        Also write ``test-views/AGENCY.csv``: the held-out households each agency would hold, as it
        would record them (fields it lacks empty): a held-out set from the agencies' own distribution.
    """
    if households < 200:
        raise ValueError(f"households must be at least 200 (got {households!r})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 7919)
    pop = population(households, seed, rural_income_noise)
    held_out = rng.random(len(pop)) < test_fraction
    test, pool = pop.loc[held_out], pop.loc[~held_out].reset_index(drop=True)
    member = _membership(pool, rng)

    files: dict[str, Path] = {}
    rows: dict[str, int] = {}
    rates: dict[str, float] = {}
    for agency in AGENCIES:
        view = _agency_view(pool.loc[member[agency]], agency, rng)
        view = _dirty(view, dirty_rows, rng)
        path = out / f"{agency}.csv"
        view.to_csv(path, index=False)
        files[agency] = path
        rows[agency] = len(view)
        rates[agency] = float(pool.loc[member[agency], "eligible"].mean())
    test_view = test[[c for c in test.columns if not c.startswith("_")]].copy()
    for column in ("disability", "chronic_illness", "vehicle"):
        test_view[column] = np.where(test_view[column], "true", "false")
    test_path = out / "test.csv"
    test_view.to_csv(test_path, index=False)
    rows["test"] = len(test_view)
    if test_views:  # after everything else: the same seed gives the same files with or without them
        views_rng = np.random.default_rng(seed + 104729)
        test_pool = test.reset_index(drop=True)
        test_member = _membership(test_pool, views_rng)
        (out / "test-views").mkdir(exist_ok=True)
        for agency in AGENCIES:
            view = _agency_view(test_pool.loc[test_member[agency]], agency, views_rng)
            view.to_csv(out / "test-views" / f"{agency}.csv", index=False)
    rates["test"] = float(test["eligible"].mean())

    agencies = "\n".join(f'[[agencies]]\nname = "{a}"\ndata = "{a}.csv"\n' for a in AGENCIES)
    spec = out / "federation.toml"
    spec.write_text(SPEC_TEMPLATE.format(seed=seed, rounds=rounds, epsilon=epsilon, budget=budget, agencies=agencies))
    return SynthResult(spec=spec, test=test_path, agency_files=files, rows=rows, label_rates=rates)


BUREAUS: dict[str, tuple[int, ...]] = {
    "civil-affairs-north": (0, 1),
    "civil-affairs-central": (2, 3),
    "civil-affairs-south": (4, 5),
}
"""The regional civil-affairs bureaus of ``synthesize_regional`` and the districts each serves (4, 5 are rural)."""


def synthesize_regional(
    out: str | Path,
    households: int = 20000,
    seed: int = 0,
    dirty_rows: int = 0,
    rounds: int = 10,
    epsilon: float = 3.0,
    budget: float = 10.0,
    test_fraction: float = 0.2,
) -> SynthResult:
    """A horizontal federation of three civil-affairs bureaus of one city, each serving its own districts.

    The same household model and file format as ``synthesize``; the difference is who holds the rows:
    the bureaus are of one kind, so each records the same fields (those civil affairs records, the
    others empty) about different households: the applicants (civil affairs' case files, as in
    ``synthesize``) of the districts it serves (``BUREAUS``; the south bureau serves the two rural
    counties, so its households differ from the others'). ``test.csv`` is held out from every
    bureau, as in ``synthesize``. Parameters are those of ``synthesize``.
    """
    if households < 200:
        raise ValueError(f"households must be at least 200 (got {households!r})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 7919)
    pop = population(households, seed)
    held_out = rng.random(len(pop)) < test_fraction
    test, pool = pop.loc[held_out], pop.loc[~held_out].reset_index(drop=True)
    applicant = _membership(pool, rng)["civil-affairs"]
    district = pool["_district"].to_numpy()

    files: dict[str, Path] = {}
    rows: dict[str, int] = {}
    rates: dict[str, float] = {}
    for bureau, districts in BUREAUS.items():
        member = applicant & np.isin(district, districts)
        view = _dirty(_agency_view(pool.loc[member], "civil-affairs", rng), dirty_rows, rng)
        files[bureau] = out / f"{bureau}.csv"
        view.to_csv(files[bureau], index=False)
        rows[bureau] = len(view)
        rates[bureau] = float(pool.loc[member, "eligible"].mean())
    test_view = test[[c for c in test.columns if not c.startswith("_")]].copy()
    for column in ("disability", "chronic_illness", "vehicle"):
        test_view[column] = np.where(test_view[column], "true", "false")
    test_path = out / "test.csv"
    test_view.to_csv(test_path, index=False)
    rows["test"] = len(test_view)
    rates["test"] = float(test["eligible"].mean())

    agencies = "\n".join(f'[[agencies]]\nname = "{b}"\ndata = "{b}.csv"\n' for b in BUREAUS)
    text = SPEC_TEMPLATE.format(seed=seed, rounds=rounds, epsilon=epsilon, budget=budget, agencies=agencies)
    spec = out / "federation.toml"
    spec.write_text(text.replace("`agencyfl data synth`", "`agencyfl data synth --topology horizontal`", 1))
    return SynthResult(spec=spec, test=test_path, agency_files=files, rows=rows, label_rates=rates)
