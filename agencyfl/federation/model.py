"""The eligibility model every party builds from the spec, and its wire form (a list of arrays)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from agencyfl.federation.spec import ModelSection


class Square(nn.Module):
    """x -> x^2: the polynomial activation that CKKS can evaluate (one multiplication level)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def build_model(section: ModelSection, input_width: int, seed: int = 0) -> nn.Sequential:
    """A model returning one logit per row: ``logistic`` is one Linear layer, ``mlp`` adds hidden layers.

    Parameters
    ----------
    section
        The spec's ``[model]`` section.
    input_width
        Number of encoded inputs (``FeatureEncoder.width``).
    seed
        Seeds the initial weights so that every run of a spec starts from the same model.
    """
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width = input_width
    for hidden in section.hidden:
        layers += [nn.Linear(width, hidden), Square() if section.activation == "square" else nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / np.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.zero_()
    return model


def model_to_arrays(model: nn.Module) -> list[np.ndarray]:
    """The model's parameters as numpy arrays, in ``state_dict`` order."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def model_from_arrays(model: nn.Module, arrays: list[np.ndarray]) -> nn.Module:
    """Load ``arrays`` (from ``model_to_arrays``) into ``model`` in place and return it.

    Raises
    ------
    ValueError
        If the number or shapes of the arrays do not match the model.
    """
    keys = list(model.state_dict().keys())
    if len(keys) != len(arrays):
        raise ValueError(f"expected {len(keys)} arrays for the model, got {len(arrays)}")
    state = {}
    for key, array, current in zip(keys, arrays, model.state_dict().values(), strict=True):
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(f"{key}: expected shape {tuple(current.shape)}, got {tuple(array.shape)}")
        state[key] = torch.as_tensor(np.asarray(array, dtype=np.float32))
    model.load_state_dict(state)
    return model


def predict_proba(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Probabilities of eligibility for encoded rows ``x``."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32)).squeeze(-1)
    return torch.sigmoid(logits).numpy().astype(np.float64)
