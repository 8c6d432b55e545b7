"""Batch sampling that matches the privacy analysis: Poisson sampling, and nothing else.

The RDP (and PRV) analysis of DP-SGD that the ledger's epsilon comes from assumes that every record
joins every step's batch independently with probability ``sample_rate`` (Mironov, Talwar, Zhang 2019).
Shuffled fixed-size batches, weighted sampling and plain fixed-size batches are different mechanisms
with different (sometimes much larger) privacy loss, so a loader of that kind is refused here rather
than accounted as if it were Poisson.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, WeightedRandomSampler

from agencyfl.federation.errors import AgencyflError


class SamplingError(AgencyflError):
    """A batch source whose sampling the privacy accountant does not describe."""


def poisson_batches(
    n: int, sample_rate: float, steps: int, generator: torch.Generator
) -> UniformWithReplacementSampler:
    """``steps`` Poisson batches over ``n`` records: each record in each batch with probability ``sample_rate``."""
    return UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=generator, steps=steps)


def _why_not_poisson(sampler: Any) -> str:
    if isinstance(sampler, WeightedRandomSampler):
        return (
            "weighted sampling gives records different chances of being drawn (some far above sample_rate), "
            "so their privacy loss is not the one accounted"
        )
    if isinstance(sampler, RandomSampler):
        return (
            "shuffled batches of fixed size sample without replacement; the accountant assumes Poisson sampling, "
            "and its epsilon would not hold"
        )
    if isinstance(sampler, SequentialSampler):
        return "fixed-size batches in a fixed order put every record in every epoch: there is no subsampling at all"
    return f"{type(sampler).__name__} is not Poisson sampling"


def require_poisson(source: Any, sample_rate: float, n: int) -> UniformWithReplacementSampler:
    """The Poisson sampler behind ``source``, or a ``SamplingError`` that explains the refusal.

    Parameters
    ----------
    source
        An Opacus ``UniformWithReplacementSampler``, or a ``DataLoader`` whose batch sampler is one
        (Opacus' ``DPDataLoader``).
    sample_rate
        The rate the round is accounted at; the sampler must use exactly this rate.
    n
        The number of training records the sampler must draw from.

    Raises
    ------
    SamplingError
        For shuffled, weighted or fixed-size batches, or a Poisson sampler with another rate or size.
    """
    sampler = source
    if isinstance(source, DataLoader):
        sampler = source.batch_sampler
        if isinstance(sampler, BatchSampler):
            sampler = sampler.sampler
    if not isinstance(sampler, UniformWithReplacementSampler):
        raise SamplingError(f"refused a non-Poisson loader: {_why_not_poisson(sampler)}")
    if sampler.sample_rate != sample_rate:
        raise SamplingError(
            f"the loader samples at rate {sampler.sample_rate:g} but the round is accounted at {sample_rate:g}"
        )
    if sampler.num_samples != n:
        raise SamplingError(f"the loader draws from {sampler.num_samples} records, the training set has {n}")
    return sampler
