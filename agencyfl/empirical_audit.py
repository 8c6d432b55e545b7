"""The empirical privacy audit: train the way a registered model was trained, with canaries, and attack.

Run where the records are (an agency's steward, or an auditor on a test population): it reads a data
file, never sends it anywhere, and reports only the guessing game's counts and bounds.

Design (Steinke, Nasr, Jagielski 2023, black-box input-space canaries):

- **Canaries**: one per model input and run, an extreme household: every input at the middle of its
  range (encoded 0) except one, set to ``magnitude`` times its range's half-width, with the sign drawn
  at random; its label is the one the registered model disagrees with (a mislabelled outlier, the
  kind of record DP-SGD has to hide and plain training memorises).
- **Training**: the model's own recipe from its spec (model, initial weights, sample rate, learning
  rate, clipping, and the noise multiplier calibrated for the spec's per-job epsilon over the job's
  rounds), as one agency's DP-SGD over all of the job's steps; each canary joins with probability 1/2.
  ``non_private=True`` trains the same way without clipping or noise: the control that shows the
  attack has power.
- **Score**: the model's logit margin on the canary's label, against the reference household
  (``(2y - 1) * (logit(canary) - logit(0))``); higher means "trained on".
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CanaryAuditResult:
    """The audit's figures, with what was claimed beside what was found."""

    model: str
    data: str
    non_private: bool
    epsilon_claimed: float | None  # None for the non-private control
    delta: float
    noise_multiplier: float
    steps: int
    runs: int
    magnitude: float
    canaries: int
    guesses: int
    correct: int
    accuracy: float
    accuracy_interval: tuple[float, float]
    confidence: float
    epsilon_lower_bound: float
    epsilon_interval: tuple[float, float]
    seconds: float

    @property
    def refutes_claim(self) -> bool:
        """The lower bound exceeds the claimed epsilon: the model is not as private as claimed."""
        return self.epsilon_claimed is not None and self.epsilon_lower_bound > self.epsilon_claimed

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {**asdict(self), "refutes_claim": self.refutes_claim}


def _logits(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32)).squeeze(-1).numpy()
    return np.asarray(logits, dtype=np.float64)


def run_canary_audit(
    model_dir: Path,
    data_file: Path,
    *,
    runs: int = 15,
    magnitude: float = 100.0,
    guess_fraction: float = 0.25,
    confidence: float = 0.95,
    non_private: bool = False,
    epsilon: float | None = None,
    claim: float | None = None,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CanaryAuditResult:
    """Train ``runs`` times with canaries under the model's recipe and bound epsilon from below.

    Parameters
    ----------
    model_dir
        A registered model: its spec gives the recipe, its weights the canaries' labels.
    data_file
        Records to train on (validated by the same loader as ``steward check``; the training split).
    runs
        Independent trainings; each carries one canary per model input.
    magnitude
        How far out a canary lies, in half-widths of its input's range.
    guess_fraction, confidence
        See ``privacy.empirical.guess_and_bound``.
    non_private
        Train without clipping or noise (the control).
    epsilon
        Train at this per-job epsilon instead of the spec's (the noise is calibrated for it).
    claim
        The epsilon the bound is compared with; default the training epsilon (none for the control).
    seed
        Seeds canaries, coins and noise (reproducible experiments only; default: OS entropy).
    progress
        Called with the number of runs done.

    Raises
    ------
    ModelError, DataFileError
        An unreadable model or data file.
    """
    import torch
    from opacus.accountants import RDPAccountant

    from agencyfl.clients.trainer import dp_sgd, noise_generator, steps_per_epoch
    from agencyfl.federation.model import build_model
    from agencyfl.federation.table import load_table, validation_mask
    from agencyfl.privacy.budget import job_noise_multiplier
    from agencyfl.privacy.empirical import guess_and_bound
    from agencyfl.server.registry import RegisteredModel

    start = time.monotonic()
    torch.set_num_threads(1)
    registered = RegisteredModel(model_dir)
    spec = registered.spec
    frame = load_table(data_file, spec.schema).valid
    x = registered.encoder.encode(frame)
    y = frame[spec.schema.label].to_numpy(dtype=np.float32)
    train = ~validation_mask(frame[spec.schema.id], spec.training.validation_fraction, spec.federation.name)
    x, y = x[train], y[train]
    width = registered.encoder.width
    q = spec.training.sample_rate
    steps = spec.training.rounds * spec.training.local_epochs * steps_per_epoch(q)
    target = spec.privacy.epsilon if epsilon is None else epsilon
    recipe = spec.model_copy(update={"privacy": spec.privacy.model_copy(update={"epsilon": target})})
    sigma = 0.0 if non_private else job_noise_multiplier(recipe, steps)  # as agencies calibrate it
    claimed = claim if claim is not None else (None if non_private else target)
    clip = 1e12 if non_private else spec.privacy.max_grad_norm
    master = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
    reference = np.zeros((1, width), np.float32)

    scores: list[float] = []
    included: list[bool] = []
    for run in range(runs):
        canaries = np.diag(master.choice([-magnitude, magnitude], size=width)).astype(np.float32)
        toward = _logits(registered.model, canaries) - _logits(registered.model, reference)[0]
        labels = (toward < 0).astype(np.float32)  # the label the registered model disagrees with
        coins = master.random(width) < 0.5
        model = build_model(spec.model, width, seed=spec.training.seed)
        dp_sgd(
            model,
            np.concatenate([x, canaries[coins]]),
            np.concatenate([y, labels[coins]]),
            noise_multiplier=sigma,
            sample_rate=q,
            max_grad_norm=clip,
            learning_rate=spec.training.learning_rate,
            steps=steps,
            accountant=RDPAccountant(),  # a throwaway: this training touches no agency's ledger
            generator=noise_generator(None if seed is None else int(master.integers(2**62))),
        )
        margin = _logits(model, canaries) - _logits(model, reference)[0]
        scores.extend(((2 * labels - 1) * margin).tolist())
        included.extend(coins.tolist())
        if progress:
            progress(run + 1)
    outcome = guess_and_bound(scores, included, spec.privacy.delta, guess_fraction, confidence)
    return CanaryAuditResult(
        model=str(model_dir),
        data=str(data_file),
        non_private=non_private,
        epsilon_claimed=claimed,
        delta=spec.privacy.delta,
        noise_multiplier=sigma,
        steps=steps,
        runs=runs,
        magnitude=magnitude,
        **asdict(outcome),
        seconds=time.monotonic() - start,
    )
