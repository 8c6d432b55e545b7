"""The public plan of a vertical training job: bounds, sensitivity, noise and the accounting events."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agencyfl.privacy.accounting import StepRecord, calibrate_noise
from agencyfl.privacy.events import Composed, GaussianEvent, Mechanism, gaussian_releases


class VerticalPlan(BaseModel):
    """What every party agrees on before training (all of it public).

    Parameters
    ----------
    agencies
        K, the number of agencies (blocks); the intercept is one more release.
    iterations
        T, full-batch gradient steps (each one DP release; with ``order = "sequential"`` a sweep of K steps, one
        per block, that together are the same release).
    epsilon, delta
        The job's budget for those T releases (add or remove one household everywhere).
    weight_bound, projection
        W. ``joint`` (default): after each step the whole weight vector (every block and the intercept) is
        projected to L2 norm <= W, each party scaling its own block by the common factor computed from the
        blocks' norms; then |z| <= sqrt(K + 1) W (Cauchy-Schwarz over the K blocks of norm <= 1 and the
        intercept's input 1). ``block``: each block to norm <= W and |b| <= W; then |z| <= (K + 1) W.
    score_clip
        C. Each party clips its own partial score (civil affairs' with the intercept) to [-C, C] before it
        is encrypted, and leaves the households it clipped out of its own gradient (the clipped model's
        exact gradient); then |z| <= K C whatever the weights, so the residual's bound no longer ties the
        weights to a small ball. ``None``: no clipping (models before 2026-12-05).
    optimizer, learning_rate
        The post-processing step each party applies to its own block. ``newton`` (default): block-diagonal
        Newton, one more DP release before the first iteration, each block's Hessian of the Taylor loss
        H_k = c sum_i m_i x_ik x_ik^T / 4 (upper triangle, civil affairs' with the intercept); each party
        then steps with lr (H_k + lambda I)^-1 times its noisy gradient (``docs/vertical.md``, "Block
        Newton"). ``adam`` and ``gd`` release no Hessian.
    damping
        kappa: lambda = kappa times the expected spectral norm of the Hessian's noise in a block of d
        weights, 2 sqrt(d) times its std (public: d, the register size and sigma), so that directions the
        noise dominates take short steps at every population size.
    noise
        How each gradient release's noise is spread over its parts (each agency's block, and the intercept).
        ``shaped`` (default, with ``newton``): by the Hessian release, where it costs the model least, at the
        privacy of uniform noise (``shaped_noise``); ``uniform``: the same std on every coordinate.
    order
        ``sequential`` (default with ``newton`` and a score clip): block Gauss-Seidel, each party in turn takes
        its Newton step on the residual of the others' latest weights (``docs/vertical.md``, "Sequential
        sweeps"); the K block releases of a sweep compose to exactly the joint release of one iteration.
        ``simultaneous``: every block steps on the same residual (block Jacobi; Adam and GD).
    average
        The fraction of the last iterations whose weights are averaged into the model (each party averages
        its own block: post-processing); 0 keeps the last. Default 0.5 with ``sequential``, else 0.
    releases
        Noise multipliers of the job's other planned releases (one each, q = 1: the fairness counts):
        the iterations' noise is calibrated so that everything together stays within epsilon.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    agencies: int = Field(ge=2)
    iterations: int = Field(ge=1)
    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    weight_bound: float = Field(default=20.0, gt=0, allow_inf_nan=False)
    score_clip: float | None = Field(default=1.5, gt=0, allow_inf_nan=False)
    projection: Literal["joint", "block"] = "joint"
    optimizer: Literal["newton", "adam", "gd"] = "newton"
    learning_rate: float = Field(default=0.3, gt=0, allow_inf_nan=False)  # when absent: ``_default_learning_rate``
    damping: float = Field(default=0.5, gt=0, allow_inf_nan=False)
    noise: Literal["shaped", "uniform"] = "shaped"
    order: Literal["sequential", "simultaneous"] = "sequential"  # when absent: ``_defaults``
    average: float = Field(default=0.0, ge=0.0, lt=1.0, allow_inf_nan=False)  # when absent: ``_defaults``
    releases: tuple[float, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """The order, the averaging and the learning rate when absent. Sequential sweeps need block Newton and
        the score clip (mid-sweep the weights are not yet projected: only the clip bounds the scores then);
        they average the last half. Learning rate: sequential Newton 1 (each block's exact step given the
        others: Gauss-Seidel converges on the quadratic Taylor loss); simultaneous Newton 0.3 and at most
        1.2 / K (stable while lr times the largest eigenvalue of P H, which can reach K, stays below 2);
        Adam and GD 0.2."""
        if not isinstance(data, dict):
            return data
        newton = data.get("optimizer", "newton") == "newton"
        if data.get("order") is None:
            clipped = "score_clip" not in data or data["score_clip"] is not None
            data = {**data, "order": "sequential" if newton and clipped else "simultaneous"}
        if data.get("average") is None:
            data = {**data, "average": 0.5 if data["order"] == "sequential" else 0.0}
        if data.get("learning_rate") is None:
            agencies = data.get("agencies", 2)
            if newton and data["order"] == "sequential":
                rate = 1.0
            elif newton and isinstance(agencies, int) and agencies > 0:
                rate = min(0.3, 1.2 / agencies)
            else:
                rate = 0.2
            data = {**data, "learning_rate": rate}
        return data

    @model_validator(mode="after")
    def _sequential_needs_newton_and_a_clip(self) -> VerticalPlan:
        if self.order == "sequential" and (self.optimizer != "newton" or self.score_clip is None):
            raise ValueError("sequential sweeps need block Newton and a score clip")
        return self

    @property
    def averaged(self) -> int:
        """How many of the last iterations' weights make the model (at least the last)."""
        return max(1, math.ceil(self.average * self.iterations - 1e-9))  # 0.07 x 100 is 7, not 7.000000000000001

    @property
    def score_bound(self) -> float:
        """Z bounds |z_i|: sqrt(K + 1) W with the joint projection, (K + 1) W with per-block projection, and
        K C when the K partial scores are clipped to C (the smaller bound holds: both do)."""
        if self.projection == "joint":
            bound = math.sqrt(self.agencies + 1) * self.weight_bound
        else:
            bound = (self.agencies + 1) * self.weight_bound
        if self.score_clip is not None:
            bound = min(bound, self.agencies * self.score_clip)
        return bound

    @property
    def residual_bound(self) -> float:
        """D = 0.5 + Z / 4 bounds the Taylor residual |0.5 + z/4 - y|."""
        return 0.5 + self.score_bound / 4

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one iteration's joint release (K block gradients and sum(d)): sqrt(K + 1) D
        (``protocol.ZERO_GUARD`` adds nothing: it sits in a slot whose residual is 0 whatever the data)."""
        return math.sqrt(self.agencies + 1) * self.residual_bound

    @property
    def releases_hessian(self) -> bool:
        """Whether the job releases each block's Hessian once, before the first iteration."""
        return self.optimizer == "newton"

    @property
    def hessian_sensitivity(self) -> float:
        """L2 sensitivity of the joint Hessian release (every block's upper triangle, unscaled by c):
        sqrt(K + 2) / 4. One household's row x (||x|| <= 1) moves a block's upper triangle of x x^T / 4 by
        sqrt(((sum x^2)^2 + sum x^4) / 2) / 4 <= 1/4; civil affairs' row [x, 1] (squared norm <= 2) by
        sqrt((4 + 2) / 2) / 4 = sqrt(3) / 4. Squared and summed: (K - 1 + 3) / 16."""
        return math.sqrt(self.agencies + 2) / 4

    @property
    def noise_multiplier(self) -> float:
        """Sigma for the T iterations (and the Hessian release, at the same sigma) with q = 1 at
        (epsilon, delta), by the enforcing accountant's calibration."""
        steps = self.iterations + (1 if self.releases_hessian else 0)
        return calibrate_noise(self.epsilon, self.delta, 1.0, steps, also=self.planned_releases())

    def planned_releases(self) -> tuple[StepRecord, ...]:
        """The job's other releases as the accountant sees them."""
        return tuple(StepRecord(nm, 1.0, 1) for nm in self.releases)

    @property
    def noise_std(self) -> float:
        """Noise per coordinate of the summed gradient: sigma sqrt(K + 1) D."""
        return self.noise_multiplier * self.sensitivity

    def iteration_event(self) -> GaussianEvent:
        """One iteration's release, as every agency's ledger records it."""
        return GaussianEvent(sensitivity=self.sensitivity, std=self.noise_std)

    def hessian_event(self) -> GaussianEvent:
        """The Hessian release, as every agency's ledger records it (``vertical-hessian``)."""
        return GaussianEvent(sensitivity=self.hessian_sensitivity, std=self.noise_multiplier * self.hessian_sensitivity)

    def hessian_std(self, register_size: int) -> float:
        """Noise per released Hessian entry (the entries carry c = 1 / N)."""
        return self.noise_multiplier * self.hessian_sensitivity / register_size

    def hessian_damping(self, width: int, register_size: int) -> float:
        """lambda for a block of ``width`` weights: kappa 2 sqrt(d) times the entries' noise std."""
        return self.damping * 2 * math.sqrt(width) * self.hessian_std(register_size)

    def public_fields(self) -> dict[str, Any]:
        """The plan as ``--dry-run`` shows it and a job's summary records it (all public)."""
        return {
            "agencies": self.agencies,
            "iterations": self.iterations,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "weight_bound": self.weight_bound,
            "score_clip": self.score_clip,
            "projection": self.projection,
            "score_bound": self.score_bound,
            "residual_bound": self.residual_bound,
            "sensitivity": self.sensitivity,
            "noise_multiplier": self.noise_multiplier,
            "noise_std": self.noise_std,
            "optimizer": self.optimizer,
            "learning_rate": self.learning_rate,
            "order": self.order,
            "averaged_iterations": self.averaged,
            "damping": self.damping if self.releases_hessian else None,
            "hessian_sensitivity": self.hessian_sensitivity if self.releases_hessian else None,
        }

    def events(self) -> Mechanism:
        """All T iterations (after the Hessian release, if any): the mechanism of the whole job."""
        iterations = gaussian_releases(self.noise_multiplier, self.sensitivity, self.iterations)
        if not self.releases_hessian:
            return iterations
        return Composed(events=[self.hessian_event(), iterations])

    @property
    def shapes_noise(self) -> bool:
        """Whether gradient noise is spread by the Hessian release (``shaped_stds``): block Newton only."""
        return self.noise == "shaped" and self.releases_hessian


def shaped_stds(
    std: float, widths: Mapping[str, int], label_holder: str, gains: Mapping[str, Sequence[float]]
) -> dict[str, npt.NDArray[np.float64]]:
    """Each party's per-coordinate noise std for one gradient release, at the privacy of ``std`` on every
    coordinate (``docs/vertical.md``, "Noise shaped by the Hessian release").

    The release has K + 1 parts: each agency's block and the intercept (the label holder's last coordinate).
    One household moves part p by at most D (a block's row has norm <= 1, the intercept's input is 1), so
    noise std s_p on part p gives the joint release the whitened sensitivity D sqrt(sum_p 1 / s_p^2): any
    s_p with sum_p 1 / s_p^2 = (K + 1) / std^2 has exactly the privacy of ``std`` on every coordinate, the
    noise multiplier the ledgers record, **whatever the gains are**.

    ``gains`` are what each party reports from its own Hessian release (post-processing: ``noise_gains``
    summed over its block; the label holder also the intercept's): how far unit noise on that part moves the
    training scores through a Newton step. The spread that moves them least, minimising sum_p s_p^2 g_p under
    the constraint, has 1 / s_p^2 proportional to sqrt(g_p).

    Uniform (``std`` on every coordinate) when any party's gains are missing, of the wrong count, or not
    finite and positive: a party that misreports can cost the model accuracy, never the households privacy.
    (A party that overstates its gain draws the release's noise away from its own block: its own view is then
    as informative as the whole release, which is what every ledger accounts; ``docs/threat-model.md``.)
    """
    uniform = {party: np.full(width, std) for party, width in widths.items()}
    parts: dict[tuple[str, int], float] = {}  # (party, 0 its block / 1 the intercept) -> gain
    for party in widths:
        reported = list(gains.get(party, ()))
        if len(reported) != (2 if party == label_holder else 1):
            return uniform
        for index, value in enumerate(reported):
            parts[(party, index)] = float(value)
    if not all(math.isfinite(g) and g > 0 for g in parts.values()):
        return uniform
    # only ratios matter: scaled by the largest, and no part below 1e-12 of it (its std at most 1,000 times
    # the uniform one), so that no report, however extreme, makes a std overflow
    largest = max(parts.values())
    roots = {key: math.sqrt(max(g / largest, 1e-12)) for key, g in parts.items()}
    total = sum(roots.values())
    spread = {key: std * math.sqrt(total / (len(parts) * root)) for key, root in roots.items()}
    out = {party: np.full(width, spread[(party, 0)]) for party, width in widths.items()}
    out[label_holder][-1] = spread[(label_holder, 1)]
    return out
