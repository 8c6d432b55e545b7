"""Only the coordinator starts jobs and alignments: an HMAC over each run's config, checked by the ServerApp.

Open-source Flower 1.41 authenticates no one on the SuperLink's Control API: anyone who reaches its
port can submit our (public) app with a run config of their own, and our SuperExec launches it,
since it is the pinned app. The ServerApp signs job and alignment plans with the coordinator's
ledger key, so it must not act on a stranger's run. The coordinator's CLI (``submit_run``) adds
``authorization = TIME.NONCE.HMAC-SHA256(superexec.secret, the run's settings)``; the ServerApp,
launched by the coordinator's SuperExec with ``AGENCYFL_COORDINATOR_DIR`` in its environment, takes the
ledger key and work folder from that folder (never from the run config), checks the HMAC, its age and
that it was not used before (Flower lists every run's config to anyone, so a seen authorization must
not be replayable), and otherwise records the refusal in ``coord/refused-runs.jsonl`` and does nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

ENV = "AGENCYFL_COORDINATOR_DIR"
CONFIG_KEY = "authorization"
MAX_AGE_SECONDS = 600.0  # `flwr run` starts the ServerApp within seconds; a long-lived token helps only a replay
SIGNED_FIELDS = ("task", "spec", "job", "resume", "requested-by")
USED_FILE = "authorized-runs.txt"


def _mac(secret: bytes, fields: Mapping[str, object], stamp: str) -> str:
    settings = {name: str(fields.get(name, "")).lower() if name == "resume" else str(fields.get(name, ""))
                for name in SIGNED_FIELDS}  # fmt: skip
    body = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(secret, b"agencyfl run v1\n" + stamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def authorize(secret_file: Path, fields: Mapping[str, object]) -> str:
    """The authorization the coordinator's CLI puts in a run config it submits."""
    stamp = f"{int(time.time())}.{secrets.token_hex(8)}"
    return f"{stamp}.{_mac(secret_file.read_bytes(), fields, stamp)}"


def refusal(coordinator: Path, config: Mapping[str, object], now: float | None = None) -> str | None:
    """Why a run may not proceed (not authorized by this coordinator, stale, replayed), or None.

    An accepted authorization is remembered (``work/authorized-runs.txt``) and refused a second time.
    """
    token = str(config.get(CONFIG_KEY, ""))
    parts = token.split(".")
    if len(parts) != 3 or not parts[0].isdigit():
        return "the run was not submitted by this coordinator (no authorization)"
    stamp, mac = f"{parts[0]}.{parts[1]}", parts[2]
    try:
        secret = (coordinator / "keys" / "superexec.secret").read_bytes()
    except OSError as exc:
        return f"the coordinator's secret is unreadable ({exc.__class__.__name__})"
    if not hmac.compare_digest(mac, _mac(secret, config, stamp)):
        return "the run was not submitted by this coordinator (its authorization does not verify)"
    age = (time.time() if now is None else now) - int(parts[0])
    if not -60 <= age <= MAX_AGE_SECONDS:
        return f"the run's authorization is {age:.0f} s old (at most {MAX_AGE_SECONDS:.0f} s): submit it again"
    used = coordinator / "work" / USED_FILE
    seen = used.read_text().split() if used.exists() else []
    if mac in seen:
        return "the run's authorization was used before (a replayed run config)"
    used.parent.mkdir(parents=True, exist_ok=True)
    with used.open("a") as fh:
        fh.write(mac + "\n")
    return None
