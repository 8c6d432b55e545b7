"""`agencyfl align`, `agencyfl screen duplicates`, `agencyfl alignment purge`: private alignment on one machine.

Every party's side runs the protocol of ``docs/alignment.md`` (its own keys, sealed messages through
the relay); each keeps only its own output in its own folder (``agencyfl.alignment.runs``).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from agencyfl.cli.common import (
    Format,
    FormatOpt,
    alignment_app,
    app,
    audit_app,
    emit_json,
    errors_to_exit,
    fail,
    out,
    screen_app,
)
from agencyfl.exit_codes import FINDING_CODES, HELP, ExitCode

SpecOpt = Annotated[Path, typer.Option("--spec", help="The vertical federation spec (federation.toml)")]
RequesterOpt = Annotated[str, typer.Option("--requested-by", help="Who asks for the run (recorded in the chain)")]


@app.command("align")
def align(
    spec: SpecOpt,
    workdir: Annotated[Path, typer.Option("--workdir", help="Parties' folders (WORKDIR/<party>/alignment/)")],
    requested_by: RequesterOpt = "coordinator",
    fmt: FormatOpt = Format.table,
) -> None:
    """Find the households the agencies share, without showing anyone another agency's list.

    Civil affairs aligns its whole register; each other agency learns the register positions of its
    own households; civil affairs learns set sizes only; the coordinator relays sealed messages.
    """
    from agencyfl.alignment.runs import align_from_spec, load_vertical

    with errors_to_exit():
        loaded = load_vertical(spec)
        with out.status("aligning (blinding on every core)", spinner="dots") if fmt is Format.table else nullcontext():
            result, event = align_from_spec(loaded, workdir, requested_by=requested_by)
    agencies = {
        name: {"rows": len(a.rows), "matched": a.matched, "quarantined": len(a.quarantine),
               "output": str(workdir / name / "alignment")}
        for name, a in result.agencies.items()
    }  # fmt: skip
    report = {
        "run": event.run,
        "register": {"holder": result.view.holder, "size": result.view.register_size,
                     "quarantined": result.view.quarantined},
        "agencies": agencies,
        "multiplications": result.multiplications,
        "bytes_relayed": result.bytes_sent,
        "expires": event.expires,
    }  # fmt: skip
    if fmt is Format.json:
        emit_json(report)
        return
    table = Table("agency", "valid rows", "in the register", "quarantined", title=f"alignment {event.run}")
    for name, row in agencies.items():
        table.add_row(name, f"{row['rows']:,}", f"{row['matched']:,}", f"{row['quarantined']:,}")
    out.print(table)
    out.print(
        f"register of {result.view.holder}: {result.view.register_size:,} households "
        f"({result.view.quarantined} quarantined); {result.bytes_sent / 1e6:.1f} MB relayed, sealed; "
        f"outputs kept until {event.expires} (`agencyfl alignment purge`)"
    )


@screen_app.command("duplicates")
def duplicates(
    spec: SpecOpt,
    roster: Annotated[list[str], typer.Option("--roster", help="NAME=FILE, one per roster (at least two)")],
    out_dir: Annotated[Path, typer.Option("--out", help="Owners' folders (OUT/<owner>/duplicates/<roster>/)")],
    requested_by: RequesterOpt = "coordinator",
    purpose: Annotated[str, typer.Option(help="Why the check runs (recorded)")] = "duplicate-coverage-review",
    fmt: FormatOpt = Format.table,
) -> None:
    """Find households enrolled in two rosters that exclude each other (重复保): a review list per owner.

    Each roster owner learns only which of its own households are on a conflicting roster, and which;
    nothing is removed: caseworkers review.
    """
    from agencyfl.alignment.runs import duplicates_from_spec, load_vertical

    rosters: dict[str, Path] = {}
    for item in roster:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            fail(f"--roster takes NAME=FILE, got {item!r}", ExitCode.USAGE)
        rosters[name] = Path(file)
    with errors_to_exit():
        loaded = load_vertical(spec)
        with out.status("checking rosters", spinner="dots") if fmt is Format.table else nullcontext():
            result, event = duplicates_from_spec(loaded, rosters, out_dir, requested_by=requested_by, purpose=purpose)
    owners = {name: loaded.spec.roster(name).owner for name in rosters}
    per_roster = {
        name: {"owner": owners[name], "for_review": len(result.review[name]),
               "quarantined": len(result.quarantine[name]), "output": str(out_dir / owners[name] / "duplicates" / name)}
        for name in rosters
    }  # fmt: skip
    report = {
        "run": event.run,
        "pairs": [list(p) for p in result.pairs],
        "rosters": per_roster,
        "bytes_relayed": result.bytes_sent,
        "expires": event.expires,
    }  # fmt: skip
    if fmt is Format.json:
        emit_json(report)
        return
    table = Table("roster", "owner", "for review", "quarantined", title=f"duplicate check {event.run}")
    for name, row in per_roster.items():
        table.add_row(name, owners[name], f"{row['for_review']:,}", f"{row['quarantined']:,}")
    out.print(table)
    out.print("each owner's review list is in its own folder; nothing was removed: caseworkers decide")


@alignment_app.command("purge")
def purge(
    workdir: Annotated[Path, typer.Option("--workdir", help="The folder given to align or screen duplicates")],
    everything: Annotated[bool, typer.Option("--all", help="Remove all outputs, not only expired ones")] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Remove alignment outputs whose retention (the spec's retention_days) has ended."""
    from agencyfl.alignment.runs import purge_expired

    with errors_to_exit():
        removed = purge_expired(workdir, everything=everything)
    if fmt is Format.json:
        emit_json({"removed": [str(p) for p in removed]})
        return
    for path in removed:
        out.print(f"removed {path}")
    out.print(f"{len(removed)} alignment output folder(s) removed")


