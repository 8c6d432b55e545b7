"""Mechanism events: what a ledger entry released, in terms an independent accountant can re-derive.

A ledger entry of format 3 carries the mechanism it released as a tree of frozen events that map one
to one onto Google dp_accounting's ``DpEvent`` classes (``dp_event.py``):

======================  ===========================================  =====================================
ours                    recorded                                     dp_accounting
======================  ===========================================  =====================================
``GaussianEvent``       L2 ``sensitivity``, noise ``std``            ``GaussianDpEvent(std / sensitivity)``
``LaplaceEvent``        L1 ``sensitivity``, noise ``scale``          ``LaplaceDpEvent(scale / sensitivity)``
``RandomizedResponse``  ``noise_parameter``, ``num_buckets``         ``RandomizedResponseDpEvent``
``PoissonSampled``      ``sampling_probability``, ``event``          ``PoissonSampledDpEvent``
``SelfComposed``        ``event``, ``count``                         ``SelfComposedDpEvent``
``Composed``            ``events``                                   ``ComposedDpEvent``
======================  ===========================================  =====================================

Sensitivity and noise are both recorded (not only their ratio) so an auditor can check each against the
release it describes: a DP-SGD step clips to ``max_grad_norm`` and adds noise of std
``noise_multiplier * max_grad_norm``. The neighbouring relation belongs to the accountant (as in
dp_accounting); every entry declares the one relation its ledger is analysed under, ``NEIGHBOURING``
(add or remove one household), and an entry declaring another is an audit finding.

The enforcing accountant (``privacy.accounting``, Opacus' RDP analysis) composes the Gaussian,
Poisson-sampled Gaussian and their compositions; Laplace and randomized response are in the model so
that a future release can be recorded exactly, and ``step_records`` refuses them until the enforcing
accountant analyses them (nothing is ever released unaccounted).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agencyfl.privacy.steps import StepRecord

if TYPE_CHECKING:  # dp_accounting's package imports SciPy's signal, stats and optimize: ~1 s of CPU that
    # every Flower message's process would pay; only the accountants need it
    from dp_accounting import dp_event as dpe

EVENT_FORMAT = 1
"""Version of the event model; an entry's ``mechanism_format``."""

Neighbouring = Literal["add_or_remove_one"]
NEIGHBOURING: Neighbouring = "add_or_remove_one"
"""The one relation every ledger is analysed under: adding or removing one household (everywhere)."""


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GaussianEvent(_Event):
    """Gaussian noise of standard deviation ``std`` on a value of L2 ``sensitivity``."""

    type: Literal["gaussian"] = "gaussian"
    sensitivity: float = Field(gt=0, allow_inf_nan=False)
    std: float = Field(gt=0, allow_inf_nan=False)


class LaplaceEvent(_Event):
    """Laplace noise of scale ``scale`` on a value of L1 ``sensitivity``."""

    type: Literal["laplace"] = "laplace"
    sensitivity: float = Field(gt=0, allow_inf_nan=False)
    scale: float = Field(gt=0, allow_inf_nan=False)


class RandomizedResponse(_Event):
    """Randomized response over ``num_buckets`` answers, each replaced at random w.p. ``noise_parameter``."""

    type: Literal["randomized_response"] = "randomized_response"
    noise_parameter: float = Field(ge=0, le=1)
    num_buckets: int = Field(ge=2)


class PoissonSampled(_Event):
    """``event`` run on a Poisson sample: each household taken independently with ``sampling_probability``."""

    type: Literal["poisson_sampled"] = "poisson_sampled"
    sampling_probability: float = Field(gt=0, le=1)
    event: Mechanism


class SelfComposed(_Event):
    """``event`` run ``count`` times."""

    type: Literal["self_composed"] = "self_composed"
    event: Mechanism
    count: int = Field(ge=1)


