"""`agencyfl coordinator init|start|register|align|train|status|stop`: the deployment engine's coordinator side.

Also the scoring service's tokens: `issue-token`, `revoke-token` and `tokens` (the registry, for auditors).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from agencyfl.cli.common import Format, FormatOpt, coordinator_app, emit_json, err, errors_to_exit, one_line, out

DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="The coordinator folder made by `coordinator init` (default: $AGENCYFL_COORDINATOR or ./coordinator)",
    ),
]


def _default_dir() -> Path:
    return Path(os.environ.get("AGENCYFL_COORDINATOR", "coordinator"))


def _cdir(path: Path | None) -> Any:
    from agencyfl.deployment import CoordinatorDir

    cdir = CoordinatorDir((path or _default_dir()).resolve())
    cdir.settings()  # fails with a clear message if this is not a coordinator folder
    return cdir


@coordinator_app.command("init")
def init(
    out_dir: Annotated[Path, typer.Option("--out", help="New folder for the coordinator's keys, state and work")],
    name: Annotated[str, typer.Option(help="The federation's name (in certificates and the handout)")] = "agencyfl",
    host: Annotated[
        list[str] | None,
        typer.Option(help="Name or IP agencies will use to reach the SuperLink (repeat; the first is the address)"),
    ] = None,
    port: Annotated[int, typer.Option(help="The SuperLink's port (Fleet, Control and Runtime APIs)")] = 9093,
    stream_port: Annotated[
        int | None,
        typer.Option("--stream-port", help="The port the agencies' streams dial in vertical jobs (default: port + 1)"),
    ] = None,
    bind: Annotated[str, typer.Option(help="Interface the SuperLink listens on")] = "0.0.0.0",
    fmt: FormatOpt = Format.table,
) -> None:
    """Make a CA, the SuperLink's certificate, the coordinator's ledger key and a handout for agencies."""
    from agencyfl.deployment import init_coordinator

    with errors_to_exit():
        cdir = init_coordinator(out_dir, name, host or [], port, bind, stream_port)
    settings = cdir.settings()
    if fmt is Format.json:
        emit_json(
            {
                **settings,
                "dir": str(cdir.root),
                "ca": str(cdir.tls / "ca.crt"),
                "handout": str(cdir.root / "HANDOUT.txt"),
            }
        )
        return
    out.print(f"coordinator folder: {one_line(cdir.root)}  (SuperLink address {one_line(settings['address'])})")
    out.print((cdir.root / "HANDOUT.txt").read_text(), markup=False)


@coordinator_app.command("start")
def start(cdir_path: DirOpt = None, fmt: FormatOpt = Format.table) -> None:
    """Start the SuperLink detached (TLS, SuperNode authentication, persisted state)."""
    from agencyfl.deployment import start_coordinator

    with errors_to_exit():
        cdir = _cdir(cdir_path)
        pid = start_coordinator(cdir)
    report = {"pid": pid, "address": cdir.settings()["address"], "log": str(cdir.log)}
    if fmt is Format.json:
        emit_json(report)
    else:
        out.print(f"SuperLink running (pid {pid}) at {one_line(report['address'])}; log: {one_line(cdir.log)}")


@coordinator_app.command("stop")
def stop(cdir_path: DirOpt = None, fmt: FormatOpt = Format.table) -> None:
    """Stop the SuperLink (and any ServerApp it runs) by its recorded PID."""
    from agencyfl.deployment import stop_coordinator

    with errors_to_exit():
        stopped = stop_coordinator(_cdir(cdir_path))
    if fmt is Format.json:
        emit_json({"stopped": stopped})
    else:
        out.print("SuperLink stopped" if stopped else "the SuperLink was not running")


@coordinator_app.command("register")
def register(
    public_key: Annotated[Path, typer.Argument(help="The agency's node.pub (from `steward keys`)")],
    agency: Annotated[str, typer.Option(help="The agency's name in the spec")],
    cdir_path: DirOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Register an agency's SuperNode public key; only registered nodes may connect."""
    from agencyfl.deployment import register_agency

    with errors_to_exit():
        entry = register_agency(_cdir(cdir_path), agency, public_key)
    if fmt is Format.json:
        emit_json(entry)
    else:
        out.print(f"registered {one_line(agency)}: node {entry['node_id']}, key sha256 {entry['key_sha256'][:16]}…")


