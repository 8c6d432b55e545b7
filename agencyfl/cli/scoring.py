"""`agencyfl serve`, `agencyfl score`, `agencyfl coordinator issue-token`: encrypted scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agencyfl.cli.common import (
    Format,
    FormatOpt,
    app,
    coordinator_app,
    emit_json,
    err,
    errors_to_exit,
)
from agencyfl.exit_codes import ExitCode


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
    with errors_to_exit():
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

    with errors_to_exit():
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
        emit_json(report)
        return
    typer.echo(
        f"{report['scored']} households scored ({report['quarantined']} quarantined): {report['eligible']} "
        f"eligible, {report['review']} flagged for review -> {report['out']}"
    )
