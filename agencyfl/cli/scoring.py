"""`agencyfl serve` and `agencyfl score`: encrypted scoring (tokens: `agencyfl coordinator issue-token`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agencyfl.cli.common import Format, FormatOpt, app, emit_json, err, errors_to_exit, fail, one_line
from agencyfl.exit_codes import ExitCode


def _read_pem(option: str, path: Path) -> bytes:
    if not path.is_file():
        fail(f"{option} {str(path)!r} is not a readable file", ExitCode.USAGE)
    return path.read_bytes()


def tls_material(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> tuple[bytes, bytes, bytes | None] | None:
    """The TLS triple for ``start_server`` from the three options, or None for plaintext.

    An incomplete set (a certificate without its key, a key without a certificate, a client CA
    without both) is a wrong command line (exit 2): TLS is never dropped silently.
    """
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-client-ca": client_ca}
    if all(v is None for v in given.values()):
        return None
    if cert is None or key is None:
        named = ", ".join(k for k, v in given.items() if v is not None)
        missing = " and ".join(k for k in ("--tls-cert", "--tls-key") if given[k] is None)
        fail(f"{named} given without {missing}: TLS needs both (refusing to serve in plaintext)", ExitCode.USAGE)
    return (
        _read_pem("--tls-cert", cert),
        _read_pem("--tls-key", key),
        _read_pem("--tls-client-ca", client_ca) if client_ca else None,
    )


@app.command("serve")
def serve(
    model: Annotated[Path, typer.Option(help="A registered model folder (logistic, or MLP with square activation)")],
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one)")] = 50051,
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    tokens: Annotated[Path | None, typer.Option(help="Token file from `coordinator issue-token`")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(help="Accept requests without a token (tests only)")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate chain (PEM); needs --tls-key")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM); needs --tls-cert")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="CA of client certificates: mutual TLS (needs --tls-cert and --tls-key)")
    ] = None,
) -> None:
    """Serve a model for encrypted (CKKS) scoring over gRPC until interrupted."""
    from agencyfl.server.scoring import TokenStore, start_server

    if tokens is None and not insecure_no_auth:
        fail("give --tokens FILE (see `agencyfl coordinator issue-token`) or --insecure-no-auth", ExitCode.USAGE)
    if tokens is not None and insecure_no_auth:
        fail("--tokens and --insecure-no-auth contradict each other; give one", ExitCode.USAGE)
    tls = tls_material(tls_cert, tls_key, tls_client_ca)
    if insecure_no_auth:
        err.print("[bold yellow]WARNING: --insecure-no-auth: anyone who reaches this port can score[/]")
    with errors_to_exit():
        registry = TokenStore(tokens) if tokens else None
        try:
            server, bound = start_server(model, port, registry, host=host, tls=tls)
        except RuntimeError:  # grpc: "Failed to bind"
            bound = 0
    if not bound:
        fail(
            f"cannot listen on {host}:{port} (port in use, not an address of this host, or unusable TLS files)",
            ExitCode.USAGE,
        )
    mode = "mutual TLS" if tls and tls[2] else "TLS" if tls else "plaintext gRPC"
    err.print(f"serving {one_line(model)} on {one_line(host)}:{bound} ({mode}); Ctrl-C stops")
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=2)


@app.command("score")
def score(
    server: Annotated[str, typer.Option(help="HOST:PORT of `agencyfl serve`")],
    data: Annotated[Path, typer.Option(help="Households to score (CSV or Parquet; no label needed)")],
    out: Annotated[Path, typer.Option(help="Where to write decisions (CSV, created 0600)")],
    token: Annotated[
        str | None, typer.Option(envvar="AGENCYFL_TOKEN", help="Bearer token (or $AGENCYFL_TOKEN)")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Replace the model's threshold (default: the model card's rule, with its per-group thresholds)",
        ),
    ] = None,
    review_band: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Scores within the threshold +- band are flagged for review")
    ] = 0.1,
    purpose: Annotated[str, typer.Option(help="Purpose of the request; the token must be issued for it")] = (
        "eligibility-identification"
    ),
    root_cert: Annotated[Path | None, typer.Option(help="CA certificate of the server (TLS)")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Score households under encryption: only ciphertexts leave this machine; decisions are made here."""
    from agencyfl.clients.requester import ScoreSettings, ScoringClient, score_file

    root = _read_pem("--root-cert", root_cert) if root_cert else None
    with errors_to_exit():
        client = ScoringClient(server, token=token, root_cert=root)
        try:
            if threshold is not None and client.rule.thresholds:
                fail(
                    f"--threshold would undo this model's per-group thresholds on {client.rule.attribute!r} "
                    "(its model card's mitigation); leave it out to apply the card's rule",
                    ExitCode.USAGE,
                )
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
        finally:
            client.close()
    if fmt is Format.json:
        emit_json(report)
        return
    typer.echo(
        f"{report['scored']} households scored ({report['quarantined']} quarantined): {report['eligible']} "
        f"eligible, {report['review']} flagged for review -> {report['out']}"
    )
