"""Only the coordinator's CLI starts runs the ServerApp acts on (``server.run_authorization``).

Anyone who reaches the SuperLink can submit our public app with a run config of their choosing, and can
list the configs of others' runs; the ServerApp must refuse a config without the coordinator's HMAC, one
with any signed field changed, an old one, and a replay of one it accepted.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from agencyfl.server.run_authorization import CONFIG_KEY, MAX_AGE_SECONDS, authorize, refusal


@pytest.fixture
def coordinator(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "superexec.secret").write_bytes(secrets.token_bytes(32))
    return tmp_path


def config(coordinator: Path, **fields: str) -> dict[str, str]:
    base = {"task": "align", "spec": "/srv/federation.toml", "job": "align-1", "resume": "false",
            "requested-by": "civil affairs"} | fields  # fmt: skip
    return base | {CONFIG_KEY: authorize(coordinator / "keys" / "superexec.secret", base)}


def test_an_authorized_run_is_accepted_once_and_a_replay_is_refused(coordinator: Path) -> None:
    run = config(coordinator)
    assert refusal(coordinator, run) is None
    assert "used before" in str(refusal(coordinator, run))  # read from `flwr ls` and submitted again
    assert refusal(coordinator, config(coordinator)) is None  # the coordinator's next run has a fresh nonce


@pytest.mark.parametrize(("field", "value"), [("task", "train"), ("spec", "/tmp/mine.toml"), ("job", "align-2"),
                                              ("resume", "true"), ("requested-by", "someone else")])  # fmt: skip
def test_changing_any_signed_field_voids_the_authorization(coordinator: Path, field: str, value: str) -> None:
    assert "does not verify" in str(refusal(coordinator, config(coordinator) | {field: value}))


def test_no_forged_or_stale_authorization_passes(coordinator: Path, tmp_path: Path) -> None:
    run = config(coordinator)
    assert "no authorization" in str(refusal(coordinator, {k: v for k, v in run.items() if k != CONFIG_KEY}))
    assert "no authorization" in str(refusal(coordinator, run | {CONFIG_KEY: "forged"}))
    other = tmp_path / "other"
    (other / "keys").mkdir(parents=True)
    (other / "keys" / "superexec.secret").write_bytes(secrets.token_bytes(32))
    assert "does not verify" in str(refusal(coordinator, config(other)))  # another coordinator's secret
    assert "s old" in str(refusal(coordinator, run, now=time.time() + MAX_AGE_SECONDS + 5))
