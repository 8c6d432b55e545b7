"""`agencyfl audit`: commands for auditors (report, verify, replay, keys, attack)."""

from __future__ import annotations

from contextlib import nullcontext
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from agencyfl.cli.common import (
    Format,
    FormatOpt,
    audit_app,
    emit_json,
    err,
    errors_to_exit,
    out,
)
from agencyfl.exit_codes import FINDING_CODES, HELP, ExitCode

if TYPE_CHECKING:
    from agencyfl.privacy.audit import AgencyAudit, FederationAudit

keys_app = typer.Typer(help="The auditor's keyring: public keys handed over as files.", no_args_is_help=True)
audit_app.add_typer(keys_app, name="keys")

LedgersArg = Annotated[list[Path], typer.Argument(help="Agency ledger folders", metavar="LEDGER_DIR...")]
CoordinatorOpt = Annotated[
    Path | None,
    typer.Option("--coordinator", help="The coordinator's countersigned chain (WORKDIR/coordinator/ledger)"),
]
KeyringOpt = Annotated[
    Path | None,
    typer.Option("--keyring", help="Folder of trusted public keys (NAME.pub, coordinator.pub): see `audit keys`"),
]


SpecOpt = Annotated[
    Path | None,
    typer.Option("--spec", help="The federation spec: every agency it names must have exactly one ledger"),
]
RegistryOpt = Annotated[
    Path | None,
    typer.Option("--registry", help="Registry folder: every registered model must be in the coordinator's chain"),
]


class ReportFormat(StrEnum):
    """Output format of `audit report`."""

    table = "table"
    json = "json"
    html = "html"


def audit_rows(ledgers: list[Path]) -> list[AgencyAudit]:
    """Audit each ledger against its own folder's key (the demo's quick check)."""
    from agencyfl.privacy.audit import audit_ledger

    return [audit_ledger(path) for path in ledgers]


def _federation_audit(
    ledgers: list[Path],
    coordinator: Path | None,
    keyring: Path | None,
    spec: Path | None = None,
    registry: Path | None = None,
) -> FederationAudit:
    from agencyfl.federation.spec import load_spec
    from agencyfl.privacy.audit import audit_federation
    from agencyfl.server.registry import list_models

    with errors_to_exit():
        expected = [a.name for a in load_spec(spec).spec.agencies] if spec is not None else None
        models = list_models(registry) if registry is not None else None
        return audit_federation(ledgers, coordinator, keyring, expected, models)


def _audit_json(audit: FederationAudit, code: ExitCode) -> dict[str, Any]:
    return {
        "ok": code is ExitCode.OK,
        "exit_code": int(code),
        "agencies": [r.as_dict() for r in audit.agencies],
        "coordinator": audit.coordinator.as_dict() if audit.coordinator else None,
        "cross_check": [{"party": p, **vars(f)} for p, f in audit.cross],
        "notes": audit.notes,
    }


def _independent(figures: dict[str, float] | None) -> str:
    if not figures:
        return "-"
    return f"{figures['dp_accounting_rdp']:.3f} / {figures['dp_accounting_pld']:.3f}"


def _print_findings(audit: FederationAudit) -> None:
    for party, finding in audit.all_findings():
        out.print(f"[red]{party}: {finding.kind}: {finding.message}[/]")
    for note in audit.notes:
        out.print(f"[yellow]note: {note}[/]")


