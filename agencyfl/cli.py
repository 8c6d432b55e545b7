"""The ``agencyfl`` command: one typer app, grouped by role.

Every reporting command takes ``--format json``; errors are one line on stderr with a documented
exit code (``agencyfl.exit_codes``), never a traceback.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agencyfl.exit_codes import HELP, ExitCode, exit_code_for
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


def _json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@contextmanager
def _errors() -> Iterator[None]:
    """Domain errors become one line on stderr and their exit code."""
    try:
        yield
    except AgencyflError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(int(exit_code_for(exc))) from None


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
        _json({"spec": str(result.spec), "files": files, "rows": result.rows, "label_rates": result.label_rates})
        return
    table = Table("file", "rows", "eligible share", title=f"synthetic population (seed {seed})")
    for name, path in files.items():
        table.add_row(path, str(result.rows[name]), f"{result.label_rates[name]:.1%}")
    out.print(table)
    out.print(f"spec: {result.spec}")


# ---------------------------------------------------------------- steward
@steward_app.command("check")
def steward_check(
    spec: Annotated[Path, typer.Option(help="The federation spec (TOML)")],
    agency: Annotated[str, typer.Option(help="Your agency's name in the spec")],
    data: Annotated[Path, typer.Option(help="Your data file (CSV or Parquet)")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Validate every row of a data file; bad rows go to NAME.quarantine.csv beside it."""
    from federation.spec import load_spec
    from federation.table import load_table

    with _errors():
        loaded = load_spec(spec)
        loaded.spec.agency(agency)
        check = load_table(data, loaded.spec.schema)
    reasons: dict[str, int] = {}
    for reason in check.quarantined.get("reason", []):
        for part in str(reason).split("; "):
            key = re.sub(r"'[^']*'", "<value>", part, count=1)
            reasons[key] = reasons.get(key, 0) + 1
    label = loaded.spec.schema.label
    report = {
        "agency": agency,
        "data": str(data),
        "rows": check.total,
        "valid": len(check.valid),
        "quarantined": len(check.quarantined),
        "quarantine_file": str(check.quarantine_path) if check.quarantine_path else None,
        "label_rate": float(check.valid[label].mean()) if len(check.valid) else None,
        "absent_columns": check.absent_columns,
        "missing_share": {f.name: float(check.valid[f.name].isna().mean()) for f in loaded.spec.schema.features}
        if len(check.valid)
        else {},
        "fingerprint": check.fingerprint,
        "reasons": reasons,
    }
    if fmt is Format.json:
        _json(report)
        return
    out.print(
        f"[bold]{agency}[/]: {check.total} rows read, {len(check.valid)} valid, {len(check.quarantined)} quarantined"
    )
    if check.quarantine_path:
        out.print(f"quarantine file: {check.quarantine_path} (row number and reason for each)")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            out.print(f"  {count:>5}  {reason}")
    if check.absent_columns:
        out.print(f"columns not in the file (treated as unknown): {', '.join(check.absent_columns)}")
    if report["label_rate"] is not None:
        out.print(f"eligible share among valid rows: {report['label_rate']:.1%}")
    out.print(f"dataset fingerprint: {check.fingerprint[:16]}…  (the input file was not modified)")


# ---------------------------------------------------------------- run
def _run_with_progress(spec: Path, workdir: Path, quiet: bool) -> dict[str, Any]:
    from agencyfl.runner import run_federation
    from federation.spec import load_spec

    rounds = load_spec(spec).spec.training.rounds
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
    )
    with progress:
        task = progress.add_task("starting the federation (Flower simulation engine)", total=rounds)

        def on_event(event: dict[str, Any]) -> None:
            kind = event.get("type")
            if kind == "round":
                eps = max(event.get("epsilon", {}).values(), default=0.0)
                progress.update(
                    task,
                    completed=event["round"],
                    description=f"round {event['round']}: AUC {event['auc']:.3f}, max epsilon {eps:.2f}",
                )
                if not quiet:
                    progress.console.print(
                        f"round {event['round']:>3}: pooled validation AUC {event['auc']:.4f}  "
                        f"accuracy {event['accuracy']:.4f}  Brier {event['brier']:.4f}  "
                        f"agencies trained {event.get('trained', '?')}  max epsilon {eps:.3f}"
                    )
            elif kind == "refusal" and not quiet:
                progress.console.print(
                    f"[yellow]round {event['round']}: {event['agency']} refused: {event['reason']}[/]"
                )
            elif kind == "skipped":
                progress.update(task, completed=event["round"])
                if not quiet:
                    progress.console.print(f"[yellow]round {event['round']}: model unchanged ({event['reason']})[/]")
            elif kind == "error" and not quiet:
                progress.console.print(f"[red]round {event['round']}: an agency failed: {event['reason']}[/]")

        return run_federation(spec, workdir, on_event=on_event)


