"""The agency's Flower ClientApp (Message API): translates messages to ``clients.rounds`` calls.

``make_client_app(resolve_site)`` builds the app for any engine; ``resolve_site`` maps a node's
context to its ``AgencySite``. The module-level ``app`` (the ``[tool.flwr.app]`` component) reads the
site from the SuperNode's node config: ``agency``, ``spec``, ``data`` and ``home``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.rounds import TrainRequest, evaluate_round, train_round
from clients.site import AgencySite

SiteResolver = Callable[[Context], AgencySite]


def site_from_node_config(context: Context) -> AgencySite:
    """The site described by a SuperNode's ``--node-config``."""
    cfg = context.node_config
    return AgencySite(
        agency=str(cfg["agency"]),
        spec_path=Path(str(cfg["spec"])),
        data_path=Path(str(cfg["data"])),
        home=Path(str(cfg["home"])),
    )


def make_client_app(resolve_site: SiteResolver = site_from_node_config) -> ClientApp:
    """A ClientApp whose train and evaluate handlers run at the site ``resolve_site`` names."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        logging.getLogger("flwr").setLevel(logging.WARNING)  # Opacus may lower it
        site = resolve_site(context)
        config = msg.content.config_records["config"]
        request = TrainRequest(
            job=str(config["job"]),
            round=int(config["server-round"]),  # type: ignore[arg-type]
            rounds=int(config["rounds"]),  # type: ignore[arg-type]
            spec_sha256=str(config["spec-sha256"]),
            arrays=msg.content.array_records["arrays"].to_numpy_ndarrays(),
        )
        reply = train_round(site, request)
        content = RecordDict(
            {
                "agency": ConfigRecord(
                    {
                        "name": reply.agency,
                        "status": reply.status,
                        "reason": reply.reason or "",
                        "dataset": reply.dataset,
                    }
                ),
                "metrics": MetricRecord(
                    {
                        "num-examples": reply.num_examples,
                        "epsilon-job": reply.epsilon_job,
                        "epsilon-lifetime": reply.epsilon_lifetime,
                        "steps": reply.steps,
                        "noise-multiplier": reply.noise_multiplier,
                    }
                ),
            }
        )
        if reply.status == "trained":
            content["arrays"] = ArrayRecord(reply.arrays)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = resolve_site(context)
        reply = evaluate_round(site, msg.content.array_records["arrays"].to_numpy_ndarrays())
        content = RecordDict(
            {
                "agency": ConfigRecord({"name": reply.agency}),
                "metrics": MetricRecord(
                    {
                        "num-examples": reply.num_examples,
                        "hist-pos": reply.hist_pos,
                        "hist-neg": reply.hist_neg,
                        "brier-sum": reply.brier_sum,
                    }
                ),
            }
        )
        return Message(content, reply_to=msg)

    return app


app = make_client_app()