@coordinator_app.command("train")
def train(
    spec: Annotated[Path, typer.Option(help="The federation spec (TOML); each agency holds the same file")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the last unfinished job from its last checkpoint")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Vertical specs: print the job's releases, each agency's epsilon (lifetime as last reported to "
            "this coordinator) and bytes per iteration; start nothing",
        ),
    ] = False,
    cdir_path: DirOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Start a training run on the deployment engine and follow it until it ends."""
    if dry_run:
        _train_dry_run(spec, cdir_path, fmt)
        return
    from agencyfl.cli.training import print_run, print_vertical_run, with_progress
    from agencyfl.deployment import events_size, follow_run, latest_unfinished_job, submit_run
    from agencyfl.federation.errors import DeploymentError
    from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
    from agencyfl.server.app import new_job_id
    from agencyfl.vertical.job import new_vertical_job

    with errors_to_exit():
        cdir = _cdir(cdir_path)
        loaded = load_any_spec(spec)
        vertical = isinstance(loaded, LoadedVerticalSpec)
        job = latest_unfinished_job(cdir) if resume else None
        if resume and job is None:
            raise DeploymentError("--resume: no unfinished job in this coordinator folder")
        job = job or (new_vertical_job() if vertical else new_job_id())
        offset = events_size(cdir, job)
        run_id = submit_run(cdir, spec, job, resume)
        if fmt is not Format.json:
            err.print(f"run {run_id}: job {job}{' (resumed)' if resume else ''}")
        summary = with_progress(
            loaded.spec.training.rounds,
            fmt is Format.json,
            f"job {job}: waiting for the agencies",
            lambda on_event: follow_run(cdir, run_id, job, on_event, offset),
        )
    if fmt is Format.json:
        emit_json(summary)
    elif vertical:
        print_vertical_run(summary)
    else:
        print_run(summary)


def _train_dry_run(spec: Path, cdir_path: Path | None, fmt: Format) -> None:
    from agencyfl.cli.common import fail
    from agencyfl.cli.training import print_dry_run
    from agencyfl.exit_codes import ExitCode
    from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
    from agencyfl.server.vertical_run import coordinator_dry_run

    with errors_to_exit():
        cdir = _cdir(cdir_path)
        loaded = load_any_spec(spec)
        if not isinstance(loaded, LoadedVerticalSpec):
            fail(f"--dry-run is for vertical specs; {str(spec)!r} is horizontal", ExitCode.USAGE)
        report = coordinator_dry_run(cdir.root, loaded)
    if fmt is Format.json:
        emit_json(report)
    else:
        print_dry_run(report)


ALIGN_STEPS = ("keys", "parameters", "blind", "answer", "finish", "commit")


@coordinator_app.command("align")
def align(
    spec: Annotated[Path, typer.Option(help="The vertical federation spec; each party holds the same file")],
    requested_by: Annotated[str, typer.Option("--requested-by", help="Who asks (recorded in the chain)")] = "",
    cdir_path: DirOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Align the agencies' households to civil affairs' register through their SuperNodes (private set intersection).

    Each party runs its own side at its own host; the coordinator relays sealed messages and learns set
    sizes only; each agency keeps its own register positions; the run is a signed entry of the runs chain.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from agencyfl.alignment.runs import load_vertical
    from agencyfl.deployment import follow_alignment, submit_run

    with errors_to_exit():
        cdir = _cdir(cdir_path)
        load_vertical(spec)  # a horizontal or invalid spec is refused here, before anything is submitted
        run = f"align-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.urandom(3).hex()}"
        run_id = submit_run(cdir, spec, run, False, task="align", requested_by=requested_by or "coordinator")
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TimeElapsedColumn(), console=err, disable=fmt is Format.json,
        )  # fmt: skip
        with progress:
            bar = progress.add_task(f"run {run_id}: waiting for the parties", total=len(ALIGN_STEPS))

            def on_event(event: dict[str, Any]) -> None:
                if event.get("type") == "step" and event.get("step") in ALIGN_STEPS:
                    done = ALIGN_STEPS.index(str(event["step"])) + 1
                    progress.update(bar, completed=done, description=f"{event['step']} ({event['seconds']:.1f} s)")

            summary = follow_alignment(cdir, run_id, run, on_event)
    if fmt is Format.json:
        emit_json(summary)
        return
    table = Table("party", "input rows (as the relay saw)", title=f"alignment {summary['run']}")
    for party, rows in summary["sizes"].items():
        table.add_row(one_line(party), f"{rows:,}")
    out.print(table)
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items())
    out.print(
        f"{summary['bytes_relayed'] / 1e6:.1f} MB relayed, sealed ({steps}); each agency keeps its own register "
        f"positions (its `steward status`); outputs kept until {summary['expires']}; recorded in "
        f"{one_line(summary['chain'])}"
    )


@coordinator_app.command("screen")
def screen(
    spec: Annotated[Path, typer.Option(help="The vertical federation spec; each party holds the same file")],
    model: Annotated[
        str, typer.Option("--model", help="The model version (FEDERATION/vNNNN) `coordinator train` registered")
    ],
    token: Annotated[
        str | None, typer.Option("--token", envvar="AGENCYFL_TOKEN", help="Token issued for the purpose")
    ] = None,
    tokens: Annotated[
        Path | None, typer.Option("--tokens", help="The token file (default: the coordinator folder's tokens.json)")
    ] = None,
    purpose: Annotated[str | None, typer.Option("--purpose", help="Default: the model card's purpose")] = None,
    review_band: Annotated[
        float, typer.Option("--review-band", min=0.0, max=0.5, help="Scores within cutoff +- band go to human review")
    ] = 0.1,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="An earlier screening's id: mark each listed household new, unchanged or "
            "changed since its worklist (which stays at civil affairs)",
        ),
    ] = None,
    cdir_path: DirOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Screen civil affairs' whole register through the parties' SuperNodes; the worklists stay at civil affairs.

    Checks the token and purpose first (a refusal is recorded, nothing is sent: exit 24). Each agency scores
    its own records with its own part under civil affairs' key, masked so that only the sum opens; this
    coordinator relays ciphertexts it cannot open; only civil affairs adds, decrypts and writes the
    worklists, in its own folder. Nothing changes an enrolment.
    """
    from agencyfl.alignment.runs import load_vertical
    from agencyfl.deployment import follow_recorded, submit_run
    from agencyfl.screening.run import check_use, new_screening, record_refusal_at
    from agencyfl.vertical.model import RegisteredVerticalModel

    with errors_to_exit():
        cdir = _cdir(cdir_path)
        load_vertical(spec)
        registered = RegisteredVerticalModel(cdir.work / "registry" / model)
        purpose = purpose or registered.card.purpose
        screening = new_screening()
        try:
            token_id, holder = check_use(tokens or cdir.root / "tokens.json", token or "", purpose, registered)
        except Exception as exc:
            from agencyfl.federation.errors import ScreeningRefusedError

            if isinstance(exc, ScreeningRefusedError):
                record_refusal_at(cdir.root, cdir.root / "keys" / "ledger-signing.key", registered, screening,
                                  purpose, exc)  # fmt: skip
            raise
        if since is not None:  # after the token check (a refused token is recorded whatever --since says)
            from agencyfl.screening.remote import recorded_screening

            recorded_screening(cdir.root, cdir.root / "keys" / "ledger-signing.key", since, registered)
        run_dir = cdir.work / "runs" / screening
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "request.json").write_text(json.dumps({
            "model_version": registered.version, "purpose": purpose, "token_id": token_id, "token_holder": holder,
            "review_band": review_band, "since": since,
        }))  # fmt: skip
        run_id = submit_run(cdir, spec, screening, False, task="screen", requested_by=holder)
        if fmt is Format.json:
            summary = follow_recorded(cdir, run_id, screening, lambda _: None, "screening")
        else:
            with err.status(f"screening {screening} (run {run_id})", spinner="dots") as status:
                summary = follow_recorded(
                    cdir, run_id, screening, lambda e: status.update(f"screening: {e.get('step', '')}"), "screening"
                )
    if fmt is Format.json:
        emit_json(summary)
        return
    out.print(f"screening {summary['screening']} of {summary['model_version']}: {summary['households_scored']:,} "
              f"households scored under civil affairs' key; the coordinator held only ciphertexts "
              f"(which agencies gave reasons is in civil affairs' report)")  # fmt: skip
    if summary.get("since"):
        out.print(f"compared with screening {summary['since']} (its worklist, at civil affairs)")
    out.print(f"worklists at civil affairs: {summary['worklists_at_requester']['worklist_html']}")
    out.print(f"recorded in {summary['uses_ledger']} (committing to civil affairs' entry; the counts stay there)")


