"""Local DP-SGD with Opacus: Poisson sampling, per-sample clipping, Gaussian noise, one accountant.

Opacus' optimizer hook records each step this run takes in the accountant it is given (a fresh one
per round): the steps it counts are what the round writes to the agency's ledger, and the dataset's
spend over every round and job is composed from the ledger (``privacy.accounting.epsilon_for``), not
from an accountant restored into a previous state. Batches are drawn by Opacus'
``UniformWithReplacementSampler``: each record joins each step's batch independently with probability
``sample_rate`` (Poisson sampling, what the RDP analysis assumes), and an empty batch still counts as a
step.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from torch import nn

from agencyfl.clients.sampling import poisson_batches, require_poisson

# Opacus' per-sample-gradient hooks fire on module outputs when inputs need no gradient (always, for
# data): torch warns about it every step, though it is exactly what Opacus intends.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def steps_per_epoch(sample_rate: float) -> int:
    """Steps in one local epoch: ``round(1 / sample_rate)``, at least 1."""
    return max(1, round(1.0 / sample_rate))


def noise_generator(seed: int | None = None) -> torch.Generator:
    """The generator that draws DP noise and batches.

    By default it is seeded from the operating system's CSPRNG, so the noise cannot be predicted
    from the code or the time; pass ``seed`` only for reproducible experiments. (torch's generator
    is a Mersenne Twister: see docs/threat-model.md for what that does and does not protect.)
    """
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)


@dataclass(frozen=True)
class DPRoundResult:
    """What one local DP-SGD run did: the steps it took and the accountant after them."""

    steps: int
    accountant: RDPAccountant
    mean_loss: float


def dp_sgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    noise_multiplier: float,
    sample_rate: float,
    max_grad_norm: float,
    learning_rate: float,
    steps: int,
    accountant: RDPAccountant,
    generator: torch.Generator,
    batches: Iterable[list[int]] | None = None,
    secure_noise: bool = True,
) -> DPRoundResult:
    """Train ``model`` in place for ``steps`` DP-SGD steps on ``(x, y)``.

    Parameters
    ----------
    model
        Returns one logit per row; trained in place.
    x, y
        Encoded features ``[n, d]`` and 0/1 labels ``[n]``.
    noise_multiplier, max_grad_norm
        Gaussian noise std is ``noise_multiplier * max_grad_norm`` on the sum of clipped gradients.
    sample_rate
        Poisson sampling probability per record per step.
    accountant
        Every step of this run is recorded in it (Opacus' optimizer hook); the steps it gained are
        ``DPRoundResult.steps``.
    generator
        Draws the batches and the noise.
    batches
        A batch source to use instead of the built-in one; it must be Poisson sampling at
        ``sample_rate`` over these records (``clients.sampling.require_poisson``), since that is
        what the accountant assumes.
    secure_noise
        Opacus' ``secure_mode`` noise (default): each Gaussian is the scaled sum of four draws, which
        defeats the floating-point attacks on Gaussian sampling (Mironov 2012; Holohan and Braghin
        2021, section 5.1); ``False`` only for benchmarks that compare the two.

    Raises
    ------
    SamplingError
        If ``batches`` is not Poisson sampling (shuffled, weighted or fixed-size batches).
    """
    n = len(x)
    sampler = (
        poisson_batches(n, sample_rate, steps, generator)
        if batches is None
        else require_poisson(batches, sample_rate, n)
    )
    features = torch.as_tensor(x, dtype=torch.float32)
    labels = torch.as_tensor(y, dtype=torch.float32)
    model.train()
    gsm = GradSampleModule(model, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=learning_rate),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=max(1, round(n * sample_rate)),
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_noise,
    )
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    before = sum(h[2] for h in accountant.history)
    criterion = nn.BCEWithLogitsLoss()
    losses = []
    for batch in sampler:
        index = torch.as_tensor(batch, dtype=torch.long)
        optimizer.zero_grad(set_to_none=True)
        logits = gsm(features[index]).squeeze(-1)
        if len(index):
            loss = criterion(logits, labels[index])
            losses.append(loss.item())
        else:  # an empty Poisson batch: zero gradient, but noise is still added and the step counted
            loss = logits.sum() * 0.0
        loss.backward()
        optimizer.step()
    gsm._close()
    taken = sum(h[2] for h in accountant.history) - before
    return DPRoundResult(taken, accountant, float(np.mean(losses)) if losses else float("nan"))


def plain_sgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    learning_rate: float,
    epochs: int,
    generator: torch.Generator,
) -> None:
    """Non-private minibatch SGD (shuffled batches): the baseline in benchmarks."""
    features = torch.as_tensor(x, dtype=torch.float32)
    labels = torch.as_tensor(y, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            criterion(model(features[index]).squeeze(-1), labels[index]).backward()
            optimizer.step()
