"""`agencyfl audit`: commands for auditors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from agencyfl.cli.common import (
    Format,
    FormatOpt,
    audit_app,
    emit_json,
    out,
)
from agencyfl.exit_codes import HELP, ExitCode


# ---------------------------------------------------------------- audit
def audit_rows(ledgers: list[Path]) -> list[Any]:
    from privacy.audit import audit_ledger

    return [audit_ledger(path) for path in ledgers]


def audit_dict(row: Any) -> dict[str, Any]:
    return {**{k: v for k, v in vars(row).items()}, "verified": row.verified, "within_budget": row.within_budget}


@audit_app.command("report")
def audit_report(
    ledgers: Annotated[list[Path], typer.Argument(help="Agency ledger folders", metavar="LEDGER_DIR...")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Verify ledgers and report each agency's spend against its caps (exit 0 only if all is well)."""
    rows = audit_rows(ledgers)
    code = ExitCode.OK
    if any(not r.verified for r in rows):
        code = ExitCode.LEDGER_UNVERIFIED
    elif any(not r.within_budget for r in rows):
        code = ExitCode.BUDGET_EXCEEDED
    if fmt is Format.json:
        emit_json({"ok": code is ExitCode.OK, "exit_code": int(code), "agencies": [audit_dict(r) for r in rows]})
    else:
        table = Table(
            "agency",
            "epsilon last job",
            "epsilon lifetime (RDP) / cap",
            "lifetime (PRV)",
            "delta",
            "rounds (last job/all)",
            "refusals",
            "last entry",
            "chain",
            "signatures",
            title="privacy budget audit",
        )
        for r in rows:
            cap = f"{r.budget:g}" if r.budget is not None else "-"
            table.add_row(
                r.agency,
                f"{r.epsilon_last_job:.3f}",
                f"{r.epsilon_lifetime:.3f} / {cap}",
                f"{r.epsilon_lifetime_prv:.3f}",
                f"{r.delta:g}" if r.delta else "-",
                f"{r.rounds_last_job}/{r.rounds_total}",
                str(r.refusals),
                r.last_entry or "-",
                "[green]ok[/]" if r.chain_ok and r.head_ok else "[red]BROKEN[/]",
                "[green]ok[/]" if r.signatures_ok else "[red]BAD[/]",
            )
        out.print(table)
        out.print("Caps are enforced with RDP (the larger, safe-side bound); PRV is the tighter estimate.")
        for r in rows:
            for problem in r.problems:
                out.print(f"[red]{r.agency}: {problem}[/]")
            for problem in r.overspend:
                out.print(f"[red]{r.agency}: {problem}[/]")
            if r.budget is not None and r.epsilon_lifetime > r.budget:
                out.print(
                    f"[red]{r.agency}: lifetime epsilon {r.epsilon_lifetime:.3f} exceeds the budget {r.budget:g}[/]"
                )
        verdict = "all ledgers verified, no cap exceeded" if code is ExitCode.OK else HELP[code]
        out.print(("[green]" if code is ExitCode.OK else "[red]") + verdict + "[/]")
    raise typer.Exit(int(code))