# ---------------------------------------------------------------- report
@audit_app.command("report")
def audit_report(
    ledgers: LedgersArg,
    fmt: Annotated[
        ReportFormat, typer.Option("--format", help="table (people), json (scripts) or html (a file to open)")
    ] = ReportFormat.table,
    out_file: Annotated[Path | None, typer.Option("--out", help="Where --format html writes the report")] = None,
    coordinator: CoordinatorOpt = None,
    registry: Annotated[
        Path | None,
        typer.Option(
            "--registry",
            help="Registry folder: list model versions with their epsilon (each must be in the coordinator's chain)",
        ),
    ] = None,
    keyring: KeyringOpt = None,
    spec: SpecOpt = None,
    uses_dir: Annotated[
        Path | None,
        typer.Option("--uses", help="A workdir whose uses ledgers to include: every use of every model"),
    ] = None,
) -> None:
    """Verify ledgers and report each agency's spend against its caps (exit 0 only if all is well).

    With ``--uses WORKDIR`` the report also lists every use of every model (screenings, contributions,
    disclosures, refusals) from the parties' verified uses ledgers, as ``audit uses`` does.
    """
    if fmt is ReportFormat.html and out_file is None:
        err.print("[bold red]error:[/] --format html needs --out FILE")
        raise typer.Exit(int(ExitCode.USAGE))
    audit = _federation_audit(ledgers, coordinator, keyring, spec, registry)
    uses = None
    if uses_dir is not None:
        from agencyfl.screening.audit import audit_uses

        with errors_to_exit():
            uses = audit_uses(uses_dir, keyring)
    rows = audit.agencies
    worst = audit.worst()
    code = ExitCode.OK
    if worst == "overspend":
        code = ExitCode.BUDGET_EXCEEDED
    elif worst is not None:
        code = ExitCode.LEDGER_UNVERIFIED
    if code is ExitCode.OK and uses is not None and uses.worst is not None:
        code = FINDING_CODES[uses.worst]
    if fmt is ReportFormat.json:
        emit_json({**_audit_json(audit, code), **({"uses": uses.as_json()} if uses is not None else {})})
        raise typer.Exit(int(code))
    if fmt is ReportFormat.html:
        from agencyfl.report_html import render_report
        from agencyfl.server.registry import list_models

        assert out_file is not None
        models = list_models(registry) if registry else []
        used = uses.as_json() if uses is not None else None
        out_file.write_text(render_report(audit, models, int(code), HELP[code], used), encoding="utf-8")
        out.print(f"report written to {out_file} ({'all well' if code is ExitCode.OK else HELP[code]})")
        raise typer.Exit(int(code))
    table = Table(
        "agency",
        "epsilon last job",
        "epsilon lifetime (enforced) / cap",
        "lifetime (PRV)",
        "lifetime, dp_accounting RDP / PLD",
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
            _independent(r.independent.get("epsilon_lifetime")),
            f"{r.delta:g}" if r.delta else "-",
            f"{r.rounds_last_job}/{r.rounds_total}",
            str(r.refusals),
            r.last_entry or "-",
            "[green]ok[/]" if r.chain_ok and r.head_ok else "[red]BROKEN[/]",
            "[green]ok[/]" if r.signatures_ok else "[red]BAD[/]",
        )
    out.print(table)
    out.print(
        "Caps are enforced with RDP (the larger, safe-side bound); PRV is the tighter estimate. Every epsilon is "
        "recomputed from the ledgers' mechanism events by Google's dp_accounting (RDP must agree, PLD not exceed)."
    )
    _print_findings(audit)
    if uses is not None:
        use_table = Table("model", "kind", "party", "count", title="every use of every model (uses ledgers)")
        tally: dict[tuple[str, str, str], int] = {}
        for party, use in uses.uses:
            key = (use.model_version, use.kind, party)
            tally[key] = tally.get(key, 0) + 1
        for (model, kind, party), count in sorted(tally.items()):
            use_table.add_row(model, kind, party, str(count))
        out.print(use_table)
        for party, finding in uses.findings:
            out.print(f"[red]{party}: {finding.kind}: {finding.message}[/]")
    verdict = "all ledgers verified, no cap exceeded" if code is ExitCode.OK else HELP[code]
    out.print(("[green]" if code is ExitCode.OK else "[red]") + verdict + "[/]")
    raise typer.Exit(int(code))


