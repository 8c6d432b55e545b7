"""One accounting step record, in a module of its own so that reading a ledger imports no accountant.

Every ClientApp process of a deployment opens the agency's ledger or its site (a SecAgg+ key exchange, an
alignment step); importing Opacus' accountants (and with them torch) there cost seconds of CPU per message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Accountant = Literal["rdp", "rdp+gdp"]
"""How an epsilon was computed (``privacy.accounting``): "rdp", Opacus' RDP alone (ledger entries written
before entries named their accountant); "rdp+gdp", the least of that and, for Gaussian releases without
sampling, the exact GDP figure."""

ACCOUNTANT: Accountant = "rdp+gdp"
"""What enforces today (``privacy.accounting.epsilon_for``)."""


@dataclass(frozen=True)
class StepRecord:
    """``steps`` steps of the Poisson-subsampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int
