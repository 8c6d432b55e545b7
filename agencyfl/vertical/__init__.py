"""Vertical training: DP gradient descent on a logistic model over the register, under CKKS (``docs/vertical.md``).

The names below load on first use (PEP 562): a screening imports ``vertical.encoding``, ``.model``, ``.optim``
and ``.protocol`` only, and importing the package's training side with them (the accountant, dp_accounting,
SciPy) cost the ``agencyfl screen eligible`` command about 0.9 s of its start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agencyfl.vertical.encoding import Block, LabelData, feature_block, label_block, place_block
    from agencyfl.vertical.plan import VerticalPlan
    from agencyfl.vertical.protocol import Arbiter, FeatureHolder, LabelHolder, Received
    from agencyfl.vertical.reference import reference_train
    from agencyfl.vertical.train import IterationMetrics, VerticalResult, train_vertical

_WHERE = {
    "Block": "encoding", "LabelData": "encoding", "feature_block": "encoding", "label_block": "encoding",
    "place_block": "encoding", "VerticalPlan": "plan", "Arbiter": "protocol", "FeatureHolder": "protocol",
    "LabelHolder": "protocol", "Received": "protocol", "reference_train": "reference",
    "IterationMetrics": "train", "VerticalResult": "train", "train_vertical": "train",
}  # fmt: skip

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


if not TYPE_CHECKING:  # the type checker sees the imports above, and a typo stays an error to it

    def __getattr__(name: str) -> Any:
        if name not in _WHERE:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value  # once
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
