"""Scoring a labelled file where it lives: metrics, per-household decisions with reasons, fairness table.

Used by ``agencyfl evaluate`` (a steward or analyst with a labelled file) and ``agencyfl audit
fairness --data`` (the fairness table computed on that file instead of the model card's federated one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from agencyfl.federation.errors import ModelError

if TYPE_CHECKING:
    from agencyfl.federation.decision import DecisionRule
    from agencyfl.federation.spec import FairnessSection, SchemaSection

VERTICAL_MANIFEST = "manifest.json"
"""What a vertical model's registry folder holds instead of weights (``agencyfl.vertical.model``)."""


@dataclass
class LocalEvaluation:
    """A registered model applied to one labelled file."""

    report: dict[str, Any]  # metrics and counts, JSON-ready
    decisions: pd.DataFrame  # id, label, score, decision, review, reasons
    fairness: dict[str, Any] | None  # the fairness table on this file (None without [fairness])
    fairness_mitigated: dict[str, Any] | None  # the same with the card's per-group thresholds, if any


def evaluate_local(model: Path, data: Path, spec: Path | None = None, review_band: float = 0.1) -> LocalEvaluation:
    """Score ``data`` with the registered ``model`` (the spec must match the model's inputs).

    A vertical model (its folder holds ``manifest.json``) scores a joined file of every agency's
    columns (``agencyfl.vertical.evaluate``).

    Raises
    ------
    ModelError, SpecError, DataFileError
        Unreadable model, spec that does not match it, unusable data file.
    """
    from agencyfl.federation.decision import DecisionRule
    from agencyfl.federation.encoding import FeatureEncoder
    from agencyfl.federation.metrics import exact_metrics
    from agencyfl.federation.model import predict_proba
    from agencyfl.federation.reasons import contributions, top_reasons
    from agencyfl.federation.spec import load_spec
    from agencyfl.federation.table import load_table
    from agencyfl.server.registry import RegisteredModel

    if (Path(model) / VERTICAL_MANIFEST).is_file():  # a vertical model: its parts stay in the agencies' folders
        from agencyfl.vertical.evaluate import evaluate_vertical

        return evaluate_vertical(Path(model), Path(data), spec, review_band)
    registered = RegisteredModel(model)
    loaded_spec = load_spec(spec).spec if spec is not None else registered.spec
    encoder = FeatureEncoder(loaded_spec.schema)
    if encoder.names != registered.encoder.names:
        raise ModelError(f"the spec's features do not match the model's inputs ({registered.directory})")
    check = load_table(data, loaded_spec.schema)
    frame = check.valid
    x = encoder.encode(frame)
    y = frame[loaded_spec.schema.label].to_numpy()
    scores = predict_proba(registered.model, x)
    metrics = exact_metrics(scores, y)
    section = registered.spec.fairness
    # The one decision rule `agencyfl score` applies too: the card's per-group thresholds, if any.
    rule = DecisionRule.for_model(registered.spec, registered.card.mitigation)
    threshold = rule.threshold
    thresholds = rule.thresholds or None
    decided_now = rule.decide(scores, frame, loaded_spec.schema, review_band)
    eligible = decided_now.eligible
    labels = {f.name: loaded_spec.schema.plain_label(f.name) for f in loaded_spec.schema.features}
    decisions = pd.DataFrame(
        {
            loaded_spec.schema.id: frame[loaded_spec.schema.id].to_numpy(),
            "label": y,
            "score": np.round(scores, 6),
            "decision": np.where(eligible, "eligible", "not eligible"),
            "review": decided_now.review,
            "reasons": top_reasons(contributions(registered.model, x), eligible, encoder, labels),
        }
    )
    fairness, mitigated = fairness_on_file(scores, y, eligible, frame, section, loaded_spec.schema, rule, data)
    report = {
        "model": str(model),
        "model_version": registered.card.model_version,
        "data": str(data),
        "rows": check.total,
        "scored": len(frame),
        "quarantined": len(check.quarantined),
        **metrics.as_dict(),
        "threshold": threshold,
        "eligible": int(eligible.sum()),
        "accuracy_at_decisions": float(np.mean(eligible == y.astype(bool))) if len(y) else float("nan"),
        "group_thresholds": thresholds,
    }
    return LocalEvaluation(report, decisions, fairness, mitigated)


def fairness_on_file(
    scores: np.ndarray,
    y: np.ndarray,
    eligible: np.ndarray,
    frame: pd.DataFrame,
    section: FairnessSection | None,
    schema: SchemaSection,
    rule: DecisionRule,
    data: Path,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The fairness table of a scored file (exact counts), and the same at the rule's per-group thresholds."""
    from agencyfl.federation.fairness import count_groups, fairness_table, group_labels, layout

    if section is None:
        return None, None
    groups = group_labels(frame, section, schema)
    lay = layout(section, schema)
    fairness = fairness_table(count_groups(scores, y, groups, lay, rule.threshold), section, lay)
    fairness["release"] = f"exact counts on {data.name}"
    mitigated = None
    if rule.thresholds and rule.attribute is not None:
        decided = eligible.astype(float)
        # counts at per-group thresholds: count_groups on the decisions themselves (threshold 0.5)
        mitigated = fairness_table(count_groups(decided, y, groups, lay, 0.5), section, lay)
        mitigated["release"] = f"exact counts on {data.name}, per-group thresholds on {rule.attribute}"
    return fairness, mitigated