@audit_app.command("runs")
def audit_runs(
    chain: Annotated[Path, typer.Argument(help="The coordinator's runs chain (WORKDIR/coordinator/runs-ledger)")],
    keyring: Annotated[
        Path | None, typer.Option("--keyring", help="Verify with the keyring's 'coordinator' key, not the folder's")
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Every alignment and duplicate-check run the coordinator recorded: who asked, why, and the counts.

    Verifies the signed chain first (exit 5, 11, 12, 13 or 18 as `audit verify` does).
    """
    from agencyfl.alignment.runs import ProtocolRun
    from agencyfl.privacy.keys import keyring_key
    from agencyfl.privacy.ledger import FINDING_ORDER, verify_ledger

    with errors_to_exit():
        key = keyring_key(keyring, "coordinator") if keyring else None
        if keyring and key is None:
            fail(f"the keyring {str(keyring)!r} holds no 'coordinator' key", ExitCode.USAGE)
        check = verify_ledger(chain, key, ProtocolRun)
    kinds = {f.kind for f in check.findings}
    worst = next((k for k in FINDING_ORDER if k in kinds), None)
    code = FINDING_CODES[worst] if worst else ExitCode.OK
    if fmt is Format.json:
        emit_json(
            {"verified": check.ok, "key": check.key_id, "findings": [{"kind": f.kind, "message": f.message}
             for f in check.findings], "runs": [e.model_dump() for e in check.events], "exit_code": int(code)}
        )  # fmt: skip
        raise typer.Exit(int(code))
    table = Table("time", "kind", "run", "requested by", "purpose", "parties", "rows in", title="recorded runs")
    for e in check.events:
        rows = sum(e.sizes.values())
        table.add_row(e.time, e.kind, e.run, e.requested_by, e.purpose, ", ".join(e.parties), f"{rows:,}")
    out.print(table)
    for f in check.findings:
        out.print(f"[red]{f.kind}[/]: {f.message}")
    out.print("[green]the chain verifies[/]" if code is ExitCode.OK else f"[red]exit {int(code)}: {HELP[code]}[/]")
    raise typer.Exit(int(code))
