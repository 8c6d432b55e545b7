"""FedAvg with server momentum over agencies that may refuse rounds, aware of secure aggregation.

Agencies reply with updates (new minus global weights), weighted by their training rows; a refusal
is a zero update of weight 0 plus its reason in the metrics. Under SecAgg+ every reply's parameters
are already the weighted average (Flower's workflow puts the unmasked sum in each); without it the
average is taken here. A round with fewer than ``min_agencies`` trained updates leaves the model
unchanged. Fit replies also carry the validation histograms of the global model they started from,
pooled here into AUC, accuracy and Brier score for that model (round ``r`` evaluates the model after
round ``r - 1``); the final model is evaluated by one evaluate message at the end.

Built on Flower's legacy ``FedAvg`` (SecAgg+ needs the legacy workflow in Flower 1.41).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from agencyfl.federation.messages import (
    LedgerRecord,
    MessageError,
    NoisedEvaluation,
    Refusal,
    ReleaseReport,
    RoundRequest,
    TrainReport,
)
from agencyfl.federation.metrics import metrics_from_histograms
from agencyfl.privacy.coordinator_ledger import AgencyReport

EventSink = Callable[[dict[str, Any]], None]
Checkpoint = Callable[[int, list[np.ndarray], list[np.ndarray]], object]
RoundClosed = Callable[[int, list[AgencyReport], list[np.ndarray], bool], object]
ReleasesClosed = Callable[[int, list[AgencyReport], list[np.ndarray]], object]


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
    fairness_counts: np.ndarray | None = None  # pooled over the agencies that released them
    fairness_status: dict[str, str] = field(default_factory=dict)  # agency -> exact | noised | refused: ...


@dataclass(frozen=True)
class JobPlan:
    """What every fit message tells the agencies, and where this run starts within the job."""

    job: str
    rounds: int
    spec_sha256: str
    max_weight: int
    first_round: int = 1  # > 1 when resuming from a checkpoint
    epsilon: float | None = None  # the per-job epsilon of the spec (agencies check it against their own)
    signature: str = ""  # the coordinator's signature over the job's plan (privacy.plan_signature)


class AgencyFedAvg(FedAvg):
    """See the module docstring.

    Parameters
    ----------
    plan
        The job, its planned rounds and the round this run starts at.
    weights, velocity
        The global model and the server-momentum buffer to start from (a checkpoint when resuming).
    min_agencies
        Fewest trained updates for a round to change the model.
    secure
        Whether replies come through SecAgg+ (their parameters are then the aggregate already).
    on_event
        Receives one dict per notable event (``round``, ``refusal``, ``error``, ``skipped``).
    checkpoint
        Called with (round, weights, velocity) after each aggregated round.
    round_closed
        Called after every round that got replies, aggregated or not, with (round, the agencies'
        reports, the global weights after the round, whether it aggregated): the coordinator's
        countersigned chain.
    known
        The coordinator's chain's record of each agency's ledger (``origin``, ``epsilon_lifetime``):
        sent to the agencies, which refuse a round when their ledger disagrees, and checked against
        every reply: a reply from a restarted ledger, or with a lower lifetime epsilon, is refused.
    releases_closed
        Called after the final evaluation with (its round, the agencies' reports, the final weights):
        the coordinator's chain records which releases each agency sent.
    """

    def __init__(
        self,
        plan: JobPlan,
        weights: list[np.ndarray],
        *,
        velocity: list[np.ndarray] | None = None,
        min_agencies: int,
        min_available: int,
        secure: bool,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        on_event: EventSink | None = None,
        checkpoint: Checkpoint | None = None,
        round_closed: RoundClosed | None = None,
        known: dict[str, LedgerRecord] | None = None,
        releases_closed: ReleasesClosed | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=min_available,
            min_evaluate_clients=min_available,
            min_available_clients=min_available,
            initial_parameters=ndarrays_to_parameters(weights),
            accept_failures=True,
        )
        self.plan = plan
        self.weights = [w.copy() for w in weights]
        self.velocity = velocity if velocity is not None else [np.zeros_like(w) for w in weights]
        self.min_agencies = min_agencies
        self.secure = secure
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.on_event = on_event or (lambda event: None)
        self.checkpoint = checkpoint or (lambda r, w, v: None)
        self.round_closed = round_closed or (lambda r, reports, w, aggregated: None)
        self._reports: dict[int, list[AgencyReport]] = {}  # each round's replies, by job round
        self.log = RunLog()
        self._round_info: dict[int, dict[str, Any]] = {}  # what each round's replies said, by job round
        self.known: dict[str, LedgerRecord] = dict(known or {})
        self.releases_closed = releases_closed or (lambda r, reports, w: None)
        self.on_fit_config_fn = self._fit_config
        self.on_evaluate_config_fn = self._evaluate_config

    def job_round(self, server_round: int) -> int:
        """The round number within the job (runs resumed from a checkpoint start past 1)."""
        return self.plan.first_round + server_round - 1

    def _request(self, server_round: int) -> RoundRequest:
        return RoundRequest(
            job=self.plan.job,
            round=self.job_round(server_round),
            rounds=self.plan.rounds,
            spec_sha256=self.plan.spec_sha256,
            max_weight=self.plan.max_weight,
            epsilon=self.plan.epsilon,
            ledger_records=self.known,
            plan_signature=self.plan.signature,
        )

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        return self._request(server_round).to_config()

    def _evaluate_config(self, server_round: int) -> dict[str, Scalar]:
        # the final releases come after the last round; no update travels, so no weight cap
        final = self._request(server_round).model_copy(update={"round": self.plan.rounds + 1, "max_weight": None})
        return final.to_config()

    def _judge(
        self, agency: str, origin: str, epsilon_lifetime: float, epsilon_lifetime_rdp: float = 0.0
    ) -> str | None:
        """Why a reply from ``agency`` must be refused (its ledger restarted, its epsilon went down), or None.
        ``epsilon_lifetime_rdp``: the reply's lifetime by RDP alone (0: not reported), compared like with like
        (``LedgerRecord.lost_spend``)."""
        known = self.known.get(agency)
        if known is None:
            return None
        if known.origin and origin and known.origin != origin:
            return f"ledger restarted: the chain records origin {known.origin[:12]}, the reply {origin[:12]}"
        lost = known.lost_spend(epsilon_lifetime, epsilon_lifetime_rdp or None)
        if lost is not None:
            return f"lifetime epsilon went down: {lost[0]:.4f} < {lost[1]:.4f} recorded before"
        return None

    def _agency(self, name: str) -> AgencyRecord:
        return self.log.agencies.setdefault(name, AgencyRecord())

    def take_replies(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]) -> int:
        """Record the replies (spend, refusals, errors, evaluation); return how many agencies trained.

        A reply that does not parse counts as a failure and is left out of the average.
        """
        job_round = self.job_round(server_round)
        parsed: list[tuple[FitRes, TrainReport | Refusal]] = []
        for proxy, res in results:
            try:
                parsed.append((res, TrainReport.from_metrics(res.metrics)))
            except MessageError as exc:
                res.num_examples = 0
                failures = [*failures, f"a reply from node {getattr(proxy, 'cid', '?')}: {exc}"]
        self._record_evaluation(job_round - 1, [(r.agency, r.evaluation) for _, r in parsed if r.status == "trained"])
        for failure in failures:
            self.on_event({"type": "error", "round": job_round, "reason": _failure_reason(failure)})
        trained = 0
        reports = self._reports[job_round] = []
        for res, reply in parsed:
            judged = self._judge(reply.agency, reply.origin, reply.epsilon_lifetime, reply.epsilon_lifetime_rdp)
            rejection = judged if reply.status == "trained" else None
            report = AgencyReport.of(reply, judged=judged)
            reports.append(report)
            record = self._agency(reply.agency)
            record.epsilon_job = reply.epsilon_job
            record.epsilon_lifetime = reply.epsilon_lifetime
            if isinstance(reply, TrainReport):
                record.dataset = reply.dataset
            if rejection is not None:
                res.num_examples = 0  # left out of the average (under SecAgg+ the agency refuses itself)
                record.refusals += 1
                record.last_reason = rejection
                self.on_event({"type": "rejected", "round": job_round, "agency": reply.agency, "reason": rejection})
                continue
            if reply.origin and judged is None:
                self.known[reply.agency] = LedgerRecord.following(
                    self.known.get(reply.agency),
                    reply.origin,
                    reply.epsilon_lifetime,
                    reply.epsilon_lifetime_rdp or None,
                )
            if reply.status == "trained":
                record.rounds_trained += 1
                trained += 1
            else:
                record.refusals += 1
                record.last_reason = reply.reason
                self.on_event({"type": "refusal", "round": job_round, "agency": reply.agency, "reason": reply.reason})
        self._round_info[job_round] = {
            "trained": trained,
            "refused": len(parsed) - trained,
            "failed": len(failures),
            "epsilon": {k: v.epsilon_job for k, v in self.log.agencies.items()},
        }
        return trained

    def skip(self, server_round: int, trained: int) -> None:
        """Report a round that leaves the model unchanged."""
        reason = f"{trained} trained update(s) < minimum {self.min_agencies}"
        job_round = self.job_round(server_round)
        self.round_closed(job_round, self._reports.get(job_round, []), self.weights, False)
        self.on_event({"type": "skipped", "round": job_round, "trained": trained, "reason": reason})

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Average the trained updates (or take SecAgg+'s average), then apply server momentum."""
        trained = self.take_replies(server_round, results, failures)
        if trained < self.min_agencies:
            self.skip(server_round, trained)
            return None, {}
        if self.secure:
            update = parameters_to_ndarrays(results[0][1].parameters)
        else:
            pairs = [
                (parameters_to_ndarrays(res.parameters), res.num_examples) for _, res in results if res.num_examples > 0
            ]
            total = sum(n for _, n in pairs)
            update = [np.sum([arrays[i] * n for arrays, n in pairs], axis=0) / total for i in range(len(self.weights))]
        self.velocity = [self.server_momentum * v + u for v, u in zip(self.velocity, update, strict=True)]
        self.weights = [w + self.server_learning_rate * v for w, v in zip(self.weights, self.velocity, strict=True)]
        self.log.aggregated_rounds += 1
        job_round = self.job_round(server_round)
        self.round_closed(job_round, self._reports.get(job_round, []), self.weights, True)
        self.checkpoint(job_round, self.weights, self.velocity)
        return ndarrays_to_parameters(self.weights), {"agencies-trained": trained}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Evaluate only the final model: earlier ones are evaluated by the next round's fit replies.

        A job that never aggregated a model asks for nothing (every release spends budget).
        """
        if self.job_round(server_round) < self.plan.rounds:
            return []
        if self.log.aggregated_rounds == 0 and self.plan.first_round == 1:
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Pool the final model's validation histograms; record each agency's releases (or refusal)."""
        final = self.plan.rounds + 1
        replies: list[ReleaseReport | Refusal] = []
        for proxy, res in results:
            try:
                replies.append(ReleaseReport.from_metrics(res.metrics))
            except MessageError as exc:
                failures = [*failures, f"a reply from node {getattr(proxy, 'cid', '?')}: {exc}"]
        for failure in failures:
            self.on_event({"type": "error", "round": final, "reason": _failure_reason(failure)})
        reports = []
        for reply in replies:
            judged = self._judge(reply.agency, reply.origin, reply.epsilon_lifetime, reply.epsilon_lifetime_rdp)
            reports.append(AgencyReport.of(reply, judged=judged))
            record = self._agency(reply.agency)
            record.epsilon_job = reply.epsilon_job  # after the final releases: the job's whole spend
            record.epsilon_lifetime = reply.epsilon_lifetime
            if isinstance(reply, Refusal):
                record.refusals += 1
                record.last_reason = reply.reason
                self.on_event({"type": "refusal", "round": final, "agency": reply.agency, "reason": reply.reason})
        self.releases_closed(final, reports, self.weights)
        accepted = [r for r, report in zip(replies, reports, strict=True) if report.accepted]
        released = [r for r in accepted if isinstance(r, ReleaseReport)]
        entry = self._record_evaluation(self.job_round(server_round), [(r.agency, r.evaluation) for r in released])
        self._pool_fairness(released)
        return (None, {}) if entry is None else (float(entry["brier"]), {"auc": float(entry["auc"])})

    def _pool_fairness(self, replies: list[ReleaseReport]) -> None:
        """Add up the fairness counts the agencies released; note who sent none and why."""
        for reply in replies:
            fairness = reply.fairness
            if fairness is None:
                continue
            if fairness.status == "noised":
                counts = np.asarray(fairness.counts, dtype=np.float64)
                pooled = self.log.fairness_counts
                self.log.fairness_counts = counts.copy() if pooled is None else pooled + counts
                self.log.fairness_status[reply.agency] = fairness.status
            else:
                self.log.fairness_status[reply.agency] = f"{fairness.status}: {fairness.reason}"

    def _record_evaluation(
        self, model_round: int, releases: list[tuple[str, NoisedEvaluation | None]]
    ) -> dict[str, Any] | None:
        present = [(agency, e) for agency, e in releases if e is not None]  # refusals carry no evaluation
        if not present:
            return None
        pos = np.sum([e.hist_pos for _, e in present], axis=0)
        neg = np.sum([e.hist_neg for _, e in present], axis=0)
        brier = sum(e.brier_sum for _, e in present)
        pooled = metrics_from_histograms(np.asarray(pos), np.asarray(neg), brier)
        entry = {
            "type": "round",
            "round": model_round,
            "trained": 0,
            # as of the last recorded round (0 before any: the initial model cost nothing)
            "epsilon": {agency: self._agency(agency).epsilon_job for agency, _ in present},
            **self._round_info.get(model_round, {}),
            **pooled.as_dict(),
        }
        self.log.rounds.append(entry)
        self.on_event(entry)
        return entry


def _failure_reason(failure: Any) -> str:
    if isinstance(failure, BaseException):
        return str(failure) or type(failure).__name__
    return str(failure)
