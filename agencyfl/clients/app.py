"""The agency's Flower ClientApp: translates the coordinator's messages to ``clients.rounds`` calls.

Built on Flower's legacy ``NumPyClient`` because SecAgg+ (``secaggplus_mod``) exists only there in
Flower 1.41. A fit reply carries the agency's *update* (new weights minus the global weights; zeros
with weight 0 when it refuses), so secure aggregation sums small numbers that quantise well, and
the Gaussian-noised validation histograms of the global model it received, accounted in the ledger
before the reply (evaluation folded into training, one message per round instead of two). A refused
request is answered with the refusal alone.

The agency, not the coordinator, decides whether its update may travel unmasked: when its copy of
the spec turns secure aggregation on, a plain fit request is refused.

A ``query.align`` message is a step of ``coordinator align`` (``clients.alignment_steps``), answered
before any training code is reached.

``make_client_app(resolve_site)`` builds the app for any engine; ``resolve_site`` maps a node's
context to its ``AgencySite``. The module-level ``app`` (the ``[tool.flwr.app]`` component) reads the
site from the SuperNode's node config: ``agency``, ``spec``, ``data`` and ``home``. torch is imported
only by the handlers that train or evaluate: every message starts a fresh process in deployment, and
the three SecAgg+ key-exchange messages need no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from agencyfl.federation.messages import (
    ALIGN_MESSAGE_TYPE,
    VERTICAL_MESSAGE_TYPE,
    FairnessRelease,
    MessageError,
    NoisedEvaluation,
    Refusal,
    ReleaseReport,
    RoundRequest,
    Scalar,
    TrainReport,
)

if TYPE_CHECKING:
    from agencyfl.clients.rounds import EvaluationRelease, FairnessReply, TrainRequest
    from agencyfl.clients.site import AgencySite

SiteResolver = Callable[[Context], "AgencySite"]


def site_from_node_config(context: Context) -> AgencySite:
    """The site described by a SuperNode's ``--node-config``."""
    from agencyfl.clients.site import AgencySite

    cfg = context.node_config
    return AgencySite(
        agency=str(cfg["agency"]),
        spec_path=Path(str(cfg["spec"])),
        data_path=Path(str(cfg["data"])),
        home=Path(str(cfg["home"])),
        keys_dir=Path(str(cfg["keys"])) if cfg.get("keys") else None,
        coordinator_key=Path(str(cfg["coordinator_key"])) if cfg.get("coordinator_key") else None,
        root_certificate=Path(str(cfg["ca"])) if cfg.get("ca") else None,
    )


def refusal_before_reading(site: AgencySite, kind: str, config: dict[str, Scalar]) -> Refusal | None:
    """The refusal alone, if the request is not the coordinator's signed plan or cannot be read (logged)."""
    from agencyfl.clients.signed_plan import record_refused_request, unsigned_reason

    reason = unsigned_reason(site, config)
    if reason is None:
        try:
            if kind == "fit" and RoundRequest.from_config(config).max_weight is None:
                reason = "malformed RoundRequest: a fit request states max-weight"
        except MessageError as exc:
            reason = str(exc)
    if reason is None:
        return None
    record_refused_request(site, kind, config, reason)
    return Refusal(agency=site.agency, reason=reason)


def plan_request(config: dict[str, Scalar], agency: str, arrays: list[np.ndarray]) -> TrainRequest:
    """The coordinator's request as a fit or evaluate config states it, for ``clients.rounds``."""
    from agencyfl.clients.rounds import TrainRequest

    request = RoundRequest.from_config(config)
    return TrainRequest(
        job=request.job,
        round=request.round,
        rounds=request.rounds,
        spec_sha256=request.spec_sha256,
        arrays=arrays,
        epsilon=request.epsilon,
        known=request.ledger_records.get(agency),
    )


def _lifetime_rdp(site: AgencySite) -> float:
    """The ledger's lifetime epsilon by RDP alone after the reply's entries (0.0 if it cannot be read): what the
    coordinator's "never down" check compares with its record (``LedgerRecord.lost_spend``)."""
    from agencyfl.federation.errors import LedgerError
    from agencyfl.privacy.budget import lifetime_rdp

    try:
        return lifetime_rdp(site.open_ledger().events())
    except (LedgerError, OSError):
        return 0.0


def _noised(evaluation: EvaluationRelease | None) -> NoisedEvaluation | None:
    if evaluation is None:
        return None
    return NoisedEvaluation(
        hist_pos=tuple(map(float, evaluation.hist_pos)), hist_neg=tuple(map(float, evaluation.hist_neg)),
        brier_sum=evaluation.brier_sum,
    )  # fmt: skip


def _fairness(reply: FairnessReply | None) -> FairnessRelease | None:
    if reply is None or reply.status == "none":
        return None
    return FairnessRelease(status=reply.status, reason=reply.reason or "", counts=tuple(map(float, reply.counts)))


