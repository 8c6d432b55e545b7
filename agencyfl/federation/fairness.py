"""Fairness across groups, computed from counts: what agencies release and what the coordinator pools.

Every party shares this contract. Groups come from the spec's ``[fairness]`` section: a categorical
attribute's categories, a boolean's yes/no, a numeric attribute's bands; a missing value is its own
group ("unknown"). An agency counts, on its validation split and per group, the confusion cells at
the decision threshold (true/false positives and negatives) and, for the mitigation attribute only,
histograms of the scores of eligible and not-eligible households. Nothing else leaves it.

The counts are laid out in a fixed order that every party derives from the spec (``layout``), so they
travel as one flat array and add up across agencies. With ``noise_multiplier > 0`` the agency adds
Gaussian noise to that array before release; one household changes one confusion cell per attribute
and one histogram bin, so the L2 sensitivity is ``sqrt(attributes + 1)`` (``sensitivity``).

Rates come with Wilson intervals; a gap is the largest minus the smallest rate among groups large
enough to judge, with Newcombe's interval for the difference of those two (Newcombe 1998, method 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from agencyfl.federation.spec import BooleanFeature, CategoricalFeature, FairnessSection, NumericFeature, SchemaSection

UNKNOWN = "unknown"
HIST_BINS = 50
CELLS = ("tp", "fp", "fn", "tn")
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class Layout:
    """Where each (attribute, group) row sits in the flat counts array."""

    groups: dict[str, list[str]]  # attribute -> its groups, in order
    mitigation_attribute: str | None

    @property
    def rows(self) -> list[tuple[str, str]]:
        """Every (attribute, group), in order."""
        return [(a, g) for a, names in self.groups.items() for g in names]

    @property
    def confusion_size(self) -> int:
        """Numbers of the confusion part: 4 cells per (attribute, group)."""
        return 4 * len(self.rows)

    @property
    def size(self) -> int:
        """Numbers in the whole array (confusion cells, then the mitigation attribute's histograms)."""
        hist = 2 * HIST_BINS * len(self.groups[self.mitigation_attribute]) if self.mitigation_attribute else 0
        return self.confusion_size + hist


def _bands(edges: list[float]) -> list[str]:
    inner = [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:], strict=False)]
    return [f"<{edges[0]:g}", *inner, f">={edges[-1]:g}"]


def layout(section: FairnessSection, schema: SchemaSection) -> Layout:
    """The groups of every attribute, as every party derives them from the spec."""
    groups: dict[str, list[str]] = {}
    for name in section.attributes:
        feature = schema.feature(name)
        if isinstance(feature, CategoricalFeature):
            names = list(feature.categories)
        elif isinstance(feature, BooleanFeature):
            names = ["yes", "no"]
        else:
            names = _bands(section.bands[name])
        groups[name] = [*names, UNKNOWN]
    mitigation = section.mitigation_attribute if section.mitigation == "group-thresholds" else None
    return Layout(groups, mitigation)


def sensitivity(section: FairnessSection) -> float:
    """L2 sensitivity of the released array to one household (see the module docstring)."""
    return math.sqrt(len(section.attributes) + (1 if section.mitigation == "group-thresholds" else 0))


def _texts(raw: pd.Series) -> tuple[npt.NDArray[np.object_], npt.NDArray[np.intp]]:
    """``str(value).strip()`` of each distinct value, and each row's index into them (the strings are made
    once per distinct value, not once per row: a register holds a million rows and a handful of values)."""
    codes, uniques = pd.factorize(raw.to_numpy(dtype=object), use_na_sentinel=False)
    return np.array([str(u).strip() for u in uniques], dtype=object), codes


def group_labels(frame: pd.DataFrame, section: FairnessSection, schema: SchemaSection) -> dict[str, np.ndarray]:
    """Each row's group for every attribute (raw, validated values; missing is ``unknown``)."""
    out: dict[str, np.ndarray] = {}
    for name in section.attributes:
        feature = schema.feature(name)
        raw = frame[name] if name in frame.columns else pd.Series([None] * len(frame), index=frame.index)
        texts, codes = _texts(raw)
        missing = raw.isna().to_numpy() | (texts == "")[codes]
        if isinstance(feature, CategoricalFeature):
            labels = texts[codes]
        elif isinstance(feature, BooleanFeature):
            truthy = np.isin(np.array([t.lower() for t in texts], dtype=object), ["true", "1", "yes", "1.0"])
            labels = np.where(truthy[codes], "yes", "no").astype(object)
        else:
            assert isinstance(feature, NumericFeature)
            edges = section.bands[name]
            values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
            names = _bands(edges)
            bins = np.searchsorted(edges, np.nan_to_num(values), side="right")
            labels = np.asarray(names, dtype=object)[bins]
        labels[missing] = UNKNOWN
        out[name] = labels
    return out