def _print_run(summary: dict[str, Any]) -> None:
    m = summary["metrics"]
    out.print(
        f"\n[bold]job {summary['job']}[/]: {summary['rounds_aggregated']}/{summary['rounds_planned']} rounds aggregated"
    )
    out.print(
        f"pooled validation: AUC {m['auc']:.4f}, accuracy {m['accuracy']:.4f}, Brier {m['brier']:.4f} "
        f"({m['n']} validation rows across agencies)"
    )
    table = Table("agency", "epsilon (this job)", "epsilon (lifetime)", "rounds", "refusals", "ledger")
    for name, rec in summary["agencies"].items():
        table.add_row(
            name,
            f"{rec['epsilon_job']:.3f}",
            f"{rec['epsilon_lifetime']:.3f}",
            str(rec["rounds_trained"]),
            str(rec["refusals"]),
            summary["ledgers"].get(name, ""),
        )
    out.print(table)
    out.print(f"model: {summary['model']}")


@app.command("run")
def run(
    spec: Annotated[Path, typer.Option(help="The federation spec (TOML)")],
    workdir: Annotated[Path, typer.Option(help="Where ledgers, registry and run summaries go")] = Path("work"),
    fmt: FormatOpt = Format.table,
) -> None:
    """Run the whole federation on this machine (Flower simulation engine, in process)."""
    with _errors():
        summary = _run_with_progress(spec, workdir, quiet=fmt is Format.json)
    if fmt is Format.json:
        _json(summary)
    else:
        _print_run(summary)


# ---------------------------------------------------------------- evaluate
def _evaluate(model: Path, spec: Path, data: Path) -> dict[str, Any]:
    from federation.encoding import FeatureEncoder
    from federation.errors import ModelError
    from federation.metrics import exact_metrics
    from federation.model import predict_proba
    from federation.spec import load_spec
    from federation.table import load_table
    from server.registry import RegisteredModel

    registered = RegisteredModel(model)
    loaded = load_spec(spec)
    encoder = FeatureEncoder(loaded.spec.schema)
    if encoder.names != registered.encoder.names:
        raise ModelError(f"the spec's features do not match the model's inputs ({registered.directory})")
    check = load_table(data, loaded.spec.schema)
    scores = predict_proba(registered.model, encoder.encode(check.valid))
    metrics = exact_metrics(scores, check.valid[loaded.spec.schema.label].to_numpy())
    return {
        "model": str(model),
        "model_version": registered.card.get("model_version"),
        "data": str(data),
        "rows": check.total,
        "scored": len(check.valid),
        "quarantined": len(check.quarantined),
        **metrics.as_dict(),
    }


