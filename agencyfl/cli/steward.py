"""`agencyfl steward`: commands run inside an agency's domain."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from agencyfl.cli.common import (
    Format,
    FormatOpt,
    emit_json,
    errors_to_exit,
    fail,
    one_line,
    out,
    steward_app,
)
from agencyfl.exit_codes import ExitCode


# ---------------------------------------------------------------- steward
@steward_app.command("check")
def steward_check(
    spec: Annotated[Path, typer.Option(help="The federation spec (TOML)")],
    agency: Annotated[str, typer.Option(help="Your agency's name in the spec")],
    data: Annotated[Path, typer.Option(help="Your data file (CSV or Parquet)")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Validate every row of a data file; bad rows go to NAME.quarantine.csv beside it."""
    from agencyfl.federation.spec import load_spec
    from agencyfl.federation.table import load_table

    with errors_to_exit():
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
        emit_json(report)
        return
    out.print(
        f"[bold]{agency}[/]: {check.total} rows read, {len(check.valid)} valid, {len(check.quarantined)} quarantined"
    )
    if check.quarantine_path:
        out.print(f"quarantine file: {one_line(check.quarantine_path)} (row number and reason for each)")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            out.print(f"  {count:>5}  {one_line(reason)}")
    if check.absent_columns:
        out.print(f"columns not in the file (treated as unknown): {', '.join(check.absent_columns)}")
    if report["label_rate"] is not None:
        out.print(f"eligible share among valid rows: {report['label_rate']:.1%}")
    out.print(f"dataset fingerprint: {check.fingerprint[:16]}…  (the input file was not modified)")


@steward_app.command("keys")
def steward_keys(
    out_dir: Annotated[
        Path, typer.Option("--out", help="New folder for the agency's keys (keep it on the agency's host)")
    ],
    agency: Annotated[str, typer.Option(help="Your agency's name (a comment in node.pub)")] = "agency",
    fmt: FormatOpt = Format.table,
) -> None:
    """Make the agency's SuperNode key and ledger signing key; hand node.pub to the coordinator."""
    from agencyfl.deployment import make_steward_keys

    with errors_to_exit():
        paths = make_steward_keys(out_dir, agency)
    if fmt is Format.json:
        emit_json({k: str(v) for k, v in paths.items()})
        return
    out.print(f"keys written to {one_line(out_dir)} (private keys are readable by their owner only)")
    out.print(
        f"hand to the coordinator: {one_line(paths['node_pub'])}  (and {one_line(paths['ledger_pub'])} for auditors)"
    )
    out.print("never hand over: node.key, ledger-signing.key")