def count_groups(
    scores: np.ndarray, y: np.ndarray, groups: dict[str, np.ndarray], lay: Layout, threshold: float
) -> np.ndarray:
    """The flat counts array for one agency's validation rows (exact; noise is added by the caller)."""
    counts = np.zeros(lay.size)
    selected = scores >= threshold
    positive = y.astype(bool)
    cells = {
        "tp": selected & positive,
        "fp": selected & ~positive,
        "fn": ~selected & positive,
        "tn": ~selected & ~positive,
    }
    for row, (attribute, group) in enumerate(lay.rows):
        member = groups[attribute] == group
        for c, cell in enumerate(CELLS):
            counts[4 * row + c] = np.sum(member & cells[cell])
    if lay.mitigation_attribute:
        offset = lay.confusion_size
        bins = np.minimum((np.clip(scores, 0, 1) * HIST_BINS).astype(int), HIST_BINS - 1)
        for g, group in enumerate(lay.groups[lay.mitigation_attribute]):
            member = groups[lay.mitigation_attribute] == group
            base = offset + 2 * HIST_BINS * g
            counts[base : base + HIST_BINS] = np.bincount(bins[member & positive], minlength=HIST_BINS)
            counts[base + HIST_BINS : base + 2 * HIST_BINS] = np.bincount(bins[member & ~positive], minlength=HIST_BINS)
    return counts


def household_totals(noisy: np.ndarray, lay: Layout) -> list[tuple[float, int]]:
    """Independent estimates of the number of households counted in a noised counts array: each
    attribute's cells (and the mitigation histograms) sum to it. Each is (sum, cells summed): its noise
    variance is cells x std^2. Sums of unclipped cells: clipping each at 0 would bias them upward."""
    totals = []
    for attribute, names in lay.groups.items():
        rows = [lay.rows.index((attribute, g)) for g in names]
        totals.append((float(sum(noisy[4 * r : 4 * r + 4].sum() for r in rows)), 4 * len(rows)))
    if lay.mitigation_attribute:
        hist = noisy[lay.confusion_size : lay.size]
        totals.append((float(hist.sum()), len(hist)))
    return totals


def pooled_total(estimates: list[tuple[float, int]]) -> float:
    """Inverse-variance mean of unbiased estimates (sum, cells) whose noise variance is cells x std^2."""
    weights = [1.0 / cells for _, cells in estimates]
    return sum(w * total for w, (total, _) in zip(weights, estimates, strict=True)) / sum(weights)


def wilson(successes: float, n: float) -> tuple[float, float]:
    """Wilson score interval (95%) of a proportion; (0, 1) when there is nothing to judge by."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + _Z95**2 / n
    centre = (p + _Z95**2 / (2 * n)) / denom
    half = _Z95 * math.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """Newcombe's hybrid score interval (95%) of p_a - p_b from (successes, n) pairs."""
    pa, pb = a[0] / a[1], b[0] / b[1]
    la, ua = wilson(*a)
    lb, ub = wilson(*b)
    d = pa - pb
    return d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)


_METRICS = {
    # metric: (successes, denominator) from the cells
    "selection_rate": (("tp", "fp"), ("tp", "fp", "fn", "tn")),
    "tpr": (("tp",), ("tp", "fn")),
    "fpr": (("fp",), ("fp", "tn")),
}
_TOLERANCE = {"selection_rate": "max_selection_gap", "tpr": "max_tpr_gap", "fpr": "max_fpr_gap"}


def _cells(counts: np.ndarray, row: int) -> dict[str, float]:
    return {c: max(0.0, float(counts[4 * row + i])) for i, c in enumerate(CELLS)}  # noise can go negative


def fairness_table(counts: np.ndarray, section: FairnessSection, lay: Layout) -> dict[str, Any]:
    """Pooled per-group rates with intervals, gaps with intervals, and pass or fail per tolerance."""
    attributes: dict[str, Any] = {}
    failures: list[str] = []
    for attribute, names in lay.groups.items():
        rows = []
        for group in names:
            cells = _cells(counts, lay.rows.index((attribute, group)))
            entry: dict[str, Any] = {"group": group, "n": sum(cells.values()), "positives": cells["tp"] + cells["fn"]}
            for metric, (num, den) in _METRICS.items():
                s, n = sum(cells[c] for c in num), sum(cells[c] for c in den)
                entry[metric] = s / n if n > 0 else None
                entry[f"{metric}_ci"] = list(wilson(s, n))
                entry[f"_{metric}"] = (s, n)
            rows.append(entry)
        gaps: dict[str, Any] = {}
        for metric in _METRICS:
            judged = [r for r in rows if r[f"_{metric}"][1] >= section.min_group_size]
            tolerance = getattr(section, _TOLERANCE[metric])
            if len(judged) < 2:
                gaps[metric] = {"gap": None, "ci": None, "tolerance": tolerance, "passed": None, "groups": []}
                continue
            high = max(judged, key=lambda r: r[metric])
            low = min(judged, key=lambda r: r[metric])
            gap = high[metric] - low[metric]
            passed = None if tolerance is None else gap <= tolerance
            if passed is False:
                failures.append(
                    f"{attribute}: {metric} gap {gap:.3f} > {tolerance:g} ({high['group']} vs {low['group']})"
                )
            gaps[metric] = {
                "gap": gap,
                "ci": list(newcombe(high[f"_{metric}"], low[f"_{metric}"])),
                "tolerance": tolerance,
                "passed": passed,
                "groups": [high["group"], low["group"]],
            }
        for r in rows:
            for metric in _METRICS:
                del r[f"_{metric}"]
        attributes[attribute] = {"groups": rows, "gaps": gaps}
    return {
        "threshold": section.threshold,
        "min_group_size": section.min_group_size,
        "attributes": attributes,
        "passed": not failures,
        "failures": failures,
    }


