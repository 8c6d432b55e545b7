"""How scores become decisions: one rule for ``agencyfl evaluate`` and ``agencyfl score``.

The rule is the spec's fairness threshold (0.5 without a ``[fairness]`` section) and, when the model
card records a mitigation, its per-group thresholds on the mitigation attribute. A household is
eligible when its score reaches its own group's threshold, and flagged for review when its score is
within the review band of that threshold. The scoring server sends the rule in ``ModelInfo`` so that
offices that act on scores apply the same mitigation the model card reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from agencyfl.federation.spec import FairnessSection, FederationSpec, SchemaSection, VerticalFederationSpec

__all__ = ["DecisionRule", "Decisions"]


@dataclass(frozen=True)
class Decisions:
    """Per household: eligible, flagged for review, and the threshold that applied."""

    eligible: np.ndarray
    review: np.ndarray
    cutoff: np.ndarray


class DecisionRule(BaseModel):
    """A threshold, and optionally per-group thresholds on one attribute (from the model card).

    Parameters
    ----------
    threshold
        The score at or above which a household is eligible (groups without their own threshold).
    attribute
        The mitigation attribute (a schema feature), or None.
    bands
        The attribute's band edges when it is numeric (as in ``[fairness].bands``).
    thresholds
        Group name (as in the fairness table) to threshold.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    attribute: str | None = None
    bands: list[float] = Field(default_factory=list)
    thresholds: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(default_factory=dict)

    @classmethod
    def for_model(
        cls, spec: FederationSpec | VerticalFederationSpec, mitigation: dict[str, Any] | None
    ) -> DecisionRule:
        """The rule of a registered model: its spec's threshold and its card's mitigation, if any."""
        section = spec.fairness
        threshold = section.threshold if section else 0.5
        if not mitigation or section is None:
            return cls(threshold=threshold)
        attribute = str(mitigation["attribute"])
        return cls(
            threshold=threshold,
            attribute=attribute,
            bands=list(section.bands.get(attribute, [])),
            thresholds={str(g): float(t) for g, t in mitigation["thresholds"].items()},
        )

    def with_threshold(self, threshold: float) -> DecisionRule:
        """The same rule with another base threshold (only for models without per-group thresholds)."""
        return self.model_copy(update={"threshold": threshold})

    def groups(self, frame: pd.DataFrame, schema: SchemaSection) -> np.ndarray | None:
        """Each household's group on the mitigation attribute (None without per-group thresholds)."""
        from agencyfl.federation.fairness import group_labels

        if self.attribute is None or not self.thresholds:
            return None
        section = FairnessSection(attributes=[self.attribute], bands={self.attribute: self.bands} if self.bands else {})
        return group_labels(frame, section, schema)[self.attribute]

    def decide(
        self, scores: np.ndarray, frame: pd.DataFrame, schema: SchemaSection, review_band: float = 0.1
    ) -> Decisions:
        """Decisions for ``scores`` of the households in ``frame`` (validated rows, same order)."""
        groups = self.groups(frame, schema)
        if groups is None:
            cutoff = np.full(len(scores), self.threshold)
        else:
            cutoff = np.array([self.thresholds.get(str(g), self.threshold) for g in groups], dtype=np.float64)
        scores = np.asarray(scores, dtype=np.float64)
        return Decisions(scores >= cutoff, np.abs(scores - cutoff) <= review_band, cutoff)
