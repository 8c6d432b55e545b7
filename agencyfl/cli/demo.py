"""`agencyfl demo`: the cross-agency flow (vertical, the default) or the regional bureaus' (horizontal)."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from agencyfl.cli.audit import audit_rows
from agencyfl.cli.common import (
    app,
    errors_to_exit,
    out,
)
from agencyfl.cli.training import evaluate_file, print_run, run_with_progress
from agencyfl.exit_codes import ExitCode


class Topology(StrEnum):
    """Which story the demo tells."""

    vertical = "vertical"
    horizontal = "horizontal"


# ---------------------------------------------------------------- demo
@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the demo's data, ledgers and models")] = Path(
        "agencyfl-demo"
    ),
    households: Annotated[int, typer.Option(min=1000, help="Population size")] = 20000,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Training rounds / iterations (default: 30 vertical, 10 horizontal)"),
    ] = None,
    topology: Annotated[
        Topology, typer.Option(help="vertical: agencies hold different facts of the same households (the default)")
    ] = Topology.vertical,
) -> None:
    """The cross-agency story: split facts, private alignment, DP training under encryption, screening, audit.

    ``--topology horizontal`` tells the regional bureaus' story instead (same schema, different households).
    """
    if topology is Topology.vertical:
        from agencyfl.cli.demo_vertical import vertical_demo

        told = vertical_demo(workdir, households, seed, rounds or 30)
        if not told["uses_verified"]:
            raise typer.Exit(int(ExitCode.LEDGER_UNVERIFIED))
        return
    rounds = rounds or 10
    from agencyfl.synth import synthesize

    start = time.time()
    data_dir = workdir / "data"
    out.rule("1. four agencies' records (synthetic)")
    result = synthesize(data_dir, households=households, seed=seed, dirty_rows=6, rounds=rounds)
    for name, path in result.agency_files.items():
        out.print(f"  {name:<14} {result.rows[name]:>6} households  eligible {result.label_rates[name]:.1%}  {path}")
    out.print(f"  held-out test file: {result.test} ({result.rows['test']} households); spec: {result.spec}")
    out.rule("2. federated training with DP-SGD (each agency's records stay in its folder)")
    with errors_to_exit():
        summary = run_with_progress(result.spec, workdir / "work", quiet=False)
    print_run(summary)
    out.rule("3. the model on the held-out test file")
    with errors_to_exit():
        report = evaluate_file(Path(summary["model"]), result.spec, result.test)
    out.print(
        f"  AUC {report['auc']:.4f}, accuracy {report['accuracy']:.4f}, Brier {report['brier']:.4f} "
        f"on {report['scored']} households"
    )
    out.print(
        "  (higher than the pooled validation AUC: test rows have every field, while each agency's\n"
        "   validation rows lack the fields that agency does not hold)"
    )
    out.rule("4. fairness across groups (pooled validation counts; the model card)")
    card = json.loads((Path(summary["model"]) / "card.json").read_text())
    fairness = card.get("fairness")
    if fairness:
        for attribute, block in fairness["attributes"].items():
            tpr = block["gaps"]["tpr"]
            shown = "not judged" if tpr["gap"] is None else f"{tpr['gap']:.3f} ({' vs '.join(tpr['groups'])})"
            verdict = {True: "pass", False: "FAIL", None: "-"}[tpr["passed"]]
            out.print(f"  {attribute:<12} coverage gap {shown}, tolerance {tpr['tolerance']}: {verdict}")
        out.print(f"  model card: {Path(summary['model']) / 'card.md'} (and card.html)")
    out.rule("5. the auditor's report")
    rows = audit_rows([Path(p) for p in summary["ledgers"].values()])
    ok = all(r.verified and r.within_budget for r in rows)
    for r in rows:
        out.print(
            f"  {r.agency:<14} epsilon {r.epsilon_lifetime:.3f} of budget {r.budget:g}  "
            f"chain {'ok' if r.chain_ok and r.head_ok else 'BROKEN'}, signatures {'ok' if r.signatures_ok else 'BAD'}"
        )
    ledgers = " ".join(summary["ledgers"].values())
    chain = summary.get("coordinator_ledger", "")
    out.print(f"""
[bold]What happened[/] ({time.time() - start:.0f} s)
- Each agency checked its file; malformed rows went to *.quarantine.csv beside it (see {data_dir}).
- Each agency trained on its own rows with Opacus DP-SGD (Poisson sampling, clipping, Gaussian noise);
  only model weights and validation histograms left an agency. Noise was calibrated so the
  {summary["rounds_planned"]} rounds stay within epsilon {max(r.epsilon_job_cap or 0 for r in rows):g} per agency.
- Each agency's spend is in its signed, hash-chained ledger; the audit above re-verified them
  {"successfully" if ok else "and FOUND PROBLEMS"}.
- The model and its card: {summary["model"]}

Next: agencyfl audit fairness --model {summary["model"]}
      agencyfl audit verify {ledgers} --coordinator {chain}
      agencyfl audit report {ledgers} --coordinator {chain} --format html --out report.html
      agencyfl evaluate --model {summary["model"]} --spec {result.spec} --data {result.test}""")
    if not ok:
        raise typer.Exit(int(ExitCode.LEDGER_UNVERIFIED))
