"""`agencyfl data`: synthetic populations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
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


# ---------------------------------------------------------------- data
@data_app.command("synth")
def synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the files into")],
    households: Annotated[int, typer.Option(help="Population size (20% held out as test.csv)")] = 20000,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    dirty_rows: Annotated[int, typer.Option(help="Malformed rows added to each agency file")] = 0,
    rounds: Annotated[int, typer.Option(help="Rounds written into the spec")] = 10,
    epsilon: Annotated[float, typer.Option(help="Per-job epsilon written into the spec")] = 3.0,
    fmt: FormatOpt = Format.table,
) -> None:
    """Write a seeded synthetic population: four agency files, test.csv and federation.toml."""
    from agencyfl.synth import synthesize

    if households < 200:
        err.print(f"error: --households must be at least 200 (got {households})")
        raise typer.Exit(int(ExitCode.USAGE))
    result = synthesize(
        out_dir, households=households, seed=seed, dirty_rows=dirty_rows, rounds=rounds, epsilon=epsilon
    )
    files = {**{k: str(v) for k, v in result.agency_files.items()}, "test": str(result.test)}
    if fmt is Format.json:
        emit_json({"spec": str(result.spec), "files": files, "rows": result.rows, "label_rates": result.label_rates})
        return
    table = Table("file", "rows", "eligible share", title=f"synthetic population (seed {seed})")
    for name, path in files.items():
        table.add_row(one_line(path), str(result.rows[name]), f"{result.label_rates[name]:.1%}")
    out.print(table)
    out.print(f"spec: {one_line(result.spec)}")
