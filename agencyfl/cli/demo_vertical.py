"""The cross-agency story of `agencyfl demo`: one population, facts split across agencies, policy finds people.

Synthetic population (civil affairs' register, HRSS, tax, environment, benefit rosters), private
alignment, vertical DP training under CKKS, an encrypted screening of the whole register with
worklists, the duplicate check, and the audit. The synthetic truth is read only to tell the
coordinator how good the lists are: no party's command reads it.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agencyfl.cli.common import err, errors_to_exit, out
from agencyfl.cli.training import released_auc_text

STEWARD_CHOICES = {"tax": ("agency", 0.5), "environment": ("feature", 0.5)}
"""What the demo's stewards chose to disclose for listed households (HRSS keeps the default: nothing)."""


def _truth(data: Path) -> dict[str, dict[str, str]]:
    with (data / "truth" / "households.csv").open(newline="") as fh:
        return {r["head_id"]: r for r in csv.DictReader(fh)}


def _canonical(raw: str) -> str:
    from agencyfl.federation.resident_id import InvalidResidentId, normalize

    try:
        return normalize(raw)
    except InvalidResidentId:
        return ""


def _opt_in(spec: Path) -> None:
    text = spec.read_text()
    for agency, (level, share) in STEWARD_CHOICES.items():
        text = text.replace(f'name = "{agency}"\n', f'name = "{agency}"\nexplain = "{level}"\nexplain_max = {share}\n')
    spec.write_text(text)


def vertical_demo(workdir: Path, households: int, seed: int, rounds: int) -> dict[str, Any]:
    """Run the cross-agency flow in ``workdir``; returns what the coordinator is told (also printed)."""
    from agencyfl.alignment.runs import duplicates_from_spec, load_vertical, read_ids
    from agencyfl.screening.audit import audit_uses
    from agencyfl.screening.run import screen_eligible
    from agencyfl.server.tokens import TokenStore
    from agencyfl.synth_vertical import ROSTERS, synthesize_vertical
    from agencyfl.vertical.job import run_vertical

    start = time.time()
    data, work = workdir / "data", workdir / "work"
    out.rule("1. one population, its facts split across four agencies (synthetic)")
    population = synthesize_vertical(data, households=households, seed=seed, rounds=rounds)
    _opt_in(population.spec)
    for name, path in population.agency_files.items():
        out.print(f"  {name:<14} {population.rows[name]:>7,} households  {path.name}")
    out.print(f"  rosters: {', '.join(ROSTERS)}; spec: {population.spec}")
    with errors_to_exit():
        loaded = load_vertical(population.spec)
        out.rule("2. private alignment, then DP training under encryption (records never leave an agency)")
        columns = (
            TextColumn("iteration"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("train", total=loaded.spec.training.rounds)
            summary = run_vertical(loaded, work, on_iteration=lambda done, _t: bar.update(task, completed=done))
        out.print(f"  register {summary['alignment']['register']:,} households; matched "
                  + ", ".join(f"{k} {v:,}" for k, v in summary["alignment"]["matched"].items()))  # fmt: skip
        out.print(f"  {summary['rounds_aggregated']} iterations, {released_auc_text(summary)}; "
                  f"model {summary['model_version']}")  # fmt: skip
        out.rule("3. screening the whole register: only civil affairs sees the scores")
        token = TokenStore(work / "coordinator" / "tokens.json").issue("civil-affairs", ("eligibility-identification",))
        with out.status("screening", spinner="dots") as status:
            screened = screen_eligible(loaded, work, Path(summary["registry"]), workdir / "worklists", token=token,
                                       realign=False, progress=status.update)  # fmt: skip
    truth = _truth(data)
    rows = screened.rows
    invite = [r for r in rows if r["category"] == "invite"]
    review = [r for r in rows if r["category"] == "review-enrolment"]
    missed = [h for h, t in truth.items() if t["split"] == "register" and t["eligible"] == "1" and t["enrolled"] == "0"]
    wrong = [h for h, t in truth.items() if t["split"] == "register" and t["eligible"] == "0" and t["enrolled"] == "1"]
    found = sum(1 for r in invite if truth.get(r["household"], {}).get("eligible") == "1")
    caught = sum(1 for r in review if truth.get(r["household"], {}).get("eligible") == "0")
    out.print(f"  invite to apply (漏保 candidates): {len(invite):,} households, {found:,} truly eligible "
              f"({found / max(len(invite), 1):.0%}); {len(missed):,} eligible households are not enrolled")  # fmt: skip
    out.print(f"  review with the household (错保 candidates): {len(review):,} enrolled households, {caught:,} truly "
              f"ineligible; {len(wrong):,} enrolled households are not eligible")  # fmt: skip
    out.print(f"  near the threshold, for a person to look at: {screened.report['counts']['human-review']:,}")
    out.rule("4. duplicate enrolment (重复保): each roster owner learns only its own duplicates")
    with errors_to_exit():
        rosters = {name: loaded.roster_path(name) for name in ROSTERS}
        duplicates, _ = duplicates_from_spec(loaded, rosters, workdir / "duplicates", requested_by="coordinator")
        uses = audit_uses(work)
    with (data / "truth" / "duplicates.csv").open(newline="") as fh:
        planted = {r["head_id"] for r in csv.DictReader(fh)}
    flagged = set()
    for name, path in rosters.items():  # each owner's review rows are rows of its own roster
        ids = [_canonical(i) for i in read_ids(path, loaded.spec.alignment.id_column)]
        flagged |= {ids[item.row] for item in duplicates.review[name]}
    told = {
        "invite": len(invite), "invite_truly_eligible": found, "eligible_not_enrolled": len(missed),
        "review": len(review), "review_truly_ineligible": caught, "wrongly_enrolled": len(wrong),
        "human_review": screened.report["counts"]["human-review"], "duplicates_planted": len(planted),
        "duplicates_found": len(flagged & planted), "duplicates_flagged": len(flagged),
        "epsilon": {name: row["epsilon_job"] for name, row in summary["agencies"].items()},
        "uses_verified": not uses.findings, "worklist": screened.files["worklist_html"], "seconds": time.time() - start,
    }  # fmt: skip
    out.print(f"  duplicate check: {len(flagged):,} households flagged for review, {len(flagged & planted):,} of the "
              f"{len(planted):,} planted duplicate enrolments")  # fmt: skip
    out.rule("5. the audit")
    for name, eps in told["epsilon"].items():
        out.print(f"  {name:<14} epsilon {eps:.3f} for this job")
    out.print(
        f"  every use of the model on the record, each ledger verified: {'yes' if told['uses_verified'] else 'NO'}"
    )
    out.print(f"""
[bold]What happened[/] ({told["seconds"]:.0f} s, {households:,} households)
- Agencies found their common households without showing each other their lists (DH-PSI).
- One model was trained across agencies: each kept its own columns and its own block of weights;
  every gradient release was noised under encryption and accounted in every agency's ledger first.
- Civil affairs screened its register: agencies encrypted their partial scores under its key, the
  coordinator added ciphertexts it cannot read; tax and environment chose to give reasons for listed
  households (recorded in their ledgers); HRSS chose not to.
- Nothing changed anyone's benefit: the worklists ask caseworkers to invite, review with the household
  (who is heard first), or look again. Open the page: {told["worklist"]}

Next: agencyfl audit uses {work}
      agencyfl screen record-outcome --workdir {work} --household ID --outcome confirmed-invited
      agencyfl screen eligible --workdir {work} --model {summary["registry"]} --out NEXT \\
          --since {screened.files["worklist_csv"]} --token ...   (a token: agencyfl coordinator issue-token)""")
    return told
