"""What every command module shares: the typer apps, consoles, output format and error mapping."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console

from agencyfl.exit_codes import exit_code_for
from federation.errors import AgencyflError

app = typer.Typer(
    help="Privacy-preserving federated learning across agencies.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Data utilities (synthetic populations).", no_args_is_help=True)
steward_app = typer.Typer(help="Commands for an agency's data steward.", no_args_is_help=True)
audit_app = typer.Typer(help="Commands for auditors.", no_args_is_help=True)
coordinator_app = typer.Typer(help="Commands for the coordinator.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(steward_app, name="steward")
app.add_typer(audit_app, name="audit")
app.add_typer(coordinator_app, name="coordinator")

# Wide enough for the report tables when output goes to a file or a pipe (rich assumes 80 there).
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


class Format(StrEnum):
    """Output format of reporting commands."""

    table = "table"
    json = "json"


FormatOpt = Annotated[Format, typer.Option("--format", help="table (for people) or json (for scripts)")]


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Domain errors become one line on stderr and their exit code."""
    try:
        yield
    except AgencyflError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(int(exit_code_for(exc))) from None
