"""The caseworker's worklist page (`agencyfl.screening.page`): self-contained, and what a browser shows from it."""

from __future__ import annotations

import random
import re
import subprocess
from collections import Counter, defaultdict
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import CHROMIUM, CHROMIUM_FLAGS, assert_page_is_drawn

from agencyfl.screening.page import render_worklist_html, top_rows

NAMES = {
    "invite": ("邀请申请", "Invite to apply or visit"),
    "review-enrolment": ("复核", "Review with the household"),
    "human-review": ("人工复核", "Near the threshold: human review"),
}
ASKS = {
    "invite": ["invite it to apply or visit", "decided by the normal assessment, not by the score"],
    "review-enrolment": [
        "Review the case with the household",
        "notified and may respond before anything changes",
        "the allowance is not stopped by this list",
    ],
    "human-review": ["A caseworker looks at the case", "the model is not confident"],
}
ODD_ID = 'HH-<i>&"0042'  # HTML special characters in a household id
BOLD_REASON = "tax: contribution +0.84 to the score <b>bold</b> & more"


class Page(HTMLParser):
    """The parts of the DOM the tests read: each category's rows (with their text), tags, text by id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.category: str | None = None
        self.rows: dict[str, list[str]] = {}  # category ("left" for the left table) -> households in order
        self.row_text: dict[tuple[str, str], str] = {}
        self.cells: dict[tuple[str, str], list[str]] = {}  # the text of each cell of a row
        self.section_text: defaultdict[str, str] = defaultdict(str)
        self.tags: Counter[str] = Counter()
        self.row: tuple[str, str] | None = None
        self.table_id: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        attr = dict(attrs)
        if tag == "section" and attr.get("data-category"):
            self.category = attr["data-category"]
            self.rows.setdefault(str(self.category), [])
        if tag == "table":
            self.table_id = attr.get("id")
        if tag == "tr" and attr.get("data-household") is not None:
            where = "left" if self.table_id == "left" else str(self.category)
            self.row = (where, str(attr["data-household"]))
            self.rows.setdefault(where, []).append(self.row[1])
            self.row_text[self.row] = ""
            self.cells[self.row] = []
        if tag == "td" and self.row is not None:
            self.cells[self.row].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.category = None
        elif tag == "tr":
            self.row = None
        elif tag == "table":
            self.table_id = None

    def handle_data(self, data: str) -> None:
        if self.category is not None:
            self.section_text[self.category] += data
        if self.row is not None:
            self.row_text[self.row] += data
            if self.cells[self.row]:
                self.cells[self.row][-1] += data


def _report() -> dict[str, Any]:
    rng = random.Random(20261203)
    layout = {"invite": 14, "review-enrolment": 9, "human-review": 13}
    rows: list[dict[str, Any]] = []
    changes = ["new", "unchanged", "changed", "unchanged"]
    statuses = ["open", "invited", "enrolled", "not-eligible", "disagreed", "not-reached", None]
    for category, n in layout.items():
        for i in range(n):
            region = rng.choice(["urban", "rural"])
            cutoff = 0.45 if region == "rural" else 0.5
            score = {
                "invite": rng.uniform(cutoff + 0.11, 0.99),
                "review-enrolment": rng.uniform(0.01, cutoff - 0.11),
                "human-review": rng.uniform(cutoff - 0.099, cutoff + 0.099),
            }[category]
            change = changes[(i + len(rows)) % 4]
            reasons = []
            if i % 3 != 2:  # a third of the households without reasons
                reasons.append({"agency": "tax", "level": "agency", "text": f"tax: contribution {score - 0.3:+.2f}"})
                reasons.append(
                    {
                        "agency": "environment",
                        "level": "feature",
                        "text": f"environment: car_owned {-0.1 * (i + 1):+.2f}",
                    }
                )
            household = f"51{rng.randrange(10**15, 10**16)}" if i % 5 else f"5199{rng.randrange(10**13, 10**14)}X"
            rows.append(
                {
                    "household": household,
                    "category": category,
                    "score": round(score, 4),
                    "cutoff": cutoff,
                    "enrolled": category == "review-enrolment" or (category == "human-review" and i % 2 == 0),
                    "group": {"region_type": region, "disability": ["yes", "no"][i % 2]} if i else {},
                    "change": change,
                    "previous_category": None if change == "new" else (
                        category if change == "unchanged" else next(c for c in layout if c != category)
                    ),
                    "cause": {"new": "facts", "changed": ["facts", "model", "facts and model"][i % 3]}.get(change),
                    "review_status": None if change == "new" else statuses[i % len(statuses)],
                    "reasons": reasons,
                }
            )  # fmt: skip
    rows[-1]["household"] = ODD_ID
    rows[1]["reasons"] = [{"agency": "tax", "level": "agency", "text": BOLD_REASON}]
    bins = [round(0.05 * k, 2) for k in range(21)]
    urban = [rng.randrange(250, 550) for _ in range(20)]
    rural = [rng.randrange(200, 500) for _ in range(20)]
    rural[-1] = 16040 - sum(urban) - sum(rural[:-1])
    assert rural[-1] > 0
    yes = [c // 7 for c in urban]
    no = [u + r - y for u, r, y in zip(urban, rural, yes, strict=True)]
    return {
        "screening": "scr-20261203T210000Z-ab12",
        "created": "2026-12-03T21:00:00+00:00",
        "federation": "minimum-living-allowance",
        "purpose": "eligibility-identification",
        "model_version": "minimum-living-allowance/v0002",
        "requester": "civil-affairs",
        "households_scored": 16040,
        "threshold": 0.5,
        "review_band": 0.1,
        "counts": dict(layout),
        "rows": rows,
        "left": [
            {"household": "510104198201011234", "previous_category": "invite", "review_status": "open"},
            {"household": "510104197512125678", "previous_category": "review-enrolment", "review_status": "disagreed"},
            {"household": "51010419900101002X", "previous_category": "human-review", "review_status": None},
        ],
        "since": {
            "worklist": "/srv/screening/scr-20261105T210000Z-cd34/worklist.csv",
            "model_version": "minimum-living-allowance/v0001",
            "created": "2026-11-05T21:00:00+00:00",
        },
        "groups": {
            "bins": bins,
            "overall": [u + r for u, r in zip(urban, rural, strict=True)],
            "attributes": {
                "region_type": {
                    "label": "urban or rural household registration",
                    "groups": {"urban": urban, "rural": rural},
                },
                "disability": {"label": "a household member with a disability", "groups": {"yes": yes, "no": no}},
            },
        },
        "disclosures": {"hrss": "none", "tax": "agency", "environment": "feature"},
        "labels": {},
    }


def _dump_dom(page: Path, profile: Path) -> str:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_worklist_page_renders_in_a_headless_browser(tmp_path: Path) -> None:
    report = _report()
    page = tmp_path / "worklist.html"
    page.write_text(render_worklist_html(report), encoding="utf-8")
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<script|<link|(src|href)=\"(https?:)?//", html)  # self-contained: nothing to fetch
    profile = tmp_path / "profile"
    dom = _dump_dom(page, profile)
    shown = Page(dom)

    assert "No enrolment is changed by this page or by any command: people decide." in dom
    for fact in ("scr-20261203T210000Z-ab12", "minimum-living-allowance/v0002", "eligibility-identification"):
        assert fact in dom
    assert '<span id="households-scored">16,040</span>' in dom
    for agency, level in report["disclosures"].items():
        assert re.search(rf'<tr data-agency="{agency}"><td>{agency}</td><td>{level}</td>', dom), agency

    rows = report["rows"]
    for category, (chinese, english) in NAMES.items():
        listed = [r for r in rows if r["category"] == category]
        section = dom[dom.index(f'<section class="category" data-category="{category}">') :]
        section = section[: section.index("</section>")]
        assert chinese in section and english in section
        assert re.search(rf'<span class="count">{len(listed)}</span>', section), category
        assert re.search(rf'<tr data-count="{category}">.*?<td class="num count">{len(listed)}</td>', dom)
        for ask in ASKS[category]:
            assert ask in shown.section_text[category], (category, ask)
        assert sorted(shown.rows[category]) == sorted(r["household"] for r in listed)
        order = {
            "invite": lambda r: -r["score"],
            "review-enrolment": lambda r: r["score"],
            "human-review": lambda r: abs(r["score"] - r["cutoff"]),
        }[category]
        assert shown.rows[category] == [r["household"] for r in sorted(listed, key=order)]  # the order of the work
        for r in listed:
            text = shown.row_text[(category, r["household"])]
            cells = shown.cells[(category, r["household"])]
            assert cells[:4] == [
                r["household"],
                f"{r['score']:.2f}",
                f"{r['cutoff']:.2f}",
                "yes" if r["enrolled"] else "no",
            ]
            assert r["change"] in cells[5], (r, cells)
            for reason in r["reasons"]:
                assert reason["text"] in text
            if not r["reasons"]:
                assert "none disclosed" in text
            if r["change"] == "changed":
                previous_chinese, previous_english = NAMES[r["previous_category"]]
                assert f"from {previous_chinese} / {previous_english}" in text
            if r["cause"] is not None:
                assert f"cause: {r['cause']}" in text
            assert ("open review" in text) == (r["review_status"] == "open"), (r, text)

    changes = Counter(r["change"] for r in rows)
    for change in ("new", "changed", "unchanged"):
        assert f'<span data-change-count="{change}">{changes[change]} {change}</span>' in dom
    assert "3 left the lists" in dom and "The model changed since then" in dom
    assert shown.rows["left"] == [h["household"] for h in report["left"]]
    for h in report["left"]:
        text = shown.row_text[("left", h["household"])]
        assert " / ".join(NAMES[h["previous_category"]]) in text
        assert ("open review" in text) == (h["review_status"] == "open")
    opened = sum(r["review_status"] == "open" for r in [*rows, *report["left"]])
    assert opened >= 3 and dom.count('data-review="open"') == opened

    assert ODD_ID in shown.row_text[("human-review", ODD_ID)]  # shown as text, not markup
    assert BOLD_REASON in shown.row_text[(rows[1]["category"], rows[1]["household"])]
    assert shown.tags["b"] == 0 and shown.tags["i"] == 0
    assert shown.tags["svg"] == dom.count("<svg") == len(report["groups"]["attributes"]) + 1
    for legend in ("urban (n=", "rural (n=", "yes (n=", "no (n=", "threshold 0.50"):
        assert legend in dom

    assert_page_is_drawn(page, tmp_path / "worklist.png", profile)


def test_an_empty_worklist_says_so_per_category() -> None:
    report = _report()
    report.update(rows=[], left=[], since=None, counts={"invite": 0, "review-enrolment": 0, "human-review": 0})
    html = render_worklist_html(report)
    shown = Page(html)
    assert not re.search(r"<script|<link|(src|href)=\"(https?:)?//", html)
    for category in NAMES:
        section = html[html.index(f'<section class="category" data-category="{category}">') :]
        section = section[: section.index("</section>")]
        assert "No households on this list." in shown.section_text[category]
        assert "<table" not in section and '<span class="count">0</span>' in section
        assert shown.rows[category] == []
    assert "No comparison with a previous worklist." in html and 'id="left"' not in html


def test_a_long_list_shows_its_first_rows_and_the_page_points_to_the_csv() -> None:
    report = _report()
    invites = [r for r in report["rows"] if r["category"] == "invite"]
    assert len(invites) > 2
    shown = top_rows(report["rows"], 2)
    kept = [r for r in shown if r["category"] == "invite"]
    assert [r["score"] for r in kept] == sorted((r["score"] for r in invites), reverse=True)[:2]  # highest first
    html = render_worklist_html({**report, "rows": shown})
    section = html[html.index('data-category="invite"') :]
    section = section[: section.index("</section>")]
    assert section.count("<tr data-household=") == 2
    assert f"{report['counts']['invite']:,}</span> (2 listed here; the full list is in worklist.csv)" in section


@pytest.mark.parametrize("per_category", [0, 1, 3, 7, 1000])
def test_the_page_rows_chosen_from_the_table_are_those_chosen_from_every_row(per_category: int) -> None:
    """``page_rows`` picks from the worklist table without a dict per row; ties at the cut (equal rounded scores,
    equal distances to the cutoff) are where a shortcut would pick other households than the page's order."""
    import pandas as pd

    from agencyfl.screening.run import ROW_COLUMNS, page_rows, row_dicts

    rng = random.Random(per_category)
    n = 400
    scores = [rng.choice([0.1, 0.25, 0.4, 0.45, 0.5, 0.55, 0.6, 0.75, 0.9, 1.0]) for _ in range(n)]
    table = pd.DataFrame(
        {
            "household": pd.Series([f"H{rng.randrange(10**6):06d}" for _ in range(n)], dtype=object),
            "position": range(n),
            "category": pd.Series([rng.choice(list(NAMES)) for _ in range(n)], dtype=object),
            "score": scores,
            "cutoff": [rng.choice([0.5, 0.45]) for _ in range(n)],
            "enrolled": [rng.random() < 0.5 for _ in range(n)],
            **{c: pd.Series([None] * n, dtype=object) for c in ("change", "previous_category", "cause")},
            "review_status": pd.Series([None] * n, dtype=object),
            "reasons": pd.Series([None] * n, dtype=object),
            "model_version": "m/v0001",
            "screening": "scr-x",
        },
        columns=list(ROW_COLUMNS),
    )
    every = row_dicts(table)
    assert all(r["reasons"] == [] for r in every)
    picked = page_rows(table, per_category)
    assert picked == top_rows(every, per_category)
    assert len(picked) == sum(min(per_category, sum(r["category"] == c for r in every)) for c in NAMES)