class AgencyClient(NumPyClient):
    """One agency's answers to fit (train one round) and evaluate (validation histograms)."""

    def __init__(self, site: AgencySite) -> None:
        self.site = site

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        """Train one round; return the update, its weight (rows; 0 if refused) and the round's report.

        A refused round is answered with the refusal alone (status, reason, the ledger's epsilons and
        origin): nothing computed from records, not even validation histograms.
        """
        nothing = [np.zeros_like(p) for p in parameters]
        if (refusal := refusal_before_reading(self.site, "fit", config)) is not None:
            return nothing, 0, refusal.to_metrics()  # before torch is imported: a refusal costs no training code
        from agencyfl.clients.rounds import train_round

        logging.getLogger("flwr").setLevel(logging.WARNING)  # Opacus may lower it
        reply = train_round(self.site, plan_request(config, self.site.agency, parameters))
        rdp = _lifetime_rdp(self.site)
        if reply.status != "trained" or reply.evaluation is None:
            refused = Refusal(agency=reply.agency, reason=reply.reason or "refused", epsilon_job=reply.epsilon_job,
                              epsilon_lifetime=reply.epsilon_lifetime, epsilon_lifetime_rdp=rdp,
                              origin=reply.origin)  # fmt: skip
            return nothing, 0, refused.to_metrics()
        report = TrainReport(
            agency=reply.agency, dataset=reply.dataset, epsilon_job=reply.epsilon_job,
            epsilon_lifetime=reply.epsilon_lifetime, epsilon_lifetime_rdp=rdp, origin=reply.origin, steps=reply.steps,
            noise_multiplier=reply.noise_multiplier,
            evaluation=_noised(reply.evaluation),  # the global model this round started from, noised and accounted
        )  # fmt: skip
        weight = min(reply.num_examples, RoundRequest.from_config(config).max_weight or 0)
        return [new - old for new, old in zip(reply.arrays, parameters, strict=True)], weight, report.to_metrics()

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """The final model's noised validation histograms and fairness counts, or the refusal alone."""
        if (refusal := refusal_before_reading(self.site, "evaluate", config)) is not None:
            return 0.0, 0, refusal.to_metrics()
        from agencyfl.clients.rounds import release_round

        reply = release_round(self.site, plan_request(config, self.site.agency, parameters))
        rdp = _lifetime_rdp(self.site)
        if reply.status != "released" or reply.evaluation is None:
            refused = Refusal(agency=reply.agency, reason=reply.reason or "refused", epsilon_job=reply.epsilon_job,
                              epsilon_lifetime=reply.epsilon_lifetime, epsilon_lifetime_rdp=rdp,
                              origin=reply.origin)  # fmt: skip
            return 0.0, 0, refused.to_metrics()
        report = ReleaseReport(
            agency=reply.agency, epsilon_job=reply.epsilon_job, epsilon_lifetime=reply.epsilon_lifetime,
            epsilon_lifetime_rdp=rdp, origin=reply.origin, evaluation=_noised(reply.evaluation),
            fairness=_fairness(reply.fairness),
        )  # fmt: skip
        return 0.0, 1, report.to_metrics()


def check_unmask(configs: Any, site: AgencySite) -> None:
    """Refuse to hand over key shares when fewer agencies' masked updates would be summed than is safe.

    In SecAgg+'s unmask stage the coordinator names the agencies whose masked updates it holds
    (``active``); unmasking the sum of fewer than three (or the spec's ``min_agencies``) would reveal
    an update, or let each of two agencies subtract its own. The coordinator's own check
    (``server.secure_aggregation``) is not taken on trust.

    Raises
    ------
    PermissionError
        If the unmask stage names too few active agencies.
    """
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from agencyfl.federation.spec import load_spec

    if configs.get(Key.STAGE) != Stage.UNMASK:
        return
    spec = load_spec(site.spec_path).spec
    need = max(3, spec.training.min_agencies)
    active = list(configs.get(Key.ACTIVE_NODE_ID_LIST, []))
    if len(active) < need:
        raise PermissionError(
            f"secure aggregation would unmask the sum of {len(active)} agencies' updates; this agency's spec "
            f"requires at least {need}: refusing to send key shares"
        )


def _requires_secure_aggregation(site: AgencySite) -> bool:
    from agencyfl.federation.spec import load_spec

    return load_spec(site.spec_path).spec.secure_aggregation.enabled


def make_client_app(resolve_site: SiteResolver = site_from_node_config) -> ClientApp:
    """A ClientApp for the site ``resolve_site`` names, speaking SecAgg+ when the round does."""

    def client_fn(context: Context) -> Client:
        return AgencyClient(resolve_site(context)).to_client()

    def alignment_steps(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != ALIGN_MESSAGE_TYPE:
            return call_next(msg, context)
        from agencyfl.clients.alignment_steps import handle  # numpy and cryptography only: no torch

        return handle(msg, context, resolve_site(context))

    def vertical_job(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != VERTICAL_MESSAGE_TYPE:
            return call_next(msg, context)
        from agencyfl.clients.vertical_steps import handle  # numpy, TenSEAL, cryptography, grpc: no torch

        return handle(msg, context, resolve_site(context))

    def secure_aggregation_gate(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        configs: Any = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.STAGE in configs:
            check_unmask(configs, resolve_site(context))
            reply: Message = secaggplus_mod(msg, context, call_next)
            return reply
        if _requires_secure_aggregation(resolve_site(context)):
            raise PermissionError("this agency's spec requires secure aggregation; refusing to send an unmasked update")
        return call_next(msg, context)

    return ClientApp(client_fn=client_fn, mods=[alignment_steps, vertical_job, secure_aggregation_gate])


app = make_client_app()
