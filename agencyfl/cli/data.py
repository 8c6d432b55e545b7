"""`agencyfl data`: synthetic populations."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agencyfl.cli.common import (
    Format,
    FormatOpt,
    data_app,
    emit_json,
    err,
    one_line,
    out,
)
from agencyfl.exit_codes import ExitCode


class Topology(StrEnum):
    """Which synthetic federation ``data synth`` writes."""

    horizontal = "horizontal"
    vertical = "vertical"


# ---------------------------------------------------------------- data
@data_app.command("synth")
def synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the files into")],
    households: Annotated[int, typer.Option(help="Population size (20% held out as test.csv)")] = 20000,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    dirty_rows: Annotated[int, typer.Option(help="Malformed rows added to each agency file")] = 0,
    rounds: Annotated[int, typer.Option(help="Rounds written into the spec")] = 10,
    epsilon: Annotated[float, typer.Option(help="Per-job epsilon written into the spec")] = 3.0,
    topology: Annotated[
        Topology | None,
        typer.Option(
            help=(
                "vertical: four agencies holding different columns of the same households, keyed by resident "
                "id, with benefit rosters and truth/; horizontal: three regional civil-affairs bureaus holding "
                "the same columns of different households. Without it: four agencies of different kinds, "
                "each with the households it has cases for"
            )
        ),
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Write a seeded synthetic population: agency files, test.csv and federation.toml."""
    if households < 200:
        err.print(f"error: --households must be at least 200 (got {households})")
        raise typer.Exit(int(ExitCode.USAGE))
    if topology is Topology.vertical:
        if dirty_rows:
            err.print(
                "error: --dirty-rows does not apply to --topology vertical, which plants its own mistyped ids "
                "(truth/bad_ids.csv)"
            )
            raise typer.Exit(int(ExitCode.USAGE))
        _synth_vertical(out_dir, households, seed, rounds, epsilon, fmt)
        return
    from agencyfl.synth import synthesize, synthesize_regional

    make = synthesize_regional if topology is Topology.horizontal else synthesize
    result = make(out_dir, households=households, seed=seed, dirty_rows=dirty_rows, rounds=rounds, epsilon=epsilon)
    files = {**{k: str(v) for k, v in result.agency_files.items()}, "test": str(result.test)}
    if fmt is Format.json:
        emit_json({"spec": str(result.spec), "files": files, "rows": result.rows, "label_rates": result.label_rates})
        return
    table = Table("file", "rows", "eligible share", title=f"synthetic population (seed {seed})")
    for name, path in files.items():
        table.add_row(one_line(path), str(result.rows[name]), f"{result.label_rates[name]:.1%}")
    out.print(table)
    out.print(f"spec: {one_line(result.spec)}")


def _synth_vertical(out_dir: Path, households: int, seed: int, rounds: int, epsilon: float, fmt: Format) -> None:
    from agencyfl.synth_vertical import TARGETS, synthesize_vertical

    columns = (TextColumn("households"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"))
    with Progress(*columns, TimeElapsedColumn(), console=err, transient=True, disable=fmt is Format.json) as bar:
        task = bar.add_task("synth", total=households)
        result = synthesize_vertical(
            out_dir,
            households=households,
            seed=seed,
            rounds=rounds,
            epsilon=epsilon,
            progress=lambda done, _total: bar.update(task, completed=done),
        )
    files = {
        **{k: str(v) for k, v in result.agency_files.items()},
        "test": str(result.test),
        **{f"rosters/{k}": str(v) for k, v in result.rosters.items()},
    }
    if fmt is Format.json:
        emit_json(
            {
                "topology": "vertical",
                "spec": str(result.spec),
                "files": files,
                "truth": str(result.truth),
                "rows": result.rows,
                "rates": result.rates,
            }
        )
        return
    table = Table("file", "rows", title=f"vertical synthetic population (seed {seed})")
    for name, path in files.items():
        table.add_row(one_line(path), str(result.rows[name]))
    out.print(table)
    rates = Table("rate", "realized", "stated", title="who knows what")
    for name, value in result.rates.items():
        low, high = TARGETS.get(name, (float("nan"), float("nan")))
        stated = "" if low != low else (f"~{low:.0%}" if low == high else f"{low:.0%}-{high:.0%}")
        rates.add_row(name.replace("_", " "), f"{value:.1%}", stated)
    out.print(rates)
    out.print(f"spec: {one_line(result.spec)}")
    out.print(f"truth (benchmarks and tests only): {one_line(result.truth)}")