# ---------------------------------------------------------------- verify
@audit_app.command("verify")
def audit_verify(
    ledgers: LedgersArg,
    coordinator: CoordinatorOpt = None,
    keyring: KeyringOpt = None,
    spec: SpecOpt = None,
    registry: RegistryOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Verify every chain against the keyring, bind ledgers to parties, cross-check with the coordinator.

    Exits with the code of the most serious finding: 5 altered or badly signed, 11 an entry deleted,
    12 reordered, 13 truncated, 18 a ledger absent, empty or without a head, 19 a ledger not bound to its
    party (missing, duplicate, another party's key), 20 a ledger restarted, 21 the coordinator's chain
    rolled back (a job or a registered model it lacks), 14 a round one side records and the other not,
    15 a changed epsilon, 6 a cap crossed.
    """
    audit = _federation_audit(ledgers, coordinator, keyring, spec, registry)
    worst = audit.worst()
    code = FINDING_CODES[worst] if worst else ExitCode.OK
    if fmt is Format.json:
        emit_json(_audit_json(audit, code))
        raise typer.Exit(int(code))
    table = Table("party", "key", "entries", "verified", "findings", title="ledger verification")
    for r in audit.agencies:
        table.add_row(
            r.agency,
            r.key_id,
            str(len(r.timeline)),
            "[green]yes[/]" if r.verified else "[red]NO[/]",
            str(len(r.findings)),
        )
    if audit.coordinator:
        c = audit.coordinator
        table.add_row(
            "coordinator",
            c.key_id,
            str(c.rounds),
            "[green]yes[/]" if c.verified else "[red]NO[/]",
            str(len(c.findings)),
        )
    out.print(table)
    if audit.coordinator:
        mark = "[green]agree[/]" if not audit.cross else f"[red]{len(audit.cross)} disagreement(s)[/]"
        out.print(f"cross-check of agencies' ledgers with the coordinator's chain: {mark}")
    _print_findings(audit)
    verdict = "every chain verified and agrees" if code is ExitCode.OK else f"exit {int(code)}: {HELP[code]}"
    out.print(("[green]" if code is ExitCode.OK else "[red]") + verdict + "[/]")
    raise typer.Exit(int(code))


# ---------------------------------------------------------------- replay
@audit_app.command("replay")
def audit_replay(
    evidence: Annotated[
        Path,
        typer.Option("--evidence", help="An agency's evidence: AGENCY/evidence/JOB (every key) or one JOB/KEY16"),
    ],
    receipts: Annotated[
        list[Path],
        typer.Option("--receipts", help="Civil affairs' and the arbiter's receipts: PARTY/evidence/JOB/receipts"),
    ],
    agency: Annotated[
        str | None, typer.Option("--agency", help="The agency you mean to check (refused if the evidence is another's)")
    ] = None,
    keyring: KeyringOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Recompute an agency's masked gradients and Hessian from its kept clipped rows; compare with the receipts.

    Run it at the agency (its rows never leave), on an install you trust. Receipts are signed ledgers (a
    signed head says where each ends); with --keyring each must be signed by civil affairs' or the
    coordinator's ledger key, so they may reach you through anyone; without it, take them from those parties
    yourself. Exits 0 when every product the arbiter released matches and every row is within the declared
    norm; 25 otherwise (a sentinel or other rows were multiplied, an operand substituted, evidence withheld); 4
    for a folder that is not evidence or receipts of another job; 5 for receipts that do not verify (altered,
    taken out, cut off the end) or (with --keyring) are not signed by their party. When an agency's operands
    and civil affairs' receipt disagree, --keyring also tells whose record is false, from the envelopes civil
    affairs signed that the agency kept.
    """
    from agencyfl.vertical.replay import replay

    # the spinner on stderr, and only for people: stdout carries the report (JSON for machines)
    spinner = err.status("replaying the agency's products...") if fmt is Format.table else nullcontext()
    with errors_to_exit(), spinner:
        report = replay(evidence, receipts, agency, keyring)
    code = ExitCode.OK if report.ok else ExitCode.COMPUTATION_DEVIATED
    if fmt is Format.json:
        emit_json(report.to_json() | {"exit_code": int(code)})
        raise typer.Exit(int(code))
    table = Table("product", "key", "matched", "finding", title=f"replay of {report.agency}")
    for p in report.products:
        table.add_row(f"{p.kind} {p.seq}", p.key, "[green]yes[/]" if p.matched else "[red]NO[/]", p.finding)
    out.print(table)
    signed = (
        "each signed by its party's key in the keyring"
        if report.receipts_signed
        else "keys NOT checked against a keyring (no --keyring): take the ledgers from civil affairs and the "
        "coordinator yourself"
    )
    for r in report.receipts:
        torn = " (a torn last line skipped: a stop mid-write)" if r.torn_line else ""
        out.print(f"receipts of {r.party}: {r.receipts}, whole to their signed head, key {r.key_id}{torn}")
    out.print(f"receipts: {signed}")
    out.print(f"inputs: {report.rows} rows x {report.width}, largest row norm {report.max_row_norm:.6g} "
              f"(declared {report.clip:g}), {report.rows_over_clip} over")  # fmt: skip
    for finding in report.findings:
        err.print(f"[red]{finding}[/]")
    verdict = "every product matches its replay" if report.ok else f"exit {int(code)}: {HELP[code]}"
    out.print(("[green]" if report.ok else "[red]") + verdict + "[/]")
    raise typer.Exit(int(code))


# ---------------------------------------------------------------- keys
@keys_app.command("import")
def keys_import(
    party: Annotated[str, typer.Argument(help="Agency name, or 'coordinator'")],
    key_file: Annotated[Path, typer.Argument(help="The party's ledger.pub")],
    keyring: Annotated[Path, typer.Option("--keyring", help="The auditor's keyring folder")] = Path("keyring"),
    fmt: FormatOpt = Format.table,
) -> None:
    """Add a party's public key to the keyring; compare the fingerprint with the party's out of band."""
    from agencyfl.privacy.keys import import_public_key

    with errors_to_exit():
        fingerprint = import_public_key(keyring, party, key_file)
    if fmt is Format.json:
        emit_json({"party": party, "key_id": fingerprint, "keyring": str(keyring)})
        return
    out.print(f"{party}: key {fingerprint} in {keyring} (check this fingerprint with {party} by phone or letter)")


@keys_app.command("export")
def keys_export(
    key: Annotated[Path, typer.Argument(help="Your ledger-signing.key (or a ledger.pub)")],
    out_file: Annotated[Path, typer.Option("--out", help="Where the public key goes")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Write the public half of a ledger signing key, to hand to auditors (the secret key stays)."""
    from agencyfl.privacy.keys import export_public_key

    with errors_to_exit():
        fingerprint = export_public_key(key, out_file)
    if fmt is Format.json:
        emit_json({"public_key": str(out_file), "key_id": fingerprint})
        return
    out.print(f"public key {fingerprint} written to {out_file}; hand it to auditors and read them the fingerprint")


@keys_app.command("list")
def keys_list(
    keyring: Annotated[Path, typer.Option("--keyring", help="The auditor's keyring folder")] = Path("keyring"),
    fmt: FormatOpt = Format.table,
) -> None:
    """List the keyring's parties and key fingerprints."""
    from agencyfl.privacy.keys import keyring_parties

    with errors_to_exit():
        parties = keyring_parties(keyring)
    if fmt is Format.json:
        emit_json(parties)
        return
    for party, fingerprint in parties.items():
        out.print(f"{party:<20} {fingerprint}")


# ---------------------------------------------------------------- attack
@audit_app.command("attack")
def audit_attack(
    model: Annotated[Path, typer.Option("--model", help="A registered model folder (its recipe is re-run)")],
    data: Annotated[Path, typer.Option("--data", help="Records to train on, where they live (CSV or Parquet)")],
    runs: Annotated[int, typer.Option(min=1, help="Training runs; each carries one canary per model input")] = 15,
    magnitude: Annotated[float, typer.Option(min=0.0, help="How far out canaries lie (range half-widths)")] = 100.0,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999, help="Confidence of the bound")] = 0.95,
    epsilon: Annotated[float | None, typer.Option(help="Train at this per-job epsilon instead of the spec's")] = None,
    claim: Annotated[float | None, typer.Option(help="The epsilon to test (default: the training epsilon)")] = None,
    non_private: Annotated[bool, typer.Option("--non-private", help="Train without DP: the control")] = False,
    seed: Annotated[int | None, typer.Option(help="Reproducible canaries and noise (experiments only)")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Membership inference with canaries (one-run audit): an empirical lower bound on epsilon.

    Exits 16 when the bound exceeds the claimed epsilon.
    """
    from rich.progress import Progress

    from agencyfl.empirical_audit import run_canary_audit

    with errors_to_exit(), Progress(console=err, transient=True, disable=fmt is Format.json) as bar:
        task = bar.add_task("training with canaries", total=runs)
        result = run_canary_audit(
            model, data, runs=runs, magnitude=magnitude, confidence=confidence, epsilon=epsilon, claim=claim,
            non_private=non_private, seed=seed, progress=lambda done: bar.update(task, completed=done),
        )  # fmt: skip
    code = ExitCode.PRIVACY_CLAIM_REFUTED if result.refutes_claim else ExitCode.OK
    if fmt is Format.json:
        emit_json({**result.as_dict(), "exit_code": int(code)})
        raise typer.Exit(int(code))
    lo, hi = result.accuracy_interval
    claimed = "none (no DP: the control)" if result.epsilon_claimed is None else f"{result.epsilon_claimed:g}"
    out.print(f"trained {result.runs} times x {result.steps} steps (noise multiplier {result.noise_multiplier:.3f})")
    out.print(f"canaries {result.canaries}, guesses {result.guesses}, correct {result.correct}")
    out.print(f"attack accuracy {result.accuracy:.3f}  ({result.confidence:.0%} interval {lo:.3f} - {hi:.3f})")
    out.print(
        f"epsilon: claimed {claimed}; empirical lower bound {result.epsilon_lower_bound:.3f} "
        f"at {result.confidence:.0%} confidence (delta {result.delta:g})"
    )
    if code is ExitCode.OK:
        out.print("[green]the attack does not refute the claim[/]" if result.epsilon_claimed else "")
    else:
        out.print(f"[red]{HELP[code]}[/]")
    raise typer.Exit(int(code))


# ---------------------------------------------------------------- fairness
@audit_app.command("fairness")
def audit_fairness(
    model: Annotated[Path, typer.Option("--model", help="A registered model folder")],
    data: Annotated[
        Path | None, typer.Option("--data", help="Compute the table on this labelled file instead of the card's")
    ] = None,
    fmt: Annotated[
        ReportFormat, typer.Option("--format", help="table (people), json (scripts) or html (a file to open)")
    ] = ReportFormat.table,
    out_file: Annotated[Path | None, typer.Option("--out", help="Where --format html writes the table")] = None,
) -> None:
    """The fairness table (rates per group with intervals, gaps against the spec's tolerances); exit 17 on a fail."""
    from agencyfl.federation.errors import ModelError
    from agencyfl.server.model_card import fairness_markdown, markdown_to_html
    from agencyfl.server.registry import RegisteredModel

    if fmt is ReportFormat.html and out_file is None:
        err.print("[bold red]error:[/] --format html needs --out FILE")
        raise typer.Exit(int(ExitCode.USAGE))
    with errors_to_exit():
        registered = RegisteredModel(model)
        if registered.spec.fairness is None:
            raise ModelError(f"{model}: the model's spec has no [fairness] section, so there is no table")
        mitigation = registered.card.mitigation
        if data is None:
            table, after, source = registered.card.fairness, None, "the agencies' validation splits"
            if table is None:
                raise ModelError(f"{model}: no agency released fairness counts ({registered.card.fairness_release})")
        else:
            from agencyfl.local_evaluation import evaluate_local

            result = evaluate_local(model, data)
            table, after, source = result.fairness, result.fairness_mitigated, str(data)
    assert table is not None
    code = ExitCode.OK if table["passed"] else ExitCode.FAIRNESS_GAP_EXCEEDED
    if fmt is ReportFormat.json:
        emit_json(
            {"model": str(model), "source": source, "exit_code": int(code), "fairness": table,
             "mitigation": mitigation, "with_group_thresholds": after}
        )  # fmt: skip
        raise typer.Exit(int(code))
    shown_mitigation = mitigation if data is None else None
    markdown = f"# Fairness: {registered.card.model_version}\n\n" + fairness_markdown(table, shown_mitigation, source)
    if after is not None:
        markdown += "\n## With the per-group thresholds\n\n" + fairness_markdown(after, None, source)
    if fmt is ReportFormat.html:
        assert out_file is not None
        out_file.write_text(markdown_to_html(markdown, f"Fairness: {registered.card.model_version}"))
        out.print(f"fairness table written to {out_file} ({'pass' if code is ExitCode.OK else 'FAIL'})")
        raise typer.Exit(int(code))
    _print_fairness(table, source)
    if after is not None:
        out.print("[bold]with the per-group thresholds[/]")
        _print_fairness(after, source)
    raise typer.Exit(int(code))


def _print_fairness(table: dict[str, Any], source: str) -> None:
    from agencyfl.server.model_card import GAP_HEAD, GROUP_HEAD, fairness_rows

    out.print(f"fairness at threshold {table['threshold']:g} on {source} ({table.get('release', '')})")
    for attribute, groups, gaps in fairness_rows(table):
        group_table = Table(*GROUP_HEAD, title=attribute)
        for row in groups:
            group_table.add_row(*row)
        out.print(group_table)
        gap_table = Table(*GAP_HEAD)
        for row in gaps:
            colour = {"pass": "green", "FAIL": "red"}.get(row[-1], "yellow")
            gap_table.add_row(*row[:-1], f"[{colour}]{row[-1]}[/]")
        out.print(gap_table)
    verdict = (
        "[green]pass: every judged gap is within tolerance[/]"
        if table["passed"]
        else "[red]FAIL: " + "; ".join(table["failures"]) + "[/]"
    )
    out.print(verdict)
