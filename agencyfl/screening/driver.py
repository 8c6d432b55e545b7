"""The coordinator's side of a screening in a deployment: the relay over the parties' streams.

It forwards civil affairs' signed public context and each agency's signed partial scores (civil affairs
adds them: the coordinator can neither open nor replace them), relays the sealed lists and reasons
between civil affairs and the agencies that chose to explain, and records the screening in its own
uses ledger with the hash of civil affairs' entry (never the counts, which stay with civil affairs).
``docs/screening.md``, "In a deployment".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agencyfl.alignment.sealed import unpack
from agencyfl.federation.errors import MessageRejectedError
from agencyfl.privacy.ledger import Ledger
from agencyfl.screening.records import COORDINATOR, ModelUse, now_iso
from agencyfl.screening.remote import ScreeningPlan
from agencyfl.screening.session import model_files
from agencyfl.vertical.stream import Frame, StreamHub

EventSink = Callable[[dict[str, Any]], None]


def drive_screening(
    hub: StreamHub, plan: ScreeningPlan, model_dir: Path, uses: Ledger[ModelUse], token_holder: str,
    run_dir: Path, sink: EventSink, connect_timeout: float = 600.0, step_timeout: float = 600.0,
    previous_dir: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run one screening on the parties' streams; returns the summary (also ``run_dir/summary.json``).

    Raises
    ------
    AgencyflError
        A party's refusal or failure (its class: ModelError for a part that does not match, ...), or a
        party that dropped (PartyDropped). Nothing is recorded at the coordinator then.
    """
    requester, agencies = plan.requester, [p for p in plan.parties if p != plan.requester]
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"screening": plan.screening, "model_version": plan.model_version,
                               "purpose": plan.purpose, "requester": requester, "status": "started"}  # fmt: skip
    sent: dict[str, int] = {}
    try:
        hellos = hub.wait_for_all(connect_timeout)
        names = list(hellos)
        setup = Frame("setup", {"certificates": names}, [b"", *(hellos[n].blobs[1] for n in names)])
        hub.call_all({p: setup for p in plan.parties}, step_timeout)
        sink({"type": "step", "step": "connected"})
        files = model_files(model_dir) + (model_files(previous_dir) if previous_dir is not None else [])
        asked = hub.call(requester, Frame("screen-request", blobs=files), step_timeout)
        context = asked.blobs[0]
        signature = str(asked.fields.get("signature", ""))
        fields = {"register_size": int(asked.fields["register_size"]), "fingerprint": str(asked.fields["fingerprint"]),
                  "signature": signature}  # fmt: skip
        sent[requester] = len(context)
        parts = hub.call_all({a: Frame("screen-partial", fields, [context]) for a in agencies}, step_timeout)
        sink({"type": "step", "step": "scored"})
        # relayed as each agency signed them: civil affairs adds them itself, so no sum of ours could pass
        senders = sorted(parts)
        relayed = Frame("screen-scores", {
            "senders": senders, "chunks": [len(parts[a].blobs) for a in senders],
            "signatures": [str(parts[a].fields.get("signature", "")) for a in senders],
            "previous_signatures": [str(parts[a].fields.get("previous_signature", "")) for a in senders],
        }, [blob for a in senders for blob in parts[a].blobs])  # fmt: skip
        sent |= {a: f.nbytes for a, f in parts.items()}
        sent[COORDINATOR] = relayed.nbytes + len(context) * len(agencies)
        scored = hub.call(requester, relayed, step_timeout)
        reasons = []
        for blob in scored.blobs:  # civil affairs' sealed lists, one per agency that chose to explain
            envelope = unpack(blob)
            if envelope.sender != requester or envelope.recipient not in agencies:
                raise MessageRejectedError(f"a list from {envelope.sender!r} to {envelope.recipient!r}: not relayed")
            answer = hub.call(envelope.recipient, Frame("screen-explain", blobs=[blob]), step_timeout)
            reply = unpack(answer.blobs[0]) if len(answer.blobs) == 1 else None
            if reply is None or reply.sender != envelope.recipient or reply.recipient != requester:
                raise MessageRejectedError(f"an answer from {envelope.recipient!r} not sealed to {requester!r}")
            reasons.append(answer.blobs[0])  # reasons or a refusal: only civil affairs can tell
        sink({"type": "step", "step": "explained"})
        finish = Frame("screen-finish", {"sent": sent, "token_holder": token_holder}, reasons)
        done = hub.call(requester, finish, step_timeout)
        uses.append(ModelUse(
            kind="screening", owner=COORDINATOR, screening=plan.screening, federation=plan.federation,
            model_version=plan.model_version, purpose=plan.purpose, requester=requester, time=now_iso(),
            token_id=plan.token_id, households=int(done.fields["households"]),
            requester_entry_sha256=str(done.fields["requester_entry_sha256"]),
            previous_model=plan.previous.model_version if plan.previous else None,
        ))  # fmt: skip
    except BaseException as exc:
        # only the class travels: one party's message is no business of the others
        hub.end(Frame("abort", {"reason": f"stopped at the coordinator ({type(exc).__name__})"}))
        summary.update(status="stopped", error={"class": type(exc).__name__, "message": str(exc)})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        sink({"type": "failed", "error": type(exc).__name__, "message": str(exc)})
        raise
    hub.end(Frame("end"))
    summary.update(
        status="recorded", households_scored=int(done.fields["households"]), bytes=sent,
        worklists_at_requester=done.fields["files"],
        requester_entry_sha256=done.fields["requester_entry_sha256"], uses_ledger=str(uses.directory),
        since=plan.since, previous_model=plan.previous.model_version if plan.previous else None,
    )  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    sink({"type": "done", "screening": plan.screening})
    return summary
