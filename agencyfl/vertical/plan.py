"""The public plan of a vertical training job: bounds, sensitivity, noise and the accounting events."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agencyfl.privacy.accounting import StepRecord, calibrate_noise
from agencyfl.privacy.events import GaussianEvent, Mechanism, gaussian_releases


class VerticalPlan(BaseModel):
    """What every party agrees on before training (all of it public).

    Parameters
    ----------
    agencies
        K, the number of agencies (blocks); the intercept is one more release.
    iterations
        T, full-batch gradient steps (each one DP release).
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
        The post-processing step each party applies to its own block.
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
    optimizer: Literal["adam", "gd"] = "adam"
    learning_rate: float = Field(default=0.2, gt=0, allow_inf_nan=False)
    releases: tuple[float, ...] = ()

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
        """L2 sensitivity of one iteration's joint release (K block gradients and sum(d)): sqrt(K + 1) D."""
        return math.sqrt(self.agencies + 1) * self.residual_bound

    @property
    def noise_multiplier(self) -> float:
        """Sigma for T releases (q = 1) at (epsilon, delta), by the enforcing accountant's calibration."""
        return calibrate_noise(self.epsilon, self.delta, 1.0, self.iterations, also=self.planned_releases())

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

    def events(self) -> Mechanism:
        """All T iterations: the mechanism of the whole job."""
        return gaussian_releases(self.noise_multiplier, self.sensitivity, self.iterations)
