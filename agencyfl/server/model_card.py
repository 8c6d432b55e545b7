"""Model cards people read: the registry's ``card.json`` rendered as Markdown and as HTML.

After Mitchell et al. 2019 ("Model Cards for Model Reporting"): what the model is for, the data it
was trained on (agencies, dataset fingerprints, dates), the privacy spent, the metrics, the fairness
table, intended use and known limitations. Every registered model ships ``card.md`` and ``card.html``
beside ``card.json``.
"""

from __future__ import annotations

from html import escape
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

INTENDED_USE = (
    "Screening support for {purpose}: the model ranks households for a caseworker's attention, to find "
    "eligible households the programme misses and to flag records for review. A person decides; no "
    "household is refused by a score alone (scores near the threshold are flagged for review)."
)

LIMITATIONS = [
    "Trained on each agency's records as they stand: fields an agency does not hold are missing for its "
    "rows, and under-reported or mis-recorded values (income, assets) bias the scores of the households "
    "they concern.",
    "Metrics and the fairness table come from the agencies' validation splits, pooled; they are as "
    "representative as the agencies' caseloads, not of the whole population.",
    "Differential privacy bounds what the model reveals about any one household's record at each agency "
    "(epsilon below); it does not protect group-level facts, and it costs some accuracy.",
    "A gap within tolerance in the fairness table is judged only between groups with enough rows; small "
    "groups are reported with wide intervals and not judged.",
]


