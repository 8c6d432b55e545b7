"""`agencyfl screen eligible`, `agencyfl screen record-outcome`, `agencyfl audit uses`: policy finds people.

Worklists for caseworkers from encrypted cross-agency scores (``docs/screening.md``); no command here
changes an enrolment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from agencyfl.cli.common import Format, FormatOpt, audit_app, emit_json, errors_to_exit, fail, out, screen_app
from agencyfl.exit_codes import FINDING_CODES, HELP, ExitCode

CATEGORY_TEXT = {
    "invite": "likely eligible, not enrolled: invite to apply or visit (漏保)",
    "review-enrolment": "enrolled, likely ineligible: review with the household, who may respond (错保)",
    "human-review": "near the threshold: a caseworker looks at the case",
}


def _spec_of(workdir: Path, spec: Path | None) -> Path:
    from agencyfl.vertical.encoding import WORKDIR_SPEC  # not vertical.job: it loads the training side

    if spec is not None:
        return spec
    recorded = workdir / WORKDIR_SPEC
    try:
        return Path(json.loads(recorded.read_text())["spec"])
    except (OSError, ValueError, KeyError):
        fail(f"{str(workdir)!r} records no spec (run `agencyfl run` there first, or give --spec)", ExitCode.USAGE)


@screen_app.command("eligible")
def eligible(
    workdir: Annotated[Path, typer.Option("--workdir", help="The parties' folders (from `agencyfl run`)")],
    model: Annotated[Path, typer.Option("--model", help="The registered vertical model (WORKDIR/registry/...)")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where the worklists go (files created 0600)")],
    token: Annotated[
        str | None, typer.Option("--token", envvar="AGENCYFL_TOKEN", help="Token issued for the purpose")
    ] = None,
    tokens: Annotated[
        Path | None,
        typer.Option("--tokens", help="The coordinator's token file (default WORKDIR/coordinator/tokens.json)"),
    ] = None,
    purpose: Annotated[str | None, typer.Option("--purpose", help="Default: the model card's purpose")] = None,
    since: Annotated[
        Path | None, typer.Option("--since", help="A previous worklist.csv: mark new, changed, left")
    ] = None,
    review_band: Annotated[
        float, typer.Option("--review-band", min=0.0, max=0.5, help="Scores within cutoff +- band go to human review")
    ] = 0.1,
    spec: Annotated[Path | None, typer.Option("--spec", help="Default: the spec `agencyfl run` used here")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Score every household of civil affairs' register under encryption and write worklists for caseworkers.

    Only civil affairs decrypts the scores; the coordinator adds ciphertexts it cannot open. The lists ask
    people to invite, review or look again: nothing changes an enrolment.
    """
    from agencyfl.alignment.runs import load_vertical
    from agencyfl.screening.run import screen_eligible

    with errors_to_exit():
        loaded = load_vertical(_spec_of(workdir, spec))
        if fmt is Format.table:
            with out.status("screening", spinner="dots") as status:
                result = screen_eligible(
                    loaded, workdir, model, out_dir, token=token or "", purpose=purpose, tokens_path=tokens,
                    since=since, review_band=review_band, progress=lambda text: status.update(text),
                )  # fmt: skip
        else:
            result = screen_eligible(
                loaded, workdir, model, out_dir, token=token or "", purpose=purpose, tokens_path=tokens,
                since=since, review_band=review_band,
            )  # fmt: skip
    report = {k: v for k, v in result.report.items() if k not in {"groups", "left", "labels"}}
    report["left"] = len(result.report["left"])
    if fmt is Format.json:
        emit_json(report)
        return
    table = Table(
        "list", "households", "what it asks", title=f"screening {report['screening']} ({report['model_version']})"
    )
    for category, count in report["counts"].items():
        table.add_row(category, f"{count:,}", CATEGORY_TEXT[category])
    out.print(table)
    out.print(f"{report['households_scored']:,} households scored; only civil affairs saw the scores")
    if report["since"]:
        ch = report["since"]["changes"]
        out.print(f"since {report['since']['screening']}: {ch['new']} new, {ch['changed']} changed, "
                  f"{ch['unchanged']} unchanged, {report['left']} left the lists")  # fmt: skip
    for name, reason in report["explain_refused"].items():
        out.print(f"[yellow]{name} gave no reasons[/]: {reason}")
    out.print(f"worklists: {report['files']['worklist_html']} and {report['files']['worklist_csv']}")
    out.print("nothing was changed: caseworkers decide, and households are heard before any change")


@screen_app.command("record-outcome")
def record_outcome(
    workdir: Annotated[Path, typer.Option("--workdir", help="The parties' folders")],
    household: Annotated[str, typer.Option("--household", help="The household head's resident identity number")],
    outcome: Annotated[
        str,
        typer.Option(
            "--outcome",
            help="confirmed-invited, confirmed-enrolled, not-eligible, disagreed or not-reached",
        ),
    ],
    screening: Annotated[str, typer.Option("--screening", help="The screening whose list it was on")] = "",
    by: Annotated[str, typer.Option("--by", help="Who reviewed (a caseworker's name or id)")] = "",
    note: Annotated[str, typer.Option("--note", help="A short note")] = "",
    spec: Annotated[Path | None, typer.Option("--spec", help="Default: the spec `agencyfl run` used here")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Record what a caseworker found for a listed household (kept at civil affairs; changes no enrolment)."""
    from agencyfl.alignment.runs import load_vertical
    from agencyfl.screening.outcomes import record_outcome as record

    with errors_to_exit():
        loaded = load_vertical(_spec_of(workdir, spec))
        row = record(workdir, loaded.spec.label_agency.name, household, outcome, screening, by, note)
    if fmt is Format.json:
        emit_json(row)
        return
    out.print(f"recorded {row['outcome']} for {row['household']} ({row['time']}); no enrolment was changed")


@audit_app.command("uses")
def audit_uses(
    workdir: Annotated[Path, typer.Argument(help="The parties' folders: every WORKDIR/<party>/uses-ledger")],
    keyring: Annotated[
        Path | None, typer.Option("--keyring", help="Verify each party's ledger with its key here")
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Every use of every model: screenings, contributions, disclosures and refusals, each ledger verified.

    The coordinator's entries must each commit to the requester's entry (exit 14 when one does not).
    """
    from agencyfl.screening.audit import audit_uses as run_audit

    with errors_to_exit():
        result = run_audit(workdir, keyring)
    code = FINDING_CODES[result.worst] if result.worst else ExitCode.OK
    if fmt is Format.json:
        emit_json({**result.as_json(), "exit_code": int(code)})
        raise typer.Exit(int(code))
    table = Table("time", "party", "kind", "screening", "model", "purpose", "households", "detail", title="model uses")
    for party, use in result.uses:
        detail = (use.level or "") + (f" {use.reason}" if use.reason else "") + (f" {use.counts}" if use.counts else "")
        table.add_row(
            use.time, party, use.kind, use.screening, use.model_version, use.purpose, f"{use.households:,}", detail
        )
    out.print(table)
    for party, finding in result.findings:
        out.print(f"[red]{party}: {finding.kind}[/]: {finding.message}")
    out.print(
        "[green]every uses ledger verifies[/]" if code is ExitCode.OK else f"[red]exit {int(code)}: {HELP[code]}[/]"
    )
    raise typer.Exit(int(code))
