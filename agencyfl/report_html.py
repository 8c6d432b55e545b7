"""The auditor's report as one self-contained HTML file: plots inline (SVG), no scripts, no network.

Sections: the verdict, each agency's spend (epsilon over its ledger entries, jobs marked, against its
per-job cap and lifetime budget), its epsilons recomputed independently by Google's dp_accounting (RDP
and PLD, beside ours) with any ``epsilon`` finding, refusals, the coordinator's chain and the
cross-check, model versions with the epsilon behind each, and every finding.
"""

from __future__ import annotations

import io
import re
from html import escape
from typing import TYPE_CHECKING, Any

from agencyfl.privacy.independent import RDP_TOLERANCE

if TYPE_CHECKING:
    from agencyfl.privacy.audit import AgencyAudit, FederationAudit
    from agencyfl.privacy.ledger import Finding

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:70rem;color:#1b1b1b}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0}th,td{padding:.3rem .6rem;border:1px solid #ddd;text-align:left}
th{background:#f3f3f3}.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}
.verdict{padding:.8rem 1rem;border-radius:.4rem;font-size:1.1rem}.verdict.ok{background:#e6f4ea}
.verdict.bad{background:#fde8e8}.note{color:#8a6d00}figure{margin:1rem 0}code{font-size:.9em}
"""


def _status(ok: bool, good: str = "verified", bad: str = "NOT VERIFIED") -> str:
    return f'<span class="{"ok" if ok else "bad"}">{good if ok else bad}</span>'


def spend_plot_svg(row: AgencyAudit) -> str:
    """Epsilon after each ledger entry (lifetime and per job) against the caps, as inline SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plt.rcParams["svg.fonttype"] = "none"  # real text in the SVG: searchable, readable by screen readers
    fig, ax = plt.subplots(figsize=(8, 3.2))
    timeline = row.timeline
    xs = list(range(1, len(timeline) + 1))
    ax.plot(xs, [t["epsilon_lifetime"] for t in timeline], marker="o", ms=3, label="lifetime epsilon (enforced)")
    ax.plot(xs, [t["epsilon_job"] for t in timeline], marker=".", ms=3, ls="--", label="epsilon of the job")
    if timeline:
        ax.step(xs, [t["budget"] for t in timeline], where="mid", color="#b42318", label="lifetime budget")
        ax.step(xs, [t["epsilon_job_cap"] for t in timeline], where="mid", color="#e08a00", ls=":", label="per-job cap")
        refused = [(x, t["epsilon_lifetime"]) for x, t in zip(xs, timeline, strict=True) if t["kind"] == "refusal"]
        if refused:
            rx, ry = zip(*refused, strict=True)
            ax.scatter(rx, ry, marker="x", color="#b42318", s=40, zorder=3, label="refused round")
        starts = [x for x, t, p in zip(xs[1:], timeline[1:], timeline, strict=False) if t["job"] != p["job"]]
        for x in starts:
            ax.axvline(x - 0.5, color="#999", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ledger entry (vertical lines: a new job)")
    ax.set_ylabel("epsilon")
    ax.set_title(f"{row.agency}: privacy spent")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.DOTALL)  # creator/date RDF: noise here
    return svg[svg.index("<svg") :]  # drop the XML prolog: the SVG sits inside HTML


def _finding_item(party: str, f: Finding) -> str:
    return f'<li class="bad" data-kind="{f.kind}">{escape(party)}: {escape(f.kind)}: {escape(f.message)}</li>'


_INDEPENDENT = (("epsilon_last_job", "last job"), ("epsilon_lifetime", "lifetime"))


def _independent_table(row: AgencyAudit) -> str:
    """Each headline epsilon beside dp_accounting's RDP and PLD recomputation, and the ``epsilon`` findings."""
    cells = []
    for key, label in _INDEPENDENT:
        figures = row.independent.get(key)
        if figures is None:
            continue
        what = f"{label} ({escape(row.last_job)})" if key == "epsilon_last_job" and row.last_job else label
        cells.append(
            f'<tr data-figure="{key}"><td>{what}</td><td>{figures["ours"]:.4f}</td><td>{figures["ours_rdp"]:.4f}</td>'
            f"<td>{figures['dp_accounting_rdp']:.4f}</td><td>{figures['dp_accounting_pld']:.4f}</td></tr>"
        )
    table = (
        '<table class="independent"><tr><th>epsilon</th><th>ours (enforced)</th><th>ours, RDP</th>'
        f"<th>dp_accounting RDP</th><th>dp_accounting PLD</th></tr>{''.join(cells)}</table>"
        if cells
        else "<p>Nothing to recompute.</p>"
    )
    findings = [f for f in row.findings if f.kind == "epsilon"]
    verdict = (
        f'<ul class="epsilon-findings">{"".join(_finding_item(row.agency, f) for f in findings)}</ul>'
        if findings
        else (
            f'<p class="ok">Agrees: dp_accounting\'s RDP within {RDP_TOLERANCE:g} (relative) of ours, its PLD '
            "(the tighter bound) not above ours.</p>"
        )
    )
    return f"<h4>Independent recomputation (Google dp_accounting)</h4>{table}{verdict}"


def _agency_section(row: AgencyAudit) -> str:
    refusals = [t for t in row.timeline if t["kind"] == "refusal"]
    refusal_rows = "".join(
        f"<tr><td>{escape(t['job'])}</td><td>{t['round']}</td><td>{escape(t['reason'] or '')}</td>"
        f"<td>{escape(t['time'])}</td></tr>"
        for t in refusals
    )
    refusal_table = (
        f"<table><tr><th>job</th><th>round</th><th>reason</th><th>time</th></tr>{refusal_rows}</table>"
        if refusals
        else "<p>No refusals.</p>"
    )
    return (
        f'<section class="agency" data-agency="{escape(row.agency)}"><h3>{escape(row.agency)}</h3>'
        f"<figure>{spend_plot_svg(row)}</figure>{_independent_table(row)}<h4>Refusals</h4>{refusal_table}</section>"
    )


def _summary_table(audit: FederationAudit) -> str:
    rows = "".join(
        f'<tr data-agency="{escape(r.agency)}"><td>{escape(r.agency)}</td>'
        f"<td>{r.epsilon_last_job:.3f}</td><td>{r.epsilon_lifetime:.3f}</td><td>{r.epsilon_lifetime_prv:.3f}</td>"
        f"<td>{'' if r.budget is None else f'{r.budget:g}'}</td><td>{r.rounds_total}</td><td>{r.jobs}</td>"
        f"<td>{r.refusals}</td><td><code>{escape(r.key_id)}</code></td>"
        f'<td class="status">{_status(r.verified)}</td>'
        f'<td class="budget">{_status(r.within_budget, "within budget", "OVER BUDGET")}</td></tr>'
        for r in audit.agencies
    )
    return (
        "<table><tr><th>agency</th><th>epsilon, last job</th><th>lifetime epsilon (enforced)</th>"
        "<th>lifetime (PRV)</th><th>budget</th><th>rounds</th><th>jobs</th><th>refusals</th><th>key</th>"
        f"<th>ledger</th><th>caps</th></tr>{rows}</table>"
    )


def _coordinator_section(audit: FederationAudit) -> str:
    c = audit.coordinator
    if c is None:
        return "<p>The coordinator's chain was not given: no cross-check.</p>"
    cross = (
        '<p class="ok">Every round the coordinator countersigned matches the agencies\' ledgers.</p>'
        if not audit.cross
        else f'<p class="bad">{len(audit.cross)} disagreement(s) between the chains (see findings).</p>'
    )
    return (
        f'<p id="coordinator-status">Chain <code>{escape(c.ledger)}</code>, key <code>{escape(c.key_id)}</code>: '
        f"{_status(c.verified)}; {c.rounds} round entries over {len(c.jobs)} job(s).</p>{cross}"
    )


def _models_section(models: list[dict[str, Any]], audit: FederationAudit) -> str:
    if not models:
        return "<p>No registry given (<code>--registry</code>).</p>"
    signed = set()
    if audit.coordinator is not None:
        signed = {e.model_sha256 for e in audit.coordinator.entries}
    rows = []
    for card in models:
        eps = ", ".join(f"{escape(a['name'])} {a['epsilon']:.3f}" for a in card.get("agencies", []))
        digest = str(card.get("model_sha256", ""))
        linked = "yes" if digest in signed else ("no chain given" if audit.coordinator is None else "NOT IN CHAIN")
        auc = card.get("metrics", {}).get("auc")
        rows.append(
            f"<tr><td>{escape(str(card.get('model_version')))}</td><td>{escape(str(card.get('job')))}</td>"
            f"<td>{escape(str(card.get('created')))}</td><td>{eps}</td>"
            f"<td>{'' if auc is None else f'{auc:.3f}'}</td><td><code>{escape(digest[:16])}</code></td>"
            f"<td>{linked}</td></tr>"
        )
    return (
        "<table><tr><th>model version</th><th>job</th><th>created</th><th>epsilon per agency (job)</th>"
        "<th>AUC</th><th>model hash</th><th>countersigned</th></tr>" + "".join(rows) + "</table>"
    )


def _uses_section(uses: dict[str, Any] | None) -> str:
    if uses is None:
        return "<p>No uses ledgers given (<code>--uses WORKDIR</code>).</p>"
    rows = "".join(
        f'<tr data-use="{escape(u["kind"])}"><td>{escape(u["time"])}</td><td>{escape(u["party"])}</td>'
        f"<td>{escape(u['kind'])}</td><td>{escape(u['model_version'])}</td><td>{escape(u['purpose'])}</td>"
        f"<td>{escape(u['screening'])}</td><td>{u['households']:,}</td></tr>"
        for u in uses["uses"]
    )
    state = _status(uses["verified"], "every uses ledger verified", "FINDINGS BELOW")
    return (
        f"<p>{state}</p><table><tr><th>time</th><th>party</th><th>kind</th><th>model</th><th>purpose</th>"
        f"<th>screening</th><th>households</th></tr>{rows}</table>"
    )


def render_report(
    audit: FederationAudit,
    models: list[dict[str, Any]],
    exit_code: int,
    verdict: str,
    uses: dict[str, Any] | None = None,
) -> str:
    """The whole report as an HTML document (with every use of every model when ``uses`` is given)."""
    ok = exit_code == 0
    findings = audit.all_findings()
    finding_items = "".join(_finding_item(party, f) for party, f in findings)
    notes = "".join(f'<li class="note">{escape(n)}</li>' for n in audit.notes)
    agencies = "".join(_agency_section(r) for r in audit.agencies)
    verdict_text = "All ledgers verified, no cap exceeded." if ok else f"Exit code {exit_code}: {verdict}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>agencyfl privacy audit</title>
<style>{_STYLE}</style></head><body>
<h1>Privacy budget audit</h1>
<p id="verdict" class="verdict {"ok" if ok else "bad"}">{escape(verdict_text)}</p>
<p>Epsilon is recomputed from each ledger's recorded mechanisms by the accountant enforcement uses: an RDP
bound, or, when every release is a Gaussian without sampling (a vertical job's), the exact Gaussian-DP figure
where it is smaller (both hold; the least is enforced); PRV is a numerical estimate, shown beside it. Each
agency's epsilons are recomputed again by an accountant we did not write (Google's dp_accounting, RDP and
PLD): a disagreement beyond the stated tolerances is an <code>epsilon</code> finding.</p>
<h2>Agencies</h2>{_summary_table(audit)}
<h2>Coordinator's countersigned chain</h2>{_coordinator_section(audit)}
<h2>Model versions</h2>{_models_section(models, audit)}
<h2>Every use of every model</h2>{_uses_section(uses)}
<h2>Findings</h2>{f'<ul id="findings">{finding_items}</ul>' if findings else '<p id="findings">None.</p>'}
{f"<ul>{notes}</ul>" if notes else ""}
<h2>Spend over rounds and jobs</h2>{agencies}
</body></html>
"""
