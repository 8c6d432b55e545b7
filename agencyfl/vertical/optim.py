"""The update each party applies to its own block after a DP release: block Newton, Adam or plain GD, then
projection.

Both are post-processing of the noisy gradient. The encrypted protocol and the plaintext reference
call the same functions, so that with the same noise they take the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float64]
OptimizerName = Literal["newton", "adam", "gd"]


def project(w: Vector, bound: float) -> Vector:
    """``w`` scaled down onto the L2 ball of radius ``bound``."""
    norm = float(np.linalg.norm(w))
    return w if norm <= bound else np.asarray(w * (bound / norm), dtype=np.float64)


def project_block(w: Vector, bound: float, intercept: bool) -> Vector:
    """``projection = "block"``: a block to norm <= ``bound``; with the ``intercept`` (its last weight, the label
    holder's) the rest so and the intercept clipped to [-bound, bound]."""
    if not intercept:
        return project(w, bound)
    return np.concatenate([project(w[:-1], bound), [float(np.clip(w[-1], -bound, bound))]])


def sweep_starts_fresh(iteration: int, first: int, last_factor: float) -> bool:
    """Whether every agency sends its partial scores at the start of sequential sweep ``iteration``: in the
    session's ``first`` sweep, and after a joint projection that rescaled the weights (``last_factor`` < 1);
    otherwise the scores each sent after its own step of the last sweep are still those of its weights. The
    one rule the one-machine run, the coordinator and civil affairs' session all follow."""
    return iteration == first or last_factor < 1.0


def clip_scores(u: Vector, bound: float | None) -> tuple[Vector, npt.NDArray[np.bool_]]:
    """A party's partial scores clipped to [-bound, bound] (``None``: not clipped), and where they were not
    clipped: the households whose rows enter that party's gradient (the clipped model's exact gradient, since
    a clipped score does not move with the weights). Each party clips only its own part: no-one else's
    values are needed."""
    if bound is None:
        return u, np.ones(len(u), dtype=bool)
    return np.clip(u, -bound, bound), np.abs(u) < bound


def triangle_size(width: int) -> int:
    """Entries of a ``width`` x ``width`` symmetric matrix's upper triangle (with the diagonal)."""
    return width * (width + 1) // 2


def upper_triangle(matrix: npt.NDArray[np.float64]) -> Vector:
    """The upper triangle, row by row (``np.triu_indices`` order): what a Hessian release carries."""
    return np.asarray(matrix[np.triu_indices(len(matrix))], dtype=np.float64)


def newton_matrix(released: Vector, width: int, damping: float) -> npt.NDArray[np.float64]:
    """(H + lambda I)^-1 from a released (noisy) upper triangle: H's negative eigenvalues (noise) are read as
    0, so the matrix is positive definite with eigenvalues at most 1 / lambda (post-processing)."""
    if len(released) != triangle_size(width) or damping <= 0:
        raise ValueError(f"a Hessian release of {len(released)} values for {width} weights (damping {damping})")
    h = np.zeros((width, width))
    h[np.triu_indices(width)] = released
    h = h + np.triu(h, 1).T
    values, vectors = np.linalg.eigh(h)
    return np.asarray((vectors / (np.maximum(values, 0.0) + damping)) @ vectors.T, dtype=np.float64)


def noise_gains(released: Vector, width: int, damping: float) -> Vector:
    """Per weight, how far unit noise on that coordinate of a gradient release moves the training scores
    through a Newton step: the diagonal of P H+ P (P = ``newton_matrix``, H+ the release with its negative
    eigenvalues read as 0), which is E ||X P n||^2 up to the factor lr^2 4 / c every block shares.
    Post-processing of the block's Hessian release; ``VerticalPlan.shaped_noise`` spends the noise by it."""
    h = np.zeros((width, width))
    h[np.triu_indices(width)] = released
    h = h + np.triu(h, 1).T
    values, vectors = np.linalg.eigh(h)
    kept = np.maximum(values, 0.0)
    # P H+ P has the eigenvectors of H and eigenvalues h / (h + lambda)^2
    return np.asarray((vectors**2) @ (kept / (kept + damping) ** 2), dtype=np.float64)


def part_gains(released: Vector, width: int, damping: float, intercept: bool) -> tuple[float, ...]:
    """What a party reports from its Hessian release: its block's noise gain (``noise_gains`` summed), and the
    intercept's when it holds it (its last weight)."""
    per_weight = noise_gains(released, width, damping)
    block = per_weight[:-1] if intercept else per_weight
    return (float(block.sum()), *([float(per_weight[-1])] if intercept else []))


def joint_scale(squared_norms: list[float], bound: float) -> float:
    """The factor that puts the concatenated weights of every block back on the ball of radius ``bound``.

    Each party contributes only the squared norm of its own block (a number computed from its DP releases:
    post-processing), and each multiplies its own block by the same factor.
    """
    norm = float(np.sqrt(sum(squared_norms)))
    return 1.0 if norm <= bound else bound / norm


@dataclass
class TailMean:
    """The mean of a block's weights over the job's last ``count`` iterations (``VerticalPlan.averaged``): the
    model each party keeps of its own block. Averaging iterates is post-processing of the releases; the noise
    each step adds to the weights is fresh, so the mean holds less of it than the last iterate.

    ``add(iteration, w)`` is called after every iteration (after the projection); iterations before the
    window are ignored."""

    iterations: int
    count: int
    size: int
    total: Vector = field(init=False, repr=False)
    added: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.total = np.zeros(self.size)

    @property
    def first(self) -> int:
        """The first iteration in the window."""
        return self.iterations - self.count + 1

    def add(self, iteration: int, w: Vector) -> None:
        if iteration >= self.first:
            self.total = self.total + w
            self.added += 1

    def mean(self, last: Vector) -> Vector:
        """The window's mean; ``last`` when nothing was added yet (a job stopped before its window)."""
        return np.asarray(self.total / self.added, dtype=np.float64) if self.added else last

    def state(self) -> dict[str, Vector]:
        """What a checkpoint keeps (the running sum and its count)."""
        return {"tail_total": self.total.copy(), "tail_added": np.array([self.added], dtype=np.float64)}

    def restore(self, state: dict[str, Vector]) -> None:
        """Continue from a checkpoint's ``state()``.

        Raises
        ------
        ValueError
            If the sum is not of this block's size.
        """
        if state["tail_total"].shape != (self.size,):
            raise ValueError(f"a running mean of {state['tail_total'].shape} for {self.size} weights")
        self.total, self.added = state["tail_total"].copy(), int(state["tail_added"][0])


@dataclass
class BlockOptimizer:
    """One party's optimizer state for its own weights (block Newton, Adam (Kingma and Ba 2015) or plain GD).

    Parameters
    ----------
    name
        ``"newton"`` (steps with ``preconditioner``, set from the Hessian release before the first
        step), ``"adam"`` or ``"gd"``.
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
    preconditioner: npt.NDArray[np.float64] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self._m = np.zeros(self.size)
        self._v = np.zeros(self.size)

    def precondition(self, matrix: npt.NDArray[np.float64]) -> None:
        """Set Newton's step matrix (``newton_matrix`` of the Hessian release).

        Raises
        ------
        ValueError
            If it is not ``size`` x ``size`` and finite.
        """
        if matrix.shape != (self.size, self.size) or not np.all(np.isfinite(matrix)):
            raise ValueError(f"a {matrix.shape} step matrix for {self.size} weights")
        self.preconditioner = np.asarray(matrix, dtype=np.float64)

    def step(self, w: Vector, grad: Vector) -> Vector:
        """The weights after one step on the noisy mean gradient ``grad`` (before projection).

        Raises
        ------
        ValueError
            A Newton step before the Hessian release set its step matrix.
        """
        if self.name == "newton":
            if self.preconditioner is None:
                raise ValueError("a Newton step before the Hessian release")
            return np.asarray(w - self.learning_rate * (self.preconditioner @ grad), dtype=np.float64)
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