@app.command("evaluate")
def evaluate(
    model: Annotated[Path, typer.Option(help="A registered model folder")],
    spec: Annotated[Path, typer.Option(help="The federation spec (TOML)")],
    data: Annotated[Path, typer.Option(help="A labelled CSV or Parquet file")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Score a local labelled file and print AUC, accuracy and Brier score."""
    with _errors():
        report = _evaluate(model, spec, data)
    if fmt is Format.json:
        _json(report)
        return
    out.print(
        f"{report['model_version']} on {data}: AUC {report['auc']:.4f}, accuracy {report['accuracy']:.4f}, "
        f"Brier {report['brier']:.4f} ({report['scored']} rows scored, {report['quarantined']} quarantined)"
    )


# ---------------------------------------------------------------- audit
def _audit_rows(ledgers: list[Path]) -> list[Any]:
    from privacy.audit import audit_ledger

    return [audit_ledger(path) for path in ledgers]


def _audit_dict(row: Any) -> dict[str, Any]:
    return {**{k: v for k, v in vars(row).items()}, "verified": row.verified, "within_budget": row.within_budget}


@audit_app.command("report")
def audit_report(
    ledgers: Annotated[list[Path], typer.Argument(help="Agency ledger folders", metavar="LEDGER_DIR...")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Verify ledgers and report each agency's spend against its caps (exit 0 only if all is well)."""
    rows = _audit_rows(ledgers)
    code = ExitCode.OK
    if any(not r.verified for r in rows):
        code = ExitCode.LEDGER_UNVERIFIED
    elif any(not r.within_budget for r in rows):
        code = ExitCode.BUDGET_EXCEEDED
    if fmt is Format.json:
        _json({"ok": code is ExitCode.OK, "exit_code": int(code), "agencies": [_audit_dict(r) for r in rows]})
    else:
        table = Table(
            "agency",
            "epsilon last job",
            "epsilon lifetime / cap",
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
                f"{r.delta:g}" if r.delta else "-",
                f"{r.rounds_last_job}/{r.rounds_total}",
                str(r.refusals),
                r.last_entry or "-",
                "[green]ok[/]" if r.chain_ok and r.head_ok else "[red]BROKEN[/]",
                "[green]ok[/]" if r.signatures_ok else "[red]BAD[/]",
            )
        out.print(table)
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


# ---------------------------------------------------------------- demo
@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the demo's data, ledgers and models")] = Path(
        "agencyfl-demo"
    ),
    households: Annotated[int, typer.Option(help="Population size")] = 20000,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
) -> None:
    """Synthesize four agencies' data, train under DP, evaluate, and audit the ledgers."""
    from agencyfl.synth import synthesize

    start = time.time()
    data_dir = workdir / "data"
    out.rule("1. four agencies' records (synthetic)")
    result = synthesize(data_dir, households=households, seed=seed, dirty_rows=6)
    for name, path in result.agency_files.items():
        out.print(f"  {name:<14} {result.rows[name]:>6} households  eligible {result.label_rates[name]:.1%}  {path}")
    out.print(f"  held-out test file: {result.test} ({result.rows['test']} households); spec: {result.spec}")
    out.rule("2. federated training with DP-SGD (each agency's records stay in its folder)")
    with _errors():
        summary = _run_with_progress(result.spec, workdir / "work", quiet=False)
    _print_run(summary)
    out.rule("3. the model on the held-out test file")
    with _errors():
        report = _evaluate(Path(summary["model"]), result.spec, result.test)
    out.print(
        f"  AUC {report['auc']:.4f}, accuracy {report['accuracy']:.4f}, Brier {report['brier']:.4f} "
        f"on {report['scored']} households"
    )
    out.print(
        "  (higher than the pooled validation AUC: test rows have every field, while each agency's\n"
        "   validation rows lack the fields that agency does not hold)"
    )
    out.rule("4. the auditor's report")
    rows = _audit_rows([Path(p) for p in summary["ledgers"].values()])
    ok = all(r.verified and r.within_budget for r in rows)
    for r in rows:
        out.print(
            f"  {r.agency:<14} epsilon {r.epsilon_lifetime:.3f} of budget {r.budget:g}  "
            f"chain {'ok' if r.chain_ok and r.head_ok else 'BROKEN'}, signatures {'ok' if r.signatures_ok else 'BAD'}"
        )
    ledgers = " ".join(summary["ledgers"].values())
    out.print(f"""
[bold]What happened[/] ({time.time() - start:.0f} s)
- Each agency checked its file; malformed rows went to *.quarantine.csv beside it (see {data_dir}).
- Each agency trained on its own rows with Opacus DP-SGD (Poisson sampling, clipping, Gaussian noise);
  only model weights and validation histograms left an agency. Noise was calibrated so the
  {summary["rounds_planned"]} rounds stay within epsilon {max(r.epsilon_job_cap or 0 for r in rows):g} per agency.
- Each agency's spend is in its signed, hash-chained ledger; the audit above re-verified them
  {"successfully" if ok else "and FOUND PROBLEMS"}.
- The model and its card: {summary["model"]}

Next: agencyfl audit report {ledgers}
      agencyfl evaluate --model {summary["model"]} --spec {result.spec} --data {result.test}""")
    if not ok:
        raise typer.Exit(int(ExitCode.LEDGER_UNVERIFIED))