def group_thresholds(counts: np.ndarray, lay: Layout, threshold: float) -> dict[str, float]:
    """Per-group thresholds on the mitigation attribute that give each group the pooled coverage.

    Equal opportunity (Hardt, Price, Srebro 2016) by post-processing: the pooled true-positive rate at
    ``threshold`` is the target, and each group's threshold is the highest histogram edge at which its
    own true-positive rate reaches it. Groups without eligible households keep ``threshold``.
    """
    assert lay.mitigation_attribute is not None
    names = lay.groups[lay.mitigation_attribute]
    base = lay.confusion_size
    pos = [
        np.clip(counts[base + 2 * HIST_BINS * g : base + 2 * HIST_BINS * g + HIST_BINS], 0, None)
        for g in range(len(names))
    ]
    pooled = np.sum(pos, axis=0)
    start = min(int(threshold * HIST_BINS), HIST_BINS)
    target = pooled[start:].sum() / max(pooled.sum(), 1e-9)
    out: dict[str, float] = {}
    for name, hist in zip(names, pos, strict=True):
        total = hist.sum()
        if total <= 0:
            out[name] = threshold
            continue
        covered = np.cumsum(hist[::-1])[::-1] / total  # coverage when the threshold is bin b's lower edge
        reach = [b for b in range(HIST_BINS) if covered[b] >= target - 1e-12]
        out[name] = max(reach) / HIST_BINS if reach else threshold
    return out


def mitigated_counts(counts: np.ndarray, lay: Layout, thresholds: dict[str, float]) -> np.ndarray:
    """The mitigation attribute's confusion cells as they would be under per-group thresholds (from histograms)."""
    assert lay.mitigation_attribute is not None
    out = counts.copy()
    base = lay.confusion_size
    for g, name in enumerate(lay.groups[lay.mitigation_attribute]):
        h = base + 2 * HIST_BINS * g
        pos, neg = (
            np.clip(counts[h : h + HIST_BINS], 0, None),
            np.clip(counts[h + HIST_BINS : h + 2 * HIST_BINS], 0, None),
        )
        cut = min(int(round(thresholds[name] * HIST_BINS)), HIST_BINS)
        row = lay.rows.index((lay.mitigation_attribute, name))
        out[4 * row : 4 * row + 4] = [pos[cut:].sum(), neg[cut:].sum(), pos[:cut].sum(), neg[:cut].sum()]
    return out


def decide(
    scores: np.ndarray, groups: np.ndarray | None, threshold: float, thresholds: dict[str, float] | None
) -> np.ndarray:
    """Decisions: one threshold, or per-group thresholds on the mitigation attribute when given."""
    if not thresholds or groups is None:
        return scores >= threshold
    cut = np.array([thresholds.get(str(g), threshold) for g in groups])
    return scores >= cut


def card_fields(
    counts: np.ndarray | None, section: FairnessSection, schema: SchemaSection, status: Any
) -> dict[str, Any]:
    """The model card's ``fairness`` (and ``mitigation``) from pooled, released counts.

    ``counts`` None means no counts were released; the card then says why (``status``). With
    ``mitigation = "group-thresholds"`` the per-group thresholds are chosen on the released counts
    (post-processing) and the table after them is reported beside.
    """
    if counts is None:
        return {"fairness": None, "fairness_release": status}
    lay = layout(section, schema)
    table = fairness_table(counts, section, lay)
    noised = "noised counts, accounted in each agency's ledger"
    table["release"] = noised if section.noise_multiplier else "exact counts"
    table["agencies"] = status
    card: dict[str, Any] = {"fairness": table}
    if lay.mitigation_attribute:
        thresholds = group_thresholds(counts, lay, section.threshold)
        after = fairness_table(mitigated_counts(counts, lay, thresholds), section, lay)
        card["mitigation"] = {
            "method": "group-thresholds",
            "attribute": lay.mitigation_attribute,
            "thresholds": thresholds,
            "after": after["attributes"][lay.mitigation_attribute],
        }
    return card