@coordinator_app.command("status")
def status(cdir_path: DirOpt = None, fmt: FormatOpt = Format.table) -> None:
    """Nodes online, runs, rounds and refusals."""
    from agencyfl.deployment import coordinator_status

    with errors_to_exit():
        report = coordinator_status(_cdir(cdir_path))
    if fmt is Format.json:
        emit_json(report)
        return
    state = f"running (pid {report['superlink_pid']})" if report["running"] else "stopped"
    out.print(f"SuperLink {one_line(report['address'])}: {state}")
    agencies = Table("agency", "node", "status")
    for row in report["agencies"]:
        agencies.add_row(row["agency"], row["node_id"], row["status"])
    out.print(agencies)
    jobs = Table("job", "rounds", "last AUC", "refusals", "skipped rounds", "model")
    for job in report["jobs"]:
        auc = "" if job["last_auc"] is None else f"{job['last_auc']:.4f}"
        jobs.add_row(
            job["job"],
            str(job["rounds_evaluated"]),
            auc,
            str(job["refusals"]),
            str(job["skipped_rounds"]),
            job["model"] or "",
        )
    out.print(jobs)


# ---------------------------------------------------------------- scoring tokens
TokensOpt = Annotated[Path, typer.Option(help="The token file `agencyfl serve --tokens` reads")]