# ---------------------------------------------------------------- encrypted scoring
@coordinator_app.command("issue-token")
def issue_token(
    tokens: Annotated[Path, typer.Option(help="The token file `agencyfl serve --tokens` reads")],
    requester: Annotated[str, typer.Option(help="Who the token is for (e.g. a street office)")],
) -> None:
    """Issue a bearer token for a requester; prints it once (only its hash is stored)."""
    from server.scoring import TokenStore

    token = TokenStore(tokens).issue(requester)
    err.print(f"token for {requester!r} (shown once; store it like a password):")
    typer.echo(token)


@app.command("serve")
def serve(
    model: Annotated[Path, typer.Option(help="A registered model folder (logistic, or MLP with square activation)")],
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one)")] = 50051,
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    tokens: Annotated[Path | None, typer.Option(help="Token file from `coordinator issue-token`")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(help="Accept requests without a token (tests only)")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate chain (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM)")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="CA of client certificates: mutual TLS")] = None,
) -> None:
    """Serve a model for encrypted (CKKS) scoring over gRPC until interrupted."""
    from server.scoring import TokenStore, start_server

    if tokens is None and not insecure_no_auth:
        err.print("error: give --tokens FILE (see `agencyfl coordinator issue-token`) or --insecure-no-auth")
        raise typer.Exit(int(ExitCode.USAGE))
    if insecure_no_auth:
        err.print("[bold yellow]WARNING: --insecure-no-auth: anyone who reaches this port can score[/]")
    tls = None
    if tls_cert and tls_key:
        tls = (tls_cert.read_bytes(), tls_key.read_bytes(), tls_client_ca.read_bytes() if tls_client_ca else None)
    with _errors():
        server, bound = start_server(model, port, TokenStore(tokens) if tokens else None, host=host, tls=tls)
    err.print(f"serving {model} on {host}:{bound} ({'TLS' if tls else 'plaintext gRPC'}); Ctrl-C stops")
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=2)


@app.command("score")
def score(
    server: Annotated[str, typer.Option(help="HOST:PORT of `agencyfl serve`")],
    data: Annotated[Path, typer.Option(help="Households to score (CSV or Parquet; no label needed)")],
    out: Annotated[Path, typer.Option(help="Where to write decisions (CSV)")],
    token: Annotated[
        str | None, typer.Option(envvar="AGENCYFL_TOKEN", help="Bearer token (or $AGENCYFL_TOKEN)")
    ] = None,
    threshold: Annotated[float, typer.Option(help="Score at or above which a household is eligible")] = 0.5,
    review_band: Annotated[float, typer.Option(help="Scores within threshold +- band are flagged for review")] = 0.1,
    purpose: Annotated[str, typer.Option(help="Purpose of the request; must match the model's")] = (
        "eligibility-identification"
    ),
    root_cert: Annotated[Path | None, typer.Option(help="CA certificate of the server (TLS)")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Score households under encryption: only ciphertexts leave this machine; decisions are made here."""
    from clients.requester import ScoreSettings, ScoringClient, score_file

    with _errors():
        client = ScoringClient(server, token=token, root_cert=root_cert.read_bytes() if root_cert else None)
        progress = Progress(
            TextColumn("encrypted scoring"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=err,
            disable=fmt is Format.json,
        )
        with progress:
            task = progress.add_task("score", total=None)
            report = score_file(
                client,
                data,
                out,
                ScoreSettings(threshold=threshold, review_band=review_band, purpose=purpose),
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        client.close()
    if fmt is Format.json:
        _json(report)
        return
    typer.echo(
        f"{report['scored']} households scored ({report['quarantined']} quarantined): {report['eligible']} "
        f"eligible, {report['review']} flagged for review -> {report['out']}"
    )


@app.command("exit-codes")
def exit_codes(fmt: FormatOpt = Format.table) -> None:
    """List the exit codes and what each means."""
    if fmt is Format.json:
        _json({int(code): text for code, text in HELP.items()})
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


if __name__ == "__main__":
    main()
