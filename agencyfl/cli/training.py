"""`agencyfl run` and `agencyfl evaluate`: federated training on this machine, and local evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agencyfl.cli.common import (
    Format,
    FormatOpt,
    app,
    emit_json,
    err,
    errors_to_exit,
    fail,
    one_line,
    out,
)
from agencyfl.exit_codes import ExitCode

if TYPE_CHECKING:
    from agencyfl.federation.spec import LoadedVerticalSpec


# ---------------------------------------------------------------- run
def run_with_progress(spec: Path, workdir: Path, quiet: bool) -> dict[str, Any]:
    from agencyfl.federation.spec import load_spec
    from agencyfl.runner import run_federation

    rounds = load_spec(spec).spec.training.rounds
    return with_progress(
        rounds,
        quiet,
        "starting the federation (Flower simulation engine)",
        lambda on_event: run_federation(spec, workdir, on_event=on_event),
    )


def with_progress(
    rounds: int, quiet: bool, title: str, start: Callable[[Callable[[dict[str, Any]], None]], dict[str, Any]]
) -> dict[str, Any]:
    """Run ``start(on_event)`` showing a progress bar and one line per round, refusal or failure."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
    )
    with progress:
        task = progress.add_task(title, total=rounds)

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

        return start(on_event)


def print_run(summary: dict[str, Any]) -> None:
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
            summary.get("ledgers", {}).get(name, "(on the agency's host)"),
        )
    out.print(table)
    out.print(f"model: {summary['model']}")


@app.command("run")
def run(
    spec: Annotated[Path, typer.Option(help="The federation spec (TOML)")],
    workdir: Annotated[Path, typer.Option(help="Where ledgers, registry and run summaries go")] = Path("work"),
    fmt: FormatOpt = Format.table,
) -> None:
    """Run the whole federation on this machine (Flower simulation engine, in process).

    A vertical spec is aligned first, then trained with the encrypted protocol (docs/vertical.md),
    every iteration accounted in every agency's ledger before it is released.
    """
    if workdir.exists() and not workdir.is_dir():
        fail(f"--workdir {str(workdir)!r} is a file, not a folder", ExitCode.USAGE)
    with errors_to_exit():
        vertical = _vertical_spec(spec)
        if vertical is not None:
            _run_vertical(vertical, workdir, fmt)
            return
        summary = run_with_progress(spec, workdir, quiet=fmt is Format.json)
    if fmt is Format.json:
        emit_json(summary)
    else:
        print_run(summary)


def _vertical_spec(spec: Path) -> LoadedVerticalSpec | None:
    """The spec, if it is a valid vertical one (anything else takes the horizontal path and its errors)."""
    from agencyfl.federation.errors import AgencyflError
    from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec

    try:
        loaded = load_any_spec(spec)
    except AgencyflError:
        return None
    return loaded if isinstance(loaded, LoadedVerticalSpec) else None


def _run_vertical(loaded: LoadedVerticalSpec, workdir: Path, fmt: Format) -> None:
    from agencyfl.vertical.job import run_vertical

    columns = (TextColumn("iteration"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=fmt is Format.json) as bar:
        task = bar.add_task("train", total=loaded.spec.training.rounds)
        summary = run_vertical(loaded, workdir, on_iteration=lambda done, _total: bar.update(task, completed=done))
    if fmt is Format.json:
        emit_json(summary)
        return
    out.print(f"job {summary['job']}: {summary['rounds_aggregated']} iterations, validation AUC "
              f"{summary['metrics']['validation_auc']:.3f} (civil affairs' held-out assessed households)")  # fmt: skip
    for name, row in summary["agencies"].items():
        out.print(f"  {name:14} epsilon {row['epsilon_job']:.3f} (lifetime {row['epsilon_lifetime']:.3f}); "
                  f"its block: {row['model_block']}")  # fmt: skip


# ---------------------------------------------------------------- evaluate
def evaluate_file(model: Path, spec: Path, data: Path) -> dict[str, Any]:
    """Metrics of a registered model on a labelled file (see ``agencyfl.local_evaluation``)."""
    from agencyfl.local_evaluation import evaluate_local

    return evaluate_local(model, data, spec).report


@app.command("evaluate")
def evaluate(
    model: Annotated[Path, typer.Option(help="A registered model folder")],
    spec: Annotated[Path, typer.Option(help="The federation spec (TOML)")],
    data: Annotated[Path, typer.Option(help="A labelled CSV or Parquet file")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write each household's score, decision and reasons (CSV)")
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Score a local labelled file: AUC, accuracy, Brier score, the fairness table, and reasons per household."""
    from agencyfl.federation.files import write_private_csv
    from agencyfl.local_evaluation import evaluate_local

    with errors_to_exit():
        result = evaluate_local(model, data, spec)
        report = {**result.report, "fairness": result.fairness, "fairness_mitigated": result.fairness_mitigated}
        if out_file is not None:  # household records: 0600, atomic
            out_file.parent.mkdir(parents=True, exist_ok=True)
            write_private_csv(out_file, result.decisions)
            report["out"] = str(out_file)
    if fmt is Format.json:
        emit_json(report)
        return
    out.print(
        f"{one_line(report['model_version'])} on {one_line(data)}: "
        f"AUC {report['auc']:.4f}, accuracy {report['accuracy']:.4f}, "
        f"Brier {report['brier']:.4f} ({report['scored']} rows scored, {report['quarantined']} quarantined)"
    )
    if result.fairness is not None:
        verdict = "pass" if result.fairness["passed"] else "FAIL: " + "; ".join(result.fairness["failures"])
        out.print(f"fairness at threshold {result.fairness['threshold']:g}: {one_line(verdict)}")
        out.print(f"  (the table: agencyfl audit fairness --model {one_line(model)} --data {one_line(data)})")
    if out_file is not None:
        out.print(f"decisions with reasons: {one_line(out_file)}")
