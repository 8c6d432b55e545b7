"""What every command module shares: the typer apps, consoles, output format and error mapping."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated, Any, NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from agencyfl.exit_codes import ExitCode, exit_code_for
from agencyfl.federation.errors import AgencyflError

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


def one_line(text: object) -> str:
    """``text`` as one line of plain text for the console: newlines folded, Rich markup escaped.

    Messages quote what users typed (agency names, paths, spec values, pattern errors such as
    ``[a-z0-9-]``); unescaped, Rich would read them as markup and garble or crash on them.
    """
    return escape(" ".join(str(text).split()))


def fail(message: object, code: ExitCode) -> NoReturn:
    """Print ``error: message`` (one line, escaped) on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {one_line(message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(int(code))


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Domain errors become one line on stderr and their exit code; so do file-system errors.

    A NUL byte in a path is a wrong command line (2). Anything else is a bug: one line and exit 1
    (``AGENCYFL_DEBUG=1`` shows the traceback).
    """
    try:
        yield
    except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort, KeyboardInterrupt):
        raise
    except AgencyflError as exc:
        fail(exc, exit_code_for(exc))
    except OSError as exc:
        where = f" {exc.filename!s}" if exc.filename else ""
        fail(f"cannot use{where}: {exc.strerror or exc.__class__.__name__}", ExitCode.DATA_UNUSABLE)
    except ValueError as exc:
        if "null byte" in str(exc) or "null character" in str(exc):
            fail("a path or value on the command line contains a NUL byte", ExitCode.USAGE)
        _internal(exc)
    except Exception as exc:
        _internal(exc)


def _internal(exc: Exception) -> NoReturn:
    if os.environ.get("AGENCYFL_DEBUG"):
        raise exc
    fail(f"internal error ({exc.__class__.__name__}: {exc}); please report it", ExitCode.INTERNAL_ERROR)


class _Guarded(TyperGroup):
    """The root command group: whatever a command raises outside ``errors_to_exit`` is mapped the same way."""

    def invoke(self, ctx: click.Context) -> Any:
        with errors_to_exit():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Guarded,
    help="Privacy-preserving federated learning across agencies.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Data utilities (synthetic populations).", no_args_is_help=True)
steward_app = typer.Typer(help="Commands for an agency's data steward.", no_args_is_help=True)
audit_app = typer.Typer(help="Commands for auditors.", no_args_is_help=True)
coordinator_app = typer.Typer(help="Commands for the coordinator.", no_args_is_help=True)
screen_app = typer.Typer(help="Screening: households for review (never an automatic change).", no_args_is_help=True)
alignment_app = typer.Typer(help="Private alignment outputs kept in parties' folders.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(screen_app, name="screen")
app.add_typer(alignment_app, name="alignment")
app.add_typer(steward_app, name="steward")
app.add_typer(audit_app, name="audit")
app.add_typer(coordinator_app, name="coordinator")
