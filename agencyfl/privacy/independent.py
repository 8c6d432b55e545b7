"""Every epsilon recomputed by an accountant we did not write: Google dp_accounting's RDP and PLD.

The enforcing accountant (``privacy.accounting``: Opacus' RDP analysis, or the exact GDP figure when every
release is a Gaussian without sampling) decides refusals. An auditor recomputes the same figures from the
ledger's mechanism events (``privacy.events``, mapped one to one onto ``DpEvent``) with dp_accounting under
the ledger's declared relation (add or remove one household):

- RDP must agree with our RDP figure within ``RDP_TOLERANCE`` (relative): the same analysis written twice, evaluated
  on the enforcing accountant's grid of orders (the grid is a parameter of the bound: on another grid a lone
  release, whose best order is the grid's largest, gets a different figure). Measured (a grid of sigma
  0.6-40, q 0.005-1, 1-5,000 steps): agreement to about 1e-7 where epsilon is small, dp_accounting 0.36%
  higher at epsilon 10.4, 11% higher at epsilon 43 (the libraries evaluate the fractional orders near 1,
  where a large epsilon is optimised, differently). 1% covers every budget this system runs (at most 10);
  a larger gap is a finding, even where the ledger is also overspent;
- PLD must not exceed the enforced figure by more than ``PLD_SLACK``: it is the tighter bound, so a PLD
  figure above the enforced one would mean enforcement under-counted. PLD runs with a pessimistic
  discretization (an upper bound on the true epsilon) of interval ``PLD_INTERVAL``.
- Where the enforced figure is the exact GDP one (below our RDP figure), it is the true epsilon, and PLD's
  pessimistic figure must lie at or above it and within ``PLD_INTERVAL`` of it (measured: 1e-6 to 3e-5
  above, sigma 1-100, 1-101 releases): a PLD figure further above means the closed form under-counted,
  one below it means the closed form is wrong the other way. Two computations that share no code: the
  closed form (dp_accounting's hockey-stick divergence of one Gaussian) and the discretized composition.

Entries of older formats carry no event; theirs is read off the flat fields (``legacy_event``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

from dp_accounting import dp_event as dpe
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from agencyfl.privacy.accounting import ORDERS as ENFORCING_ORDERS
from agencyfl.privacy.events import (
    NEIGHBOURING,
    GaussianEvent,
    Mechanism,
    PoissonSampled,
    SelfComposed,
    to_dp_event,
)
from agencyfl.privacy.ledger import Finding, LedgerEvent

RDP_TOLERANCE = 1e-2
PLD_SLACK = 1e-6
PLD_INTERVAL = 1e-3
RELATIONS = {NEIGHBOURING: NeighboringRelation.ADD_OR_REMOVE_ONE}
ORDERS = list(ENFORCING_ORDERS)  # the enforcing accountant's orders (Opacus')


def legacy_event(entry: LedgerEvent) -> Mechanism:
    """The mechanism of an entry written before events were recorded, from its flat fields.

    Only the noise-to-sensitivity ratio was recorded, so the sensitivity is taken as 1 (the ratio is
    all an accountant needs).
    """
    gaussian = GaussianEvent(sensitivity=1.0, std=entry.noise_multiplier)
    step: Mechanism = (
        gaussian if entry.sample_rate >= 1.0 else PoissonSampled(sampling_probability=entry.sample_rate, event=gaussian)
    )
    return SelfComposed(event=step, count=entry.steps)


def _composition(entries: Iterable[LedgerEvent]) -> dpe.DpEvent | None:
    """All spending entries as one DpEvent; identical mechanisms grouped (composition commutes), so that a
    ledger of many rounds of one mechanism is one self-composition, as fast to analyse as one round."""
    counts: dict[str, tuple[Mechanism, int]] = {}
    for entry in entries:
        if entry.kind == "refusal" or (entry.mechanism is None and entry.steps <= 0):
            continue
        event = entry.mechanism if entry.mechanism is not None else legacy_event(entry)
        key = json.dumps(event.model_dump(mode="json"), sort_keys=True)
        counts[key] = (event, counts.get(key, (event, 0))[1] + 1)
    if not counts:
        return None
    parts = [
        to_dp_event(event) if n == 1 else dpe.SelfComposedDpEvent(to_dp_event(event), n) for event, n in counts.values()
    ]
    return parts[0] if len(parts) == 1 else dpe.ComposedDpEvent(parts)


@dataclass(frozen=True)
class Recomputed:
    """One epsilon: ours (enforced), our RDP figure, and dp_accounting's RDP and PLD figures for the same
    entries."""

    ours: float
    ours_rdp: float
    dp_accounting_rdp: float
    dp_accounting_pld: float

    def findings(self, what: str) -> list[Finding]:
        """Disagreements beyond the stated tolerances, as ``epsilon`` findings."""
        found = []
        if not math.isclose(self.ours_rdp, self.dp_accounting_rdp, rel_tol=RDP_TOLERANCE, abs_tol=1e-9):
            found.append(
                Finding(
                    "epsilon",
                    f"{what}: dp_accounting's RDP gives epsilon {self.dp_accounting_rdp:.6f}, ours "
                    f"{self.ours_rdp:.6f} (tolerance {RDP_TOLERANCE:g} relative)",
                )
            )
        if self.ours > self.ours_rdp + 1e-12:
            found.append(Finding("epsilon", f"{what}: enforced epsilon {self.ours:.6f} above our RDP figure"))
        exact = self.ours < self.ours_rdp  # the exact GDP figure was enforced
        if exact and not (self.ours - PLD_SLACK <= self.dp_accounting_pld <= self.ours + PLD_INTERVAL):
            found.append(
                Finding(
                    "epsilon",
                    f"{what}: dp_accounting's PLD gives epsilon {self.dp_accounting_pld:.6f}, the exact GDP figure "
                    f"enforced is {self.ours:.6f} (PLD must lie at or above it, within {PLD_INTERVAL:g})",
                )
            )
        if not exact and self.dp_accounting_pld > self.ours + PLD_SLACK:
            found.append(
                Finding(
                    "epsilon",
                    f"{what}: dp_accounting's PLD gives epsilon {self.dp_accounting_pld:.6f}, above the enforced "
                    f"{self.ours:.6f} (PLD is the tighter bound: enforcement under-counted)",
                )
            )
        return found


def recompute(entries: list[LedgerEvent], ours: float, ours_rdp: float, delta: float | None) -> Recomputed:
    """dp_accounting's RDP and PLD epsilons at ``delta`` for ``entries``, beside ``ours`` (enforced) and
    ``ours_rdp``."""
    event = _composition(entries)
    if event is None or not delta:
        return Recomputed(ours, ours_rdp, 0.0, 0.0)
    relation = RELATIONS[NEIGHBOURING]
    rdp = RdpAccountant(orders=ORDERS, neighboring_relation=relation)
    rdp.compose(event)
    pld = PLDAccountant(neighboring_relation=relation, value_discretization_interval=PLD_INTERVAL)
    pld.compose(event)
    return Recomputed(ours, ours_rdp, float(rdp.get_epsilon(delta)), float(pld.get_epsilon(delta)))


def relation_findings(entries: list[LedgerEvent]) -> list[Finding]:
    """Entries declaring a neighbouring relation other than the ledger's one."""
    return [
        Finding(
            "epsilon",
            f"entry {index}: declares neighbouring relation {e.neighbouring!r}; every entry of a ledger is "
            f"analysed under {NEIGHBOURING!r} (add or remove one household)",
        )
        for index, e in enumerate(entries)
        if e.neighbouring is not None and e.neighbouring != NEIGHBOURING
    ]
