"""The ``agencyfl`` command: one typer app, grouped by role (one module per group).

Every reporting command takes ``--format json``; errors are one line on stderr with a documented
exit code (``agencyfl.exit_codes``), never a traceback.
"""

from __future__ import annotations

import sys

from agencyfl.cli import (  # noqa: F401 (registers commands)
    alignment,
    audit,
    coordinator,
    data,
    demo,
    scoring,
    screening,
    steward,
    training,
)
from agencyfl.cli.common import Format, FormatOpt, app, emit_json, err, out
from agencyfl.exit_codes import HELP

__all__ = ["app", "main"]


@app.command("exit-codes")
def exit_codes(fmt: FormatOpt = Format.table) -> None:
    """List the exit codes and what each means."""
    if fmt is Format.json:
        emit_json({int(code): text for code, text in HELP.items()})
        return
    for code, text in HELP.items():
        out.print(f"{int(code)}  {code.name:<18} {text}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
