"""A caseworker's worklist as one self-contained HTML page: plots inline (SVG), no scripts, no network.

The page takes the report dict the screening code builds (the screening id, the model version, the counts,
every listed household with its score, cutoff, group, change since a previous worklist and the reasons its
agencies disclose) and shows: a header saying that nothing here changes anyone's enrolment, what was
screened, the comparison with the previous worklist, which agency discloses reasons at which level, one
section per category (what it asks of the caseworker and its households, sorted for the work), the
households that left the lists, and score distributions overall and by group with the threshold marked.
"""

from __future__ import annotations

import heapq
import io
import re
import threading
from collections.abc import Callable
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC",sans-serif;margin:2rem auto;max-width:80rem;
color:#1b1b1b;padding:0 1rem}h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0}th,td{padding:.3rem .6rem;border:1px solid #ddd;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.decide{padding:.8rem 1rem;border-radius:.4rem;font-size:1.15rem;font-weight:600;background:#e8f0fe;
border-left:.4rem solid #1a56db}.ask{padding:.5rem .8rem;background:#fff8e1;border-left:.3rem solid #e08a00}
.empty{padding:.5rem .8rem;background:#f3f3f3;font-style:italic}.mark{font-weight:600;padding:0 .3rem;
border-radius:.2rem}.mark.new{background:#e6f4ea;color:#1a7f37}.mark.changed{background:#fde8e8;color:#b42318}
.mark.unchanged{color:#666}.review.open{font-weight:600;color:#b42318}.reasons{margin:0;padding-left:1rem}
.muted{color:#666}figure{margin:1rem 0}figure svg{max-width:100%;height:auto}code{font-size:.9em}
"""

# key, Chinese name, plain English label, who is on the list, what the list asks of the caseworker
_CATEGORIES: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "invite", "邀请申请", "Invite to apply or visit",
        "Households likely eligible and not enrolled (漏保 candidates).",
        "Contact the household and invite it to apply or visit. Eligibility is decided by the normal "
        "assessment, not by the score.",
    ),
    (
        "review-enrolment", "复核", "Review with the household",
        "Enrolled households likely ineligible (错保 candidates).",
        "Review the case with the household. The household is notified and may respond before anything "
        "changes; the allowance is not stopped by this list.",
    ),
    (
        "human-review", "人工复核", "Near the threshold: human review",
        "Households whose score is within the review band of their threshold.",
        "A caseworker looks at the case: the model is not confident.",
    ),
)  # fmt: skip

_ORDER: dict[str, Callable[[dict[str, Any]], tuple[float, str]]] = {
    "invite": lambda r: (-float(r["score"]), str(r["household"])),  # highest score first
    "review-enrolment": lambda r: (float(r["score"]), str(r["household"])),  # lowest score first
    "human-review": lambda r: (abs(float(r["score"]) - float(r["cutoff"])), str(r["household"])),  # closest first
}

_LEVELS = {
    "none": "no reasons from this agency",
    "agency": "the agency's total contribution to the score",
    "feature": "the contributions of the agency's individual features",
}
_CAUSES = {
    "facts": "the household's records changed",
    "model": "the model changed",
    "facts and model": "the household's records and the model changed",
}


def _name(category: str, labels: dict[str, str]) -> str:
    """The bilingual name of a category (``labels`` may override the plain English label)."""
    for key, chinese, english, _, _ in _CATEGORIES:
        if key == category:
            return f'<span lang="zh-Hans">{chinese}</span> / {escape(str(labels.get(key, english)))}'
    return escape(category)


def _review(status: str | None) -> str:
    if status is None:
        return ""
    if status == "open":
        return '<span class="review open" data-review="open">open review</span>'
    return f'<span class="review" data-review="{escape(status)}">{escape(status.replace("-", " "))}</span>'


def _change(row: dict[str, Any], labels: dict[str, str]) -> str:
    change = row.get("change")
    if change is None:
        return ""
    text = f'<span class="mark {escape(change)}" data-change="{escape(change)}">{escape(change)}</span>'
    if change == "changed" and row.get("previous_category"):
        text += f" from {_name(str(row['previous_category']), labels)}"
    cause = row.get("cause")
    if cause:
        gloss = _CAUSES.get(cause, "")
        text += f'<br><span class="cause" data-cause="{escape(cause)}" title="{escape(gloss)}">cause: {escape(cause)}'
        text += f" ({escape(gloss)})</span>" if gloss else "</span>"
    return text


def _row(row: dict[str, Any], labels: dict[str, str], compare: bool) -> str:
    household = escape(str(row["household"]))
    group = "; ".join(f"{escape(str(k))}: {escape(str(v))}" for k, v in (row.get("group") or {}).items())
    reasons = row.get("reasons") or []
    reason_html = (
        '<ul class="reasons">'
        + "".join(
            f'<li data-agency="{escape(str(r.get("agency", "")))}" data-level="{escape(str(r.get("level", "")))}">'
            f"{escape(str(r.get('text', '')))}</li>"
            for r in reasons
        )
        + "</ul>"
        if reasons
        else '<span class="muted">none disclosed</span>'
    )
    change = f"<td>{_change(row, labels)}</td>" if compare else ""
    return (
        f'<tr data-household="{household}"><td><code>{household}</code></td>'
        f'<td class="num score">{float(row["score"]):.2f}</td><td class="num">{float(row["cutoff"]):.2f}</td>'
        f"<td>{'yes' if row.get('enrolled') else 'no'}</td><td>{group}</td>{change}"
        f"<td>{_review(row.get('review_status'))}</td><td>{reason_html}</td></tr>"
    )


def _category_section(
    key: str, rows: list[dict[str, Any]], count: int, report: dict[str, Any], labels: dict[str, str]
) -> str:
    who, ask = next((c[3], c[4]) for c in _CATEGORIES if c[0] == key)
    if key == "human-review":
        who += f" (within &plusmn;{float(report['review_band']):.2f})"
    compare = report.get("since") is not None
    if rows:
        body = "".join(_row(r, labels, compare) for r in sorted(rows, key=_ORDER[key]))
        head = "<th>since previous worklist</th>" if compare else ""
        table = (
            "<table><tr><th>household</th><th>score</th><th>cutoff</th><th>enrolled</th><th>group</th>"
            f"{head}<th>review</th><th>reasons</th></tr>{body}</table>"
        )
        shown = "" if len(rows) == count else f" ({len(rows):,} listed here; the full list is in worklist.csv)"
    else:
        table, shown = '<p class="empty">No households on this list.</p>', ""
    return (
        f'<section class="category" data-category="{key}"><h2>{_name(key, labels)}: '
        f'<span class="count">{count:,}</span>{shown}</h2><p>{who}</p>'
        f'<p class="ask"><strong>What this asks of you:</strong> {ask}</p>{table}</section>'
    )


def _since_section(report: dict[str, Any], rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    since = report.get("since")
    if since is None:
        return '<p id="since">No comparison with a previous worklist.</p>'
    counted = since.get("changes")  # the whole list's (the page may show only its top rows)
    changes = counted or {c: sum(1 for r in rows if r.get("change") == c) for c in ("new", "changed", "unchanged")}
    left = report.get("left") or []
    model_note = (
        f" The model changed since then (it was <code>{escape(str(since.get('model_version')))}</code>)."
        if since.get("model_version") != report.get("model_version")
        else " Same model version."
    )
    left_rows = "".join(
        f'<tr data-household="{escape(str(h["household"]))}"><td><code>{escape(str(h["household"]))}</code></td>'
        f"<td>{_name(str(h.get('previous_category')), labels)}</td><td>{_review(h.get('review_status'))}</td></tr>"
        for h in left
    )
    left_table = (
        f'<table id="left"><tr><th>household</th><th>was on</th><th>review</th></tr>{left_rows}</table>'
        if left
        else '<p id="left" class="empty">No household left the lists.</p>'
    )
    summary = ", ".join(f'<span data-change-count="{c}">{n:,} {c}</span>' for c, n in changes.items())
    return (
        f'<p id="since">Compared with the worklist <code>{escape(str(since.get("worklist")))}</code> of '
        f"{escape(str(since.get('created')))}: {summary}; "
        f'<span data-left-count="{len(left)}">{len(left):,} left the lists</span>.{model_note}</p>'
        f"<h3>Households that left the lists</h3>{left_table}"
    )


_RC_LOCK = threading.Lock()
"""``rc_context`` sets matplotlib's global rcParams and restores them on exit: one figure at a time, since a
screening draws its page's figures on a thread of its own."""


def _svg(fig: Figure) -> str:
    import matplotlib

    buffer = io.StringIO()
    fig.tight_layout()
    with _RC_LOCK, matplotlib.rc_context({"svg.fonttype": "none"}):  # real text in the SVG: searchable, read aloud
        fig.savefig(buffer, format="svg")
    svg = re.sub(r"<metadata>.*?</metadata>", "", buffer.getvalue(), flags=re.DOTALL)
    return svg[svg.index("<svg") :]  # drop the XML prolog: the SVG sits inside HTML


def _mark_threshold(ax: Axes, threshold: float, band: float) -> None:
    ax.axvspan(threshold - band, threshold + band, color="#e08a00", alpha=0.15, zorder=0, label="review band")
    ax.axvline(threshold, color="#b42318", lw=1.5, label=f"threshold {threshold:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")


def score_plots(report: dict[str, Any]) -> str:
    """One histogram of every household scored, and one per group attribute (share of each group per bin):
    SVG figures from the report's ``groups``, ``threshold`` and ``review_band``."""
    groups = report.get("groups") or {}
    bins = [float(b) for b in groups.get("bins") or []]
    if len(bins) < 2:
        return "<p>No score distributions in this report.</p>"
    # matplotlib's object API, not pyplot: no global figure registry or backend switch in the caller's
    # process (a notebook keeps its own), and a third less to import
    from matplotlib.figure import Figure

    threshold, band = float(report["threshold"]), float(report["review_band"])
    lefts, widths = bins[:-1], [b - a for a, b in zip(bins[:-1], bins[1:], strict=True)]
    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    ax.bar(lefts, groups.get("overall") or [0] * len(lefts), width=widths, align="edge", color="#6b8fd6")
    _mark_threshold(ax, threshold, band)
    ax.set_ylabel("households")
    ax.set_title("All households scored")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    figures = [f'<figure data-plot="overall">{_svg(fig)}<figcaption>Scores of all households scored.</figcaption>']
    for attribute, spec in (groups.get("attributes") or {}).items():
        members = spec.get("groups") or {}
        fig = Figure(figsize=(8, 3))
        ax = fig.subplots()
        step = 1 / max(len(members), 1)
        for i, (name, counts) in enumerate(members.items()):
            total = sum(counts) or 1
            offsets = [a + w * i * step for a, w in zip(lefts, widths, strict=True)]
            shares = [100 * c / total for c in counts]
            ax.bar(offsets, shares, width=[w * step for w in widths], align="edge", label=f"{name} (n={sum(counts):,})")
        _mark_threshold(ax, threshold, band)
        ax.set_ylabel("% of the group")
        ax.set_title(f"{attribute}: {spec.get('label', attribute)}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        figures.append(
            f'<figure data-plot="{escape(str(attribute))}">{_svg(fig)}<figcaption>Scores by '
            f"{escape(str(spec.get('label', attribute)))}, as a share of each group's households.</figcaption>"
        )
    return "</figure>".join(figures) + "</figure>"


def top_rows(rows: list[dict[str, Any]], per_category: int) -> list[dict[str, Any]]:
    """The first ``per_category`` rows of each list in the page's order (the whole list stays in the CSV)."""
    by_category: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in _CATEGORIES}
    for r in rows:
        by_category.get(r["category"], []).append(r)
    out: list[dict[str, Any]] = []
    for key, listed in by_category.items():  # nsmallest is sorted(...)[:n], without sorting a whole list
        out += heapq.nsmallest(per_category, listed, key=_ORDER[key])
    return out


def render_worklist_html(report: dict[str, Any], plots: str | None = None) -> str:
    """Render a screening's worklist as one self-contained HTML page for caseworkers.

    Parameters
    ----------
    report : dict[str, Any]
        The screening report: its id, model version, counts, listed ``rows`` (each household's category,
        score, cutoff, group, change since a previous worklist and disclosed reasons), ``left``, ``since``,
        score distributions in ``groups``, each agency's ``disclosures`` level and optional ``labels``
        overriding the plain English category labels.
    plots : str, optional
        ``score_plots(report)`` when the caller has drawn them already (a screening draws them while it
        builds the worklist's rows).

    Returns
    -------
    str
        The HTML document: inline CSS and SVG only, nothing to fetch, every provided string escaped.
    """
    labels = {str(k): str(v) for k, v in (report.get("labels") or {}).items()}
    rows: list[dict[str, Any]] = list(report.get("rows") or [])
    counts = report.get("counts") or {}
    by_category: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in _CATEGORIES}
    for row in rows:
        by_category.setdefault(str(row["category"]), []).append(row)
    count = {key: int(counts.get(key, len(by_category[key]))) for key, *_ in _CATEGORIES}
    count_rows = "".join(
        f'<tr data-count="{key}"><td>{_name(key, labels)}</td><td class="num count">{count[key]:,}</td></tr>'
        for key, *_ in _CATEGORIES
    )
    disclosures = "".join(
        f'<tr data-agency="{escape(str(a))}"><td>{escape(str(a))}</td><td>{escape(str(level))}</td>'
        f"<td>{escape(_LEVELS.get(str(level), ''))}</td></tr>"
        for a, level in (report.get("disclosures") or {}).items()
    )
    disclosures = (
        f'<table id="disclosures"><tr><th>agency</th><th>level</th><th>what is shown</th></tr>{disclosures}</table>'
        if disclosures
        else '<p id="disclosures">No agency discloses reasons.</p>'
    )
    about = "".join(
        f"<tr><th>{label}</th><td>{value}</td></tr>"
        for label, value in (
            ("screening", f"<code>{escape(str(report.get('screening')))}</code>"),
            ("created", escape(str(report.get("created")))),
            ("federation", escape(str(report.get("federation")))),
            ("purpose", escape(str(report.get("purpose")))),
            ("model version", f"<code>{escape(str(report.get('model_version')))}</code>"),
            ("requested by", escape(str(report.get("requester")))),
            ("households scored", f'<span id="households-scored">{int(report.get("households_scored", 0)):,}</span>'),
            ("threshold", f"{float(report['threshold']):.2f} (review band &plusmn;{float(report['review_band']):.2f})"),
        )
    )
    sections = "".join(_category_section(k, by_category[k], count[k], report, labels) for k, *_ in _CATEGORIES)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Worklist {escape(str(report.get("screening")))}</title>
<style>{_STYLE}</style></head><body>
<h1>Worklist <span lang="zh-Hans">工作清单</span></h1>
<p id="people-decide" class="decide">No enrolment is changed by this page or by any command: people decide.
The lists below ask caseworkers to look at households; every decision follows the normal assessment.</p>
<table id="about">{about}</table>
<h2>Counts</h2><table id="counts"><tr><th>list</th><th>households</th></tr>{count_rows}</table>
<h2>Since the previous worklist</h2>{_since_section(report, rows, labels)}
<h2>Reasons each agency discloses</h2>{disclosures}
{sections}
<h2>Score distributions</h2>{score_plots(report) if plots is None else plots}
</body></html>
"""
