"""Reasons for a decision: which features pushed a household's score towards it, in plain labels.

Contributions are measured against a reference household whose every input is at the middle of its
range (encoded 0), so that "income pushed towards eligible" means "compared with a household of
middling income". They add up to ``logit(x) - logit(reference)``:

- logistic model: ``w_j * x_j`` per input, exact (also what encrypted scoring returns, decrypted by the
  requester);
- MLP: integrated gradients along the straight line from the reference to ``x`` (Sundararajan, Taly,
  Yan 2017), with a 64-step trapezoid rule; complete up to that quadrature error.

Per-input contributions are summed per schema feature (a categorical's one-hot inputs and a nullable
feature's missing indicator belong to their feature) and the ``k`` largest that push towards the
decision are reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from agencyfl.federation.encoding import FeatureEncoder

if TYPE_CHECKING:
    from torch import nn

IG_STEPS = 64


def contributions(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Per-input contributions ``[n, inputs]`` to each row's logit, against the reference household."""
    import torch  # here, not at import: the requester's reasons need no torch
    from torch import nn

    model.eval()
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linear) == 1:  # logistic: exact
        weight = linear[0].weight.detach().numpy()[0].astype(np.float64)
        return np.asarray(np.asarray(x, dtype=np.float64) * weight)
    inputs = torch.as_tensor(x, dtype=torch.float32)
    alphas = torch.linspace(0.0, 1.0, IG_STEPS + 1)
    grads = []
    for alpha in alphas:
        point = (alpha * inputs).requires_grad_(True)
        model(point).sum().backward()
        assert point.grad is not None
        grads.append(point.grad.detach().clone())
    stacked = torch.stack(grads)  # [steps + 1, n, inputs]
    average = (stacked[:-1] + stacked[1:]).mean(0) / 2  # trapezoid rule over [0, 1]
    return (inputs * average).double().numpy()


def top_reasons(
    contrib: np.ndarray, eligible: np.ndarray, encoder: FeatureEncoder, labels: dict[str, str], k: int = 3
) -> list[str]:
    """For each row, the ``k`` features that pushed most towards its decision, e.g. ``income (+1.32)``."""
    features = list(dict.fromkeys(c.feature for c in encoder.columns))
    index = {f: [i for i, c in enumerate(encoder.columns) if c.feature == f] for f in features}
    per_feature = np.stack([contrib[:, index[f]].sum(1) for f in features], 1)
    out = []
    for row, yes in zip(per_feature, eligible, strict=True):
        signed = row if yes else -row
        order = [i for i in np.argsort(-signed) if signed[i] > 1e-6][:k]
        out.append("; ".join(f"{labels[features[i]]} ({'+' if row[i] > 0 else ''}{row[i]:.2f})" for i in order))
    return out