@coordinator_app.command("issue-token")
def issue_token(
    tokens: TokensOpt,
    requester: Annotated[str, typer.Option(help="Who the token is for (e.g. a street office)")],
    purpose: Annotated[
        list[str] | None,
        typer.Option(help="A purpose the token may score for (repeat; default eligibility-identification)"),
    ] = None,
    days: Annotated[float, typer.Option(help="Days until the token expires")] = 30.0,
    fmt: FormatOpt = Format.table,
) -> None:
    """Issue a bearer token for named purposes and an expiry; prints it once (only its hash is stored)."""
    from agencyfl.server.tokens import DEFAULT_PURPOSE, TokenStore

    with errors_to_exit():
        store = TokenStore(tokens)
        token = store.issue(requester, purpose or [DEFAULT_PURPOSE], days)
        record = store.lookup(token)
    assert record is not None
    if fmt is Format.json:
        emit_json({**record.as_dict(), "token": token})
        return
    err.print(
        f"token {record.id} for {one_line(repr(requester))}, purposes {one_line(list(record.purposes))}, "
        f"expires {record.expires} (shown once; store it like a password):"
    )
    typer.echo(token)


@coordinator_app.command("revoke-token")
def revoke_token(
    tokens: TokensOpt,
    token_id: Annotated[str, typer.Option("--id", help="The token's id (from `issue-token` or `tokens`)")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Revoke a token: a serving process refuses it from its next call on."""
    from agencyfl.server.tokens import TokenStore

    with errors_to_exit():
        record = TokenStore(tokens).revoke(token_id)
    if fmt is Format.json:
        emit_json(record.as_dict())
    else:
        out.print(f"token {record.id} of {one_line(repr(record.requester))} revoked at {record.revoked}")


@coordinator_app.command("tokens")
def list_tokens(tokens: TokensOpt, fmt: FormatOpt = Format.table) -> None:
    """The token registry for auditors: id, requester, purposes, issued, expires, state (never the tokens)."""
    from agencyfl.server.tokens import TokenStore

    with errors_to_exit():
        records = TokenStore(tokens).records()
    if fmt is Format.json:
        emit_json([r.as_dict() for r in records])
        return
    table = Table("id", "requester", "purposes", "issued", "expires", "state")
    for r in records:
        table.add_row(r.id, one_line(r.requester), one_line(", ".join(r.purposes)), r.issued, r.expires, r.state())
    out.print(table)
