"""At the agency: admit a request only if the coordinator signed its job's plan (issue 11, item 1).

Our app is public and passes every agency's app pin, so anyone who reaches the SuperLink could start
it with run-config overrides of their own. What such a stranger cannot do is sign the job's plan
with the coordinator's ledger key. Every fit and evaluate message is checked here, in the ClientApp,
before ``clients.rounds`` opens the ledger or reads a record: the agency rebuilds the plan of the
named job from its *own* spec (``federation.plan.JobPlan.from_spec``) and verifies the
``plan-signature`` against ``HOME/coordinator.pub`` (``steward start --coordinator-key``).

A request that fails is answered with the refusal alone and written to ``HOME/refused-requests.jsonl``
(not to the privacy ledger: it spent nothing, and a stranger must not be able to grow the ledger).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agencyfl.clients.site import AgencySite, site_spec
from agencyfl.federation.plan import JobPlan
from agencyfl.federation.refusal_log import append_entry, now, read_entries
from agencyfl.privacy.plan_signature import CONFIG_KEY, plan_signature_problem

REFUSED_REQUESTS = "refused-requests.jsonl"


def unsigned_reason(site: AgencySite, config: dict[str, Any]) -> str | None:
    """Why the request's job plan is not the coordinator's (unsigned, forged, another job's), or None."""
    plan = JobPlan.from_spec(site_spec(site), str(config.get("job", "")))
    return plan_signature_problem(plan.signed_bytes(), config.get(CONFIG_KEY), site.coordinator_key)


def record_refused_request(site: AgencySite, kind: str, config: dict[str, Any], reason: str) -> None:
    """Log one refused request: what was asked, and why it was refused."""
    round_ = config.get("round")
    append_entry(
        site.home / REFUSED_REQUESTS,
        {"time": now(), "kind": kind, "job": str(config.get("job", "")),
         "round": round_ if isinstance(round_, int) else None, "reason": reason},
    )  # fmt: skip


def refused_requests(home: Path) -> list[dict[str, Any]]:
    """Every request the agency refused for its plan signature, oldest first."""
    return read_entries(home / REFUSED_REQUESTS)