DISCLOSURE_TEXT = {
    "none": "nothing (default)",
    "agency": "its own contribution to the score, for households on a worklist (recorded in its ledger)",
    "feature": "its inputs that moved the score most, for households on a worklist (recorded in its ledger)",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CardAgency(_Frozen):
    """One agency's part in a model: its data's fingerprint, its rounds and the privacy it spent."""

    name: str
    epsilon: float  # the job's epsilon, after the final releases
    epsilon_lifetime: float
    delta: float
    rounds_trained: int
    refusals: int
    dataset_sha256: str


class ModelCard(_Frozen):
    """The registry's ``card.json``: what a registered model is, where it came from and what it cost.

    The coordinator fills the training fields (``card_of`` in ``server.app``); ``register_model``
    fills the registry's (version, spec, inputs, creation time, code version). Fairness tables stay
    the dicts ``federation.fairness`` builds (their own layout, rendered below).
    """

    job: str
    topology: Literal["horizontal", "vertical"] = "horizontal"
    agencies: list[CardAgency]
    metrics: dict[str, float]
    metrics_source: str
    rounds_aggregated: int
    secure_aggregation: bool
    model_sha256: str
    coordinator_ledger: str
    fairness: dict[str, Any] | None = None
    fairness_release: dict[str, str] | None = None  # set when no agency released fairness counts: why
    mitigation: dict[str, Any] | None = None
    # vertical models: what each agency discloses for listed households (its spec's ``explain``)
    disclosures: dict[str, Literal["none", "agency", "feature"]] = {}
    # filled by the registry
    model_version: str = ""
    federation: str = ""
    purpose: str = ""
    spec_sha256: str = ""
    model: dict[str, Any] = {}
    inputs: list[str] = []
    created: str = ""
    code_version: str = ""

    def as_json(self) -> dict[str, Any]:
        """The card as ``card.json`` holds it (``null`` where a model has no fairness table or mitigation)."""
        return self.model_dump()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fairness_rows(fairness: dict[str, Any]) -> list[tuple[str, list[list[str]], list[list[str]]]]:
    """Per attribute: group rows and gap rows, as text cells."""
    out = []
    for attribute, block in fairness.get("attributes", {}).items():
        groups = [
            [
                g["group"],
                _fmt(g["n"], 0),
                _fmt(g["selection_rate"]),
                f"{_fmt(g['tpr'])} [{_fmt(g['tpr_ci'][0])}, {_fmt(g['tpr_ci'][1])}]",
                f"{_fmt(g['fpr'])} [{_fmt(g['fpr_ci'][0])}, {_fmt(g['fpr_ci'][1])}]",
            ]
            for g in block["groups"]
        ]
        gaps = []
        for metric, gap in block["gaps"].items():
            verdict = {True: "pass", False: "FAIL", None: "not judged"}[gap["passed"]]
            ci = "-" if gap["ci"] is None else f"[{_fmt(gap['ci'][0])}, {_fmt(gap['ci'][1])}]"
            between = " vs ".join(gap["groups"]) or "-"
            gaps.append([metric, _fmt(gap["gap"]), ci, _fmt(gap["tolerance"]), between, verdict])
        out.append((attribute, groups, gaps))
    return out


GROUP_HEAD = ["group", "rows", "selection rate", "coverage of eligible (TPR) [95% CI]", "FPR [95% CI]"]
GAP_HEAD = ["metric", "gap", "95% CI", "tolerance", "between", "verdict"]


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(model_card: ModelCard) -> str:
    """The card as Markdown."""
    card = model_card.as_json()
    purpose = card.get("purpose", "")
    metrics = card.get("metrics", {})
    parts = [
        f"# Model card: {card.get('model_version')}",
        "",
        f"- Purpose: {purpose}",
        f"- Model: {card.get('model', {}).get('kind')} on {len(card.get('inputs', []))} inputs; "
        f"created {card.get('created')}; job {card.get('job')}; code {card.get('code_version')}",
        f"- Spec SHA-256: `{card.get('spec_sha256')}`; model SHA-256: `{card.get('model_sha256', '-')}`",
        f"- Secure aggregation: {'on' if card.get('secure_aggregation') else 'off'}; "
        f"rounds aggregated: {card.get('rounds_aggregated')}",
        "",
        "## Intended use",
        "",
        INTENDED_USE.format(purpose=purpose),
        "",
        "## Data sources and privacy",
        "",
        _md_table(
            ["agency", "dataset SHA-256", "rounds trained", "refusals", "epsilon (job)", "epsilon (lifetime)", "delta"],
            [
                [
                    a["name"],
                    f"`{a['dataset_sha256'][:16]}`",
                    str(a["rounds_trained"]),
                    str(a["refusals"]),
                    _fmt(a["epsilon"]),
                    _fmt(a["epsilon_lifetime"]),
                    f"{a['delta']:g}",
                ]
                for a in card.get("agencies", [])
            ],
        ),
        "",
        "## Metrics",
        "",
        f"{card.get('metrics_source', '')}: AUC {_fmt(metrics.get('auc'))}, accuracy {_fmt(metrics.get('accuracy'))}, "
        f"Brier {_fmt(metrics.get('brier'))} on {_fmt(metrics.get('n'), 0)} households.",
        "",
        "## Fairness",
        "",
    ]
    source = card.get("metrics_source") if card.get("topology") == "vertical" else "the agencies' validation splits"
    parts += [fairness_markdown(card.get("fairness"), card.get("mitigation"), str(source))]
    if card.get("disclosures"):
        parts += ["## Reasons disclosed for listed households", "", _md_table(
            ["agency", "discloses"],
            [[name, DISCLOSURE_TEXT[level]] for name, level in card["disclosures"].items()],
        ), ""]  # fmt: skip
    parts += ["## Known limitations", "", *[f"- {item}" for item in LIMITATIONS], ""]
    return "\n".join(parts)


def fairness_markdown(fairness: dict[str, Any] | None, mitigation: dict[str, Any] | None, source: str) -> str:
    """The fairness table (per attribute: groups, then gaps with verdicts) as Markdown."""
    if not fairness:
        return "No fairness table (the spec has no `[fairness]` section, or no agency released counts).\n"
    verdict = "all judged gaps within tolerance" if fairness["passed"] else "; ".join(fairness["failures"])
    parts = [
        f"At threshold {fairness['threshold']:g}, on {source} ({fairness.get('release', 'exact counts')}). "
        f"Verdict: **{verdict}**.",
        "",
    ]
    for attribute, groups, gaps in fairness_rows(fairness):
        parts += [f"### {attribute}", "", _md_table(GROUP_HEAD, groups), "", _md_table(GAP_HEAD, gaps), ""]
    if mitigation:
        thresholds = ", ".join(f"{g} {t:g}" for g, t in mitigation["thresholds"].items())
        parts += [
            f"Mitigation (off unless the spec turns it on): per-group thresholds on "
            f"{mitigation['attribute']}: {thresholds}.",
            "",
        ]
        after = {"attributes": {mitigation["attribute"]: mitigation["after"]}}
        for attribute, groups, gaps in fairness_rows(after):
            parts += [f"### {attribute}, with the per-group thresholds", "", _md_table(GROUP_HEAD, groups), ""]
            parts += [_md_table(GAP_HEAD, gaps), ""]
    return "\n".join(parts)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_html(card: ModelCard) -> str:
    """The card as one self-contained HTML page (the Markdown's content, laid out as tables)."""
    return markdown_to_html(render_markdown(card), f"Model card: {card.model_version}")


def markdown_to_html(markdown: str, title: str) -> str:
    """The small Markdown these cards use (headings, tables, bullets, bold, code) as a self-contained page."""
    import re

    blocks = []
    table: list[list[str]] = []
    bullets: list[str] = []
    for line in markdown.splitlines():
        if bullets and not line.startswith("- "):
            blocks.append("<ul>" + "".join(bullets) + "</ul>")
            bullets = []
        if line.startswith("|"):
            if not line.startswith("|---"):
                table.append([c.strip().strip("`") for c in line.strip("|").split("|")])
            continue
        if table:
            blocks.append(_html_table(table[0], table[1:]))
            table = []
        text = escape(line)
        text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
        text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
        if line.startswith("### "):
            blocks.append(f"<h3>{text[4:]}</h3>")
        elif line.startswith("## "):
            blocks.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("# "):
            blocks.append(f"<h1>{text[2:]}</h1>")
        elif line.startswith("- "):
            bullets.append(f"<li>{text[2:]}</li>")
        elif line:
            blocks.append(f"<p>{text}</p>")
    if table:
        blocks.append(_html_table(table[0], table[1:]))
    if bullets:
        blocks.append("<ul>" + "".join(bullets) + "</ul>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#1b1b1b}"
        "table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.3rem .6rem}"
        "th{background:#f3f3f3}"
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{style}</style></head><body>{''.join(blocks)}</body></html>\n"
    )
