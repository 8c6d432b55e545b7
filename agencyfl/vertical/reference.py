"""The same training in plaintext numpy: the oracle the encrypted protocol is tested against.

Given the same noise generator, it draws the same noise in the same order as the arbiter (the
non-label agencies in their order, then the label holder's block and the intercept) and takes the same
steps (``optim``), so the two differ only by CKKS error and rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from agencyfl.vertical.encoding import Block, LabelData
from agencyfl.vertical.optim import (
    BlockOptimizer,
    TailMean,
    Vector,
    clip_scores,
    joint_scale,
    newton_matrix,
    part_gains,
    project_block,
    upper_triangle,
)
from agencyfl.vertical.plan import VerticalPlan, shaped_stds


def hessian(inputs: npt.NDArray[np.float64], labels: LabelData, scale: float) -> npt.NDArray[np.float64]:
    """H = c sum_i m_i x_i x_i^T / 4: the Taylor loss's Hessian in one block's weights (``inputs`` its rows,
    civil affairs' with the intercept's 1), over the assessed households."""
    m = labels.train.astype(np.float64)
    return np.asarray((inputs * (m * scale / 4)[:, None]).T @ inputs, dtype=np.float64)


def residual(scores: Vector, labels: LabelData, scale: float) -> Vector:
    """d = m c (0.5 + z/4 - y): the first-order Taylor residual at the training positions, times c."""
    m = labels.train.astype(np.float64)
    return np.asarray(m * scale * (0.5 + scores / 4 - labels.y), dtype=np.float64)


Residual = Callable[[Vector, LabelData, float], Vector]


def reference_train(
    features: list[Block],
    label: Block,
    labels: LabelData,
    plan: VerticalPlan,
    rng: np.random.Generator,
    residual_of: Residual = residual,
    noise_std: float | None = None,
    each: Callable[[dict[str, Vector]], None] | None = None,
    gradient_rows: Callable[[str, Vector], npt.NDArray[np.bool_]] | None = None,
) -> dict[str, Vector]:
    """Each party's weights after ``plan.iterations`` steps (the label holder's last weight is the intercept),
    averaged over the last ``plan.averaged`` of them. With ``plan.order == "sequential"`` each block steps in
    turn (the agencies in order, then the label holder) on the scores of the others' latest weights.

    ``each``, if given, receives every iteration's weights (after the projection), e.g. for a learning curve.

    ``gradient_rows``, if given, decides at each of a party's steps which households enter its gradient, from
    its name and its unclipped partial scores (default: those within the clip, ``clip_scores``): a test passes
    the encrypted run's decisions, which CKKS error can tip for a household on the clip's edge.

    ``residual_of`` and ``noise_std`` (on the unscaled sum) replace the protocol's Taylor residual and its
    noise only in benchmarks that ask what another residual would give (benchmarks/vertical_utility.py).
    """
    blocks = [*features, label]
    weights = {b.agency: np.zeros(b.width + (b is label)) for b in blocks}
    optimizers = {b.agency: BlockOptimizer(plan.optimizer, plan.learning_rate, b.width + (b is label)) for b in blocks}
    scale = 1.0 / len(label.x)
    std = (plan.noise_std if noise_std is None else noise_std) * scale
    widths = {b.agency: b.width + (b is label) for b in blocks}
    stds = {name: np.full(width, std) for name, width in widths.items()}
    if plan.releases_hessian:  # one noisy upper triangle per block, in the arbiter's order
        gains: dict[str, tuple[float, ...]] = {}
        for b in blocks:
            rows = np.hstack([b.x, np.ones((len(b.x), 1))]) if b is label else b.x
            h = upper_triangle(hessian(rows, labels, scale))
            released = h + rng.normal(0.0, plan.hessian_std(len(label.x)), size=len(h))
            width = rows.shape[1]
            damping = plan.hessian_damping(width, len(label.x))
            optimizers[b.agency].precondition(newton_matrix(released, width, damping))
            gains[b.agency] = part_gains(released, width, damping, intercept=b is label)
        if plan.shapes_noise:
            stds = shaped_stds(std, widths, label.agency, gains)
    tails = {name: TailMean(plan.iterations, plan.averaged, width) for name, width in widths.items()}

    unclipped: dict[str, Vector] = {}

    def part(b: Block) -> tuple[Vector, npt.NDArray[np.bool_]]:
        w = weights[b.agency]
        unclipped[b.agency] = b.x @ w[:-1] + w[-1] if b is label else b.x @ w
        return clip_scores(unclipped[b.agency], plan.score_clip)

    def step(b: Block, clipped: dict[str, tuple[Vector, npt.NDArray[np.bool_]]]) -> None:
        z = sum(c for c, _ in clipped.values())
        d = residual_of(np.asarray(z), labels, scale)
        rows = clipped[b.agency][1] if gradient_rows is None else gradient_rows(b.agency, unclipped[b.agency])
        own = d * rows  # the households it clipped leave its gradient
        g = b.x.T @ own
        if b is label:
            g = np.concatenate([g, [own.sum()]])
        noisy = g + rng.normal(0.0, stds[b.agency], size=len(g))
        w = optimizers[b.agency].step(weights[b.agency], noisy)
        weights[b.agency] = project_block(w, plan.weight_bound, b is label) if plan.projection == "block" else w

    for iteration in range(1, plan.iterations + 1):
        clipped = {b.agency: part(b) for b in blocks}
        for b in blocks:
            step(b, clipped)
            if plan.order == "sequential":  # the next block steps on this one's new scores
                clipped[b.agency] = part(b)
        if plan.projection == "joint":
            factor = joint_scale([float(w @ w) for w in weights.values()], plan.weight_bound)
            weights = {k: w * factor for k, w in weights.items()}
        for name, w in weights.items():
            tails[name].add(iteration, w)
        if each is not None:
            each(dict(weights))
    return {name: tails[name].mean(w) for name, w in weights.items()}