class Composed(_Event):
    """Each of ``events``, run once."""

    type: Literal["composed"] = "composed"
    events: list[Mechanism]

    @field_validator("events")
    @classmethod
    def _not_empty(cls, events: list[Mechanism]) -> list[Mechanism]:
        if not events:
            raise ValueError("a composition of no events releases nothing: record nothing instead")
        return events


Mechanism = Annotated[
    GaussianEvent | LaplaceEvent | RandomizedResponse | PoissonSampled | SelfComposed | Composed,
    Field(discriminator="type"),
]
for _model in (PoissonSampled, SelfComposed, Composed):
    _model.model_rebuild()


def to_dp_event(event: Mechanism) -> dpe.DpEvent:
    """The dp_accounting ``DpEvent`` this event is (one to one)."""
    from dp_accounting import dp_event as dpe

    if isinstance(event, GaussianEvent):
        return dpe.GaussianDpEvent(noise_multiplier=event.std / event.sensitivity)
    if isinstance(event, LaplaceEvent):
        return dpe.LaplaceDpEvent(noise_multiplier=event.scale / event.sensitivity)
    if isinstance(event, RandomizedResponse):
        return dpe.RandomizedResponseDpEvent(noise_parameter=event.noise_parameter, num_buckets=event.num_buckets)
    if isinstance(event, PoissonSampled):
        return dpe.PoissonSampledDpEvent(event.sampling_probability, to_dp_event(event.event))
    if isinstance(event, SelfComposed):
        return dpe.SelfComposedDpEvent(to_dp_event(event.event), event.count)
    return dpe.ComposedDpEvent([to_dp_event(e) for e in event.events])


def dp_sgd_steps(noise_multiplier: float, sample_rate: float, steps: int, max_grad_norm: float) -> Mechanism:
    """``steps`` DP-SGD steps: Poisson sampling at ``sample_rate``, clipping to ``max_grad_norm``, noise std
    ``noise_multiplier * max_grad_norm`` on the summed gradient."""
    step = GaussianEvent(sensitivity=max_grad_norm, std=noise_multiplier * max_grad_norm)
    return SelfComposed(event=PoissonSampled(sampling_probability=sample_rate, event=step), count=steps)


def gaussian_releases(noise_multiplier: float, sensitivity: float, count: int) -> Mechanism:
    """``count`` releases of a vector of L2 ``sensitivity`` with noise std ``noise_multiplier * sensitivity``."""
    return SelfComposed(event=GaussianEvent(sensitivity=sensitivity, std=noise_multiplier * sensitivity), count=count)


class UnaccountedMechanism(ValueError):
    """A mechanism the enforcing accountant does not analyse (it is never released)."""


def step_records(event: Mechanism, count: int = 1) -> list[StepRecord]:
    """The enforcing accountant's view of ``event``: (noise multiplier, sample rate, steps) records.

    Raises
    ------
    UnaccountedMechanism
        For Laplace or randomized response, or sampling of anything but a Gaussian.
    """
    if isinstance(event, GaussianEvent):
        return [StepRecord(event.std / event.sensitivity, 1.0, count)]
    if isinstance(event, PoissonSampled) and isinstance(event.event, GaussianEvent):
        inner = event.event
        return [StepRecord(inner.std / inner.sensitivity, event.sampling_probability, count)]
    if isinstance(event, SelfComposed):
        return step_records(event.event, count * event.count)
    if isinstance(event, Composed):
        return [r for e in event.events for r in step_records(e, count)]
    raise UnaccountedMechanism(f"the enforcing accountant does not analyse a {event.type} event")


def same_records(a: list[StepRecord], b: list[StepRecord]) -> bool:
    """Whether two record lists describe the same composition (up to float rounding)."""
    if len(a) != len(b):
        return False
    return all(
        x.steps == y.steps
        and math.isclose(x.noise_multiplier, y.noise_multiplier, rel_tol=1e-9)
        and math.isclose(x.sample_rate, y.sample_rate, rel_tol=1e-9)
        for x, y in zip(a, b, strict=True)
    )
