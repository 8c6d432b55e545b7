"""FedAvg over agencies that may refuse rounds, with evaluation from aggregates only.

Differences from Flower's FedAvg: a reply may be a refusal (an agency whose budget would be
overspent); refusals and errors are reported through ``on_event`` and left out of the average; a
round with fewer than ``min_agencies`` trained updates leaves the model unchanged. Evaluation
replies carry score histograms, summed here into pooled AUC, accuracy and Brier score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvgM

from federation.metrics import metrics_from_histograms

EventSink = Callable[[dict[str, Any]], None]


@dataclass
class AgencyRecord:
    """What the coordinator learned of one agency over a run (as the agency reported it)."""

    rounds_trained: int = 0
    refusals: int = 0
    errors: int = 0
    epsilon_job: float = 0.0
    epsilon_lifetime: float = 0.0
    dataset: str = ""
    last_reason: str = ""


@dataclass
class RunLog:
    """Per-agency records and per-round pooled metrics."""

    agencies: dict[str, AgencyRecord] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    aggregated_rounds: int = 0


class AgencyFedAvg(FedAvgM):
    """FedAvg weighted by training rows, aware of refusals; see the module docstring.

    Built on Flower's FedAvgM: with ``server_learning_rate=1`` and ``server_momentum=0`` (the spec's
    defaults) it is plain FedAvg; server momentum costs no privacy (it post-processes DP updates).

    Parameters
    ----------
    min_agencies
        Fewest trained updates for a round to change the model.
    on_event
        Receives one dict per notable event (``round``, ``refusal``, ``error``).
    """

    def __init__(self, min_agencies: int, on_event: EventSink | None = None, **kwargs: Any) -> None:
        super().__init__(min_train_nodes=min_agencies, min_evaluate_nodes=min_agencies, **kwargs)
        self.min_agencies = min_agencies
        self.on_event = on_event or (lambda event: None)
        self.log = RunLog()
        self._pending: dict[str, Any] = {}

    def _agency(self, name: str) -> AgencyRecord:
        return self.log.agencies.setdefault(name, AgencyRecord())

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the trained updates; report refusals and errors."""
        replies = list(replies)
        trained: list[Message] = []
        refused: dict[str, str] = {}
        for msg in replies:
            if msg.has_error():
                self.on_event({"type": "error", "round": server_round, "reason": msg.error.reason})
                continue
            info = msg.content["agency"]
            name, metrics = str(info["name"]), msg.content["metrics"]
            record = self._agency(name)
            record.epsilon_job = float(metrics["epsilon-job"])  # type: ignore[arg-type]
            record.epsilon_lifetime = float(metrics["epsilon-lifetime"])  # type: ignore[arg-type]
            record.dataset = str(info["dataset"])
            if info["status"] == "trained":
                record.rounds_trained += 1
                trained.append(msg)
            else:
                record.refusals += 1
                record.last_reason = str(info["reason"])
                refused[name] = str(info["reason"])
                self.on_event({"type": "refusal", "round": server_round, "agency": name, "reason": str(info["reason"])})
        self._pending = {"round": server_round, "trained": len(trained), "refused": refused}
        if len(trained) < self.min_agencies:
            self.on_event(
                {
                    "type": "skipped",
                    "round": server_round,
                    "trained": len(trained),
                    "reason": f"{len(trained)} trained update(s) < minimum {self.min_agencies}",
                }
            )
            return None, None
        self.log.aggregated_rounds += 1
        arrays, _ = super().aggregate_train(server_round, trained)  # weighted average, then server momentum
        return arrays, MetricRecord({"agencies-trained": len(trained), "agencies-refused": len(refused)})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pool the agencies' validation histograms into AUC, accuracy and Brier score."""
        pos = np.zeros(0)
        neg = np.zeros(0)
        brier = 0.0
        for msg in replies:
            if msg.has_error():
                self.on_event({"type": "error", "round": server_round, "reason": msg.error.reason})
                continue
            m = msg.content["metrics"]
            p, n = np.asarray(m["hist-pos"], dtype=float), np.asarray(m["hist-neg"], dtype=float)
            pos = p if pos.size == 0 else pos + p
            neg = n if neg.size == 0 else neg + n
            brier += float(m["brier-sum"])  # type: ignore[arg-type]
        if pos.size == 0:
            return None
        pooled = metrics_from_histograms(pos, neg, brier)
        entry = {
            **self._pending,
            "type": "round",
            "round": server_round,
            **pooled.as_dict(),
            "epsilon": {k: v.epsilon_job for k, v in self.log.agencies.items()},
        }
        self.log.rounds.append(entry)
        self.on_event(entry)
        return MetricRecord({k: float(v) for k, v in pooled.as_dict().items()})
