"""The update each party applies to its own block after a DP release: Adam or plain GD, then projection.

Both are post-processing of the noisy gradient. The encrypted protocol and the plaintext reference
call the same functions, so that with the same noise they take the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float64]
OptimizerName = Literal["adam", "gd"]


def project(w: Vector, bound: float) -> Vector:
    """``w`` scaled down onto the L2 ball of radius ``bound``."""
    norm = float(np.linalg.norm(w))
    return w if norm <= bound else np.asarray(w * (bound / norm), dtype=np.float64)


def clip_scores(u: Vector, bound: float | None) -> tuple[Vector, npt.NDArray[np.bool_]]:
    """A party's partial scores clipped to [-bound, bound] (``None``: not clipped), and where they were not
    clipped: the households whose rows enter that party's gradient (the clipped model's exact gradient, since
    a clipped score does not move with the weights). Each party clips only its own part: no-one else's
    values are needed."""
    if bound is None:
        return u, np.ones(len(u), dtype=bool)
    return np.clip(u, -bound, bound), np.abs(u) < bound


def joint_scale(squared_norms: list[float], bound: float) -> float:
    """The factor that puts the concatenated weights of every block back on the ball of radius ``bound``.

    Each party contributes only the squared norm of its own block (a number computed from its DP releases:
    post-processing), and each multiplies its own block by the same factor.
    """
    norm = float(np.sqrt(sum(squared_norms)))
    return 1.0 if norm <= bound else bound / norm


@dataclass
class BlockOptimizer:
    """One party's optimizer state for its own weights (Adam, Kingma and Ba 2015, or plain GD).

    Parameters
    ----------
    name
        ``"adam"`` or ``"gd"``.
    learning_rate
        Step size.
    size
        Number of weights.
    """

    name: OptimizerName
    learning_rate: float
    size: int
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    _m: Vector = field(init=False, repr=False)
    _v: Vector = field(init=False, repr=False)
    _t: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._m = np.zeros(self.size)
        self._v = np.zeros(self.size)

    def step(self, w: Vector, grad: Vector) -> Vector:
        """The weights after one step on the noisy mean gradient ``grad`` (before projection)."""
        if self.name == "gd":
            return np.asarray(w - self.learning_rate * grad, dtype=np.float64)
        self._t += 1
        self._m = self.beta1 * self._m + (1 - self.beta1) * grad
        self._v = self.beta2 * self._v + (1 - self.beta2) * grad * grad
        m_hat = self._m / (1 - self.beta1**self._t)
        v_hat = self._v / (1 - self.beta2**self._t)
        return np.asarray(w - self.learning_rate * m_hat / (np.sqrt(v_hat) + self.eps), dtype=np.float64)

    def state(self) -> dict[str, Vector]:
        """What a checkpoint keeps of the optimizer (Adam's moments and step count)."""
        return {"m": self._m.copy(), "v": self._v.copy(), "t": np.array([self._t], dtype=np.float64)}

    def restore(self, state: dict[str, Vector]) -> None:
        """Continue from a checkpoint's ``state()``.

        Raises
        ------
        ValueError
            If the state is not of this optimizer's size.
        """
        if state["m"].shape != (self.size,) or state["v"].shape != (self.size,):
            raise ValueError(f"an optimizer state of {state['m'].shape} for {self.size} weights")
        self._m, self._v, self._t = state["m"].copy(), state["v"].copy(), int(state["t"][0])