@steward_app.command("start")
def steward_start(
    agency: Annotated[str, typer.Option(help="Your agency's name in the spec")],
    spec: Annotated[Path, typer.Option(help="The federation spec (the same file the coordinator holds)")],
    data: Annotated[Path, typer.Option(help="Your data file (CSV or Parquet); it never leaves this host")],
    superlink: Annotated[str, typer.Option(help="The coordinator's SuperLink as HOST:PORT")],
    root_cert: Annotated[Path, typer.Option(help="The coordinator's CA certificate (ca.crt)")],
    keys: Annotated[Path, typer.Option(help="The folder made by `steward keys`")],
    coordinator_key: Annotated[
        Path, typer.Option(help="The coordinator's public ledger key (its keys/ledger.pub): jobs must be signed by it")
    ],
    home: Annotated[
        Path | None, typer.Option(help="Where the ledger, log and PID go (default: the keys folder's parent)")
    ] = None,
    peer_key: Annotated[
        list[str] | None,
        typer.Option(
            "--peer-key",
            help="NAME=LEDGER.pub: another party's ledger key, checked out of band (vertical alignment; repeat)",
        ),
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Check the data, then run this agency's Flower SuperNode (detached) against the coordinator."""
    from agencyfl.deployment import StewardHome, start_steward
    from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
    from agencyfl.federation.table import load_table

    site_home = (home or keys.resolve().parent).resolve()
    peers: dict[str, Path] = {}
    for item in peer_key or []:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            fail(f"--peer-key takes NAME=FILE, got {item!r}", ExitCode.USAGE)
        peers[name] = Path(file)
    with errors_to_exit():
        loaded = load_any_spec(spec)
        section = loaded.spec.agency(agency)
        for name in peers:
            loaded.spec.agency(name)  # a peer must be a party of this spec
        if isinstance(loaded, LoadedVerticalSpec):  # its own block: the id, its features, the label if it holds it
            schema = loaded.spec.block_schema(agency)
            check = load_table(data, schema, require_label=bool(getattr(section, "label", False)))
        else:
            check = load_table(data, loaded.spec.schema)
        pid = start_steward(agency, spec, data, superlink, root_cert, keys, site_home, coordinator_key, peers=peers)
    report = {
        "agency": agency,
        "pid": pid,
        "superlink": superlink,
        "rows": check.total,
        "valid": len(check.valid),
        "quarantined": len(check.quarantined),
        "quarantine_file": str(check.quarantine_path) if check.quarantine_path else None,
        "ledger": str(site_home / "ledger"),
        "log": str(StewardHome(site_home).log),
    }
    if fmt is Format.json:
        emit_json(report)
        return
    out.print(f"{agency}: {check.total} rows, {len(check.valid)} valid, {len(check.quarantined)} quarantined")
    if check.quarantine_path:
        out.print(f"quarantine file: {one_line(check.quarantine_path)}")
    out.print(
        f"SuperNode running (pid {pid}), connected to {one_line(superlink)}; "
        f"ledger {one_line(report['ledger'])}; log {one_line(report['log'])}"
    )


@steward_app.command("pin")
def steward_pin(
    home: Annotated[Path, typer.Option(help="The agency's home folder (as `steward start --home`)")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Pin this installation's Flower app: the only app this agency's SuperNode will run (after an upgrade too)."""
    from agencyfl.deployment import pin_app

    with errors_to_exit():
        answer = pin_app(home.resolve())
    if fmt is Format.json:
        emit_json(answer)
        return
    pin = answer["pin"]
    out.print(f"pinned app {pin['digest']} (agencyfl {pin['agencyfl_version']}, flwr {pin['flwr_version']})")
    if answer["replaced"]:
        out.print(f"replaced the earlier pin {answer['replaced']}; restart the SuperNode (`steward stop`, `start`)")


@steward_app.command("status")
def steward_status(
    home: Annotated[Path, typer.Option(help="The agency's home folder (as `steward start --home`)")],
    fmt: FormatOpt = Format.table,
) -> None:
    """The SuperNode, the pinned app, the runs it refused, and what each job released from this agency."""
    from agencyfl.deployment import steward_status as status

    with errors_to_exit():
        report = status(home)
    if fmt is Format.json:
        emit_json(report)
        return
    out.print(f"SuperNode: {'running (pid ' + str(report['pid']) + ')' if report['running'] else 'not running'}")
    pin = report["pinned_app"]
    out.print(f"pinned app: {pin['digest']} (agencyfl {pin['agencyfl_version']})" if pin else "pinned app: none")
    out.print(f"refused runs: {len(report['refused_runs'])}")
    for refusal in report["refused_runs"][-5:]:
        out.print(f"  {refusal['time']}  run {refusal['run_id']}: {escape(refusal['reason'])}")
    out.print(f"refused requests (job plan not signed by the coordinator): {len(report['refused_requests'])}")
    for refusal in report["refused_requests"][-5:]:
        out.print(
            f"  {refusal['time']}  {refusal['kind']} of job {escape(refusal['job'])}: {escape(refusal['reason'])}"
        )
    alignment = report["alignment"]
    if alignment is not None:
        out.print(f"alignment {alignment['run']}: {one_line(alignment['summary'])}; kept until {alignment['expires']}")
    verified = {None: "no ledger yet", True: "verified", False: "DOES NOT VERIFY"}[report["ledger_verified"]]
    out.print(f"ledger: {verified}")
    for job in report["jobs"]:
        out.print(
            f"  {job['job']}: {job['rounds']} rounds, {job['releases']} releases, {job['refusals']} refusals, "
            f"epsilon {job.get('epsilon_job', 0.0):.3f} (lifetime {job['epsilon_lifetime']:.3f})"
        )


@steward_app.command("stop")
def steward_stop(
    home: Annotated[Path, typer.Option(help="The folder `steward start` used as home")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Stop this agency's SuperNode by its recorded PID."""
    from agencyfl.deployment import stop_steward

    stopped = stop_steward(home)
    if fmt is Format.json:
        emit_json({"stopped": stopped})
    else:
        out.print("SuperNode stopped" if stopped else "the SuperNode was not running")
