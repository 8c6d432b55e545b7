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
            elif kind == "iteration":  # a vertical job's iteration (every agency admitted it in its ledger)
                eps = max(event.get("epsilon", {}).values(), default=0.0)
                text = f"iteration {event['round']}: {event['seconds']:.1f} s, max epsilon {eps:.2f}"
                progress.update(task, completed=event["round"], description=text)
            elif kind == "failed" and not quiet:
                progress.console.print(f"[red]stopped after iteration {event.get('iterations_done', '?')}: "
                                       f"{event.get('message', '')}[/]")  # fmt: skip
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
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Vertical specs: print the job's releases, each agency's epsilon now and after, refusals and "
            "bytes per iteration; align, train and record nothing",
        ),
    ] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Run the whole federation on this machine (Flower simulation engine, in process).

    A vertical spec is aligned first, then trained with the encrypted protocol (docs/vertical.md),
    every iteration accounted in every agency's ledger before it is released. ``--dry-run`` (vertical
    specs only; exit 2 for a horizontal one) shows what that would release and spend, writing nothing.
    """
    if workdir.exists() and not workdir.is_dir():
        fail(f"--workdir {str(workdir)!r} is a file, not a folder", ExitCode.USAGE)
    if dry_run:
        _dry_run(spec, workdir, fmt)
        return
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
    print_vertical_run(summary)


def released_auc_text(summary: dict[str, Any]) -> str:
    """The validation AUC as released (noised, with the fairness counts), or why none was."""
    auc = summary["metrics"].get("validation_auc")
    if auc is None:
        return "no validation AUC released (only with noised fairness counts)"
    return f"validation AUC {auc:.3f} (noised release; civil affairs' held-out assessed households)"


def print_vertical_run(summary: dict[str, Any]) -> None:
    """A vertical job's summary: iterations, validation AUC, each agency's epsilon and where its block is."""
    out.print(f"job {summary['job']}: {summary['rounds_aggregated']} iterations, {released_auc_text(summary)}")
    for name, row in summary["agencies"].items():
        out.print(f"  {name:14} epsilon {row['epsilon_job']:.3f} (lifetime {row['epsilon_lifetime']:.3f}); "
                  f"its block: {row['model_block']}")  # fmt: skip


def _dry_run(spec: Path, workdir: Path, fmt: Format) -> None:
    from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
    from agencyfl.vertical.dry_run import dry_run

    with errors_to_exit():
        loaded = load_any_spec(spec)
        if not isinstance(loaded, LoadedVerticalSpec):
            fail(
                f"--dry-run is for vertical specs; {str(spec)!r} is horizontal (its rounds' noise and spend are "
                "checked round by round by each agency when it runs)",
                ExitCode.USAGE,
            )
        report = dry_run(loaded, workdir)
    if fmt is Format.json:
        emit_json(report)
        return
    print_dry_run(report)


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f} KB"


def print_dry_run(report: dict[str, Any]) -> None:
    """The dry run for people: the plan, the releases, one row per agency, the verdict."""
    plan, releases, register = report["plan"], report["releases"], report["register"]
    out.print(
        f"[bold]dry run[/] of {one_line(report['federation'])}: nothing aligned, trained or recorded "
        f"(workdir {one_line(report['workdir'])})"
    )
    out.print(
        f"plan: K {plan['agencies']} agencies, T {plan['iterations']} iterations, epsilon {plan['epsilon']:g} "
        f"delta {plan['delta']:g}, W {plan['weight_bound']:g} ({plan['projection']}), "
        f"C {plan['score_clip'] if plan['score_clip'] is not None else 'none'} (partial scores clipped), "
        f"Z {plan['score_bound']:.3f}, "
        f"D {plan['residual_bound']:.3f}, noise multiplier {plan['noise_multiplier']:.4f}, "
        f"optimizer {plan['optimizer']} (learning rate {plan['learning_rate']:g}"
        + (f", damping {plan['damping']:g} x the Hessian noise's norm)" if plan.get("damping") is not None else ")")
        + (
            f"; agencies step in turn, the model the mean of the last {plan['averaged_iterations']} iterations"
            if plan.get("order") == "sequential"
            else "; agencies step at once, the model the last iteration"
        )
    )
    kinds = " + ".join(
        f"{r['count']} {r['release']} (Gaussian, sensitivity {r['sensitivity']:.4g}, std {r['std']:.4g})"
        for r in releases["by_kind"]
    )
    out.print(f"releases: {releases['count']} = {kinds}; fairness: {one_line(releases['fairness'])}")
    sizes = report["ciphertext_bytes"]
    out.print(
        f"register: {register['size']:,} households ({one_line(register['source'])}), "
        f"{register['ciphertexts_per_vector']} ciphertext(s) per vector; ciphertexts measured: partial scores "
        f"{_kb(sizes['partial_scores'])}, residuals {_kb(sizes['residuals'])}, gradient {_kb(sizes['gradient'])}"
    )
    table = Table(
        "agency", "epsilon (this job)", "per-job cap", "lifetime now", "lifetime after the job", "budget", "verdict",
        "sent per iteration",
    )  # fmt: skip
    for name, row in report["agencies"].items():
        refused = row["refused"]
        verdict = (
            "[green]admits every release[/]"
            if refused is None
            else f"[red]refuses {refused['release']} {refused['iteration']}[/]"
        )
        table.add_row(
            name, f"{row['epsilon_job_planned']:.3f}", f"{row['epsilon_job_cap']:g}",
            f"{row['epsilon_lifetime_now']:.3f}", f"{row['epsilon_lifetime_planned']:.3f}", f"{row['budget']:g}",
            verdict, _kb(row["bytes_per_iteration"]),
        )  # fmt: skip
    out.print(table)
    out.print(f"arbiter sends {report['bytes_per_iteration']['arbiter']} bytes per iteration (masked noised values)")
    stops = report["stops_at"]
    if stops is None:
        fairness = " (the fairness counts would be refused: no table on the card)" if report["fairness_refused"] else ""
        out.print(f"[green]the job would run[/]: {releases['count']} releases admitted by every ledger{fairness}")
    else:
        spent = ", ".join(f"{one_line(n)} {r['epsilon_lifetime_after']:.3f}" for n, r in report["agencies"].items())
        out.print(
            "[red]the job would stop before "
            + (f"iteration {stops['iteration']}" if stops["iteration"] else "the Hessian release")
            + "[/]: "
            f"{one_line(', '.join(stops['refused_by']))} would refuse it ({one_line(stops['reason'])}); "
            f"lifetime epsilon after the iterations released before: {spent}"
        )


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
    """Score a local labelled file: AUC, accuracy, Brier score, the fairness table, and reasons per household.

    A vertical model (a folder WORKDIR/registry/FEDERATION/vNNNN made by ``agencyfl run``) scores a joined
    file of every agency's columns with each agency's part read from its folder of that workdir, and adds
    coverage of the eligible, mean score and eligible rate at the card's rule, overall and for the
    households every agency holds (``agencyfl.vertical.evaluate``).
    """
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
        f"AUC {_share(report['auc'])}, accuracy {_share(report['accuracy'])}, "
        f"Brier {_share(report['brier'])} ({report['scored']} rows scored, {report['quarantined']} quarantined)"
    )
    vertical = report.get("topology") == "vertical"
    if vertical:
        print_vertical_figures(report)
    if result.fairness is not None:
        verdict = "pass" if result.fairness["passed"] else "FAIL: " + "; ".join(result.fairness["failures"])
        out.print(f"fairness at threshold {result.fairness['threshold']:g}: {one_line(verdict)}")
        if vertical:
            out.print("  (the table: --format json, under fairness)")
        else:
            out.print(f"  (the table: agencyfl audit fairness --model {one_line(model)} --data {one_line(data)})")
    if out_file is not None:
        what = "decisions (scores, decisions, who holds each household)" if vertical else "decisions with reasons"
        out.print(f"{what}: {one_line(out_file)}")


def _share(value: float | None) -> str:
    """A figure to 4 decimals; None (undefined: e.g. no eligible household) as n/a."""
    return "n/a" if value is None else f"{value:.4f}"


def print_vertical_figures(report: dict[str, Any]) -> None:
    """A vertical evaluation's figures at the decision rule, for all scored households and the complete ones."""
    complete = report["complete"]
    rule = f"threshold {report['threshold']:g}" + (" with per-group thresholds" if report["group_thresholds"] else "")
    out.print(
        f"at the card's rule ({rule}): coverage of the eligible {_share(report['coverage_of_eligible'])}, "
        f"mean score {_share(report['mean_score'])}, eligible rate {_share(report['eligible_rate'])}"
    )
    out.print(
        f"complete households (held by every agency, {complete['households']}): AUC {_share(complete['auc'])}, "
        f"coverage of the eligible {_share(complete['coverage_of_eligible'])}, mean score "
        f"{_share(complete['mean_score'])}, eligible rate {_share(complete['eligible_rate'])}"
    )
    held = ", ".join(f"{one_line(name)} {count}" for name, count in report["held"].items())
    out.print(f"households each agency holds: {held}")
