"""Flower's SecAgg+ workflow with the federation's rules, and a grid that polls for replies quickly.

``AgencySecAggPlus`` stops the protocol before the unmask stage when fewer than ``min_agencies``
agencies trained (a refusal is a zero update of weight 0, so unmasking the sum of one trained agency
and three refusals would reveal that agency's update): nothing is released, the model is unchanged.

Shares and threshold: every agency holds a share of every other agency's keys (``num_shares`` = all
sampled), and ``n - 1`` shares reconstruct one (tolerates one dropout in any federation of 3 or more;
a federation of 2 tolerates none). Each stage waits at most the spec's ``timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from agencyfl.server.strategy import AgencyFedAvg

POLL_SECONDS = 0.2


class FastPollGrid:
    """A Grid whose ``send_and_receive`` polls every 0.2 s (Flower's polls every 3 s) and never waits forever.

    SecAgg+ makes four exchanges per round, so the poll interval is paid four times. Flower's legacy
    fit and evaluate workflows pass no timeout (wait for every reply); ``default_timeout`` bounds
    them, so a dead agency cannot stall the federation. Everything else goes to the wrapped grid.
    """

    def __init__(self, grid: Grid, default_timeout: float) -> None:
        self._grid = grid
        self.default_timeout = default_timeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and collect the replies until all arrive or ``timeout`` passes."""
        pending = set(self._grid.push_messages(messages))
        deadline = time.monotonic() + (self.default_timeout if timeout is None else timeout)
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(POLL_SECONDS)
        return replies


def current_round(context: Any) -> int:
    """The round the legacy workflow is running (1-based within this run)."""
    return int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])


def protocol_shape(agencies: int) -> tuple[int | float, int | float]:
    """(num_shares, reconstruction_threshold) for ``agencies`` participants, as Flower expects them."""
    if agencies >= 3:
        return agencies, agencies - 1
    return 1.0, 1.0  # two agencies: both shares needed (Flower rejects integer shares <= 2)


class AgencySecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ that halts before unmasking when too few agencies trained; see the module docstring."""

    def __init__(self, agencies: int, min_agencies: int, timeout: float, max_weight: int) -> None:
        shares, threshold = protocol_shape(agencies)
        super().__init__(
            num_shares=shares,
            reconstruction_threshold=threshold,
            max_weight=float(max_weight),
            timeout=timeout,
        )
        self.min_agencies = min_agencies

    def __call__(self, grid: Grid, context: Any) -> None:
        """Run one round of the protocol; report a round that ends without an aggregate."""
        strategy = context.strategy
        assert isinstance(strategy, AgencyFedAvg)
        before = strategy.log.aggregated_rounds
        self._reported = False
        super().__call__(grid, context)
        if strategy.log.aggregated_rounds == before and not self._reported:
            server_round = current_round(context)
            strategy.on_event(
                {
                    "type": "skipped",
                    "round": strategy.job_round(server_round),
                    "trained": 0,
                    "reason": "secure aggregation halted: too few agencies answered within the timeout",
                }
            )

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Send the protocol's settings; agencies silent here leave the protocol.

        Flower keeps such an agency among the sampled ones, and its unmask stage then looks for its key
        shares, which nobody holds (it never shared any), and halts the round. An agency that never
        sent its public keys is in no one's masks, so dropping it is exact.
        """
        ok = super().setup_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        return ok

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Collect the masked updates; stop here unless at least ``min_agencies`` of them trained."""
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        results = state.legacy_results
        trained = sum(1 for _, res in results if res.metrics.get("status") == "trained")
        if trained >= self.min_agencies:
            return True
        strategy = context.strategy
        assert isinstance(strategy, AgencyFedAvg)
        server_round = current_round(context)
        strategy.take_replies(server_round, results, state.failures)
        strategy.skip(server_round, trained)
        self._reported = True
        return False
