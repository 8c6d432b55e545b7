"""Vertical training: DP gradient descent on a logistic model over the register, under CKKS (``docs/vertical.md``)."""

from agencyfl.vertical.encoding import Block, LabelData, feature_block, label_block, place_block
from agencyfl.vertical.plan import VerticalPlan
from agencyfl.vertical.protocol import Arbiter, FeatureHolder, LabelHolder, Received
from agencyfl.vertical.reference import reference_train
from agencyfl.vertical.train import IterationMetrics, VerticalResult, train_vertical

__all__ = [
    "Arbiter",
    "Block",
    "FeatureHolder",
    "IterationMetrics",
    "LabelData",
    "LabelHolder",
    "Received",
    "VerticalPlan",
    "VerticalResult",
    "feature_block",
    "label_block",
    "place_block",
    "reference_train",
    "train_vertical",
]
