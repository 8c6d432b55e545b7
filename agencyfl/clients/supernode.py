"""The agency's SuperNode: Flower's ``flower-supernode``, admitting only the app its steward pinned.

Open-source Flower 1.41 lets anyone who reaches the SuperLink submit a run, and a SuperNode runs the
ClientApp of whatever FAB a run names (the FAB's code goes first on the ClientApp's ``sys.path``).
Flower's own check (``--trusted-entities``) accepts only FABs signed through Flower Hub, so a
SuperNode with it refuses our locally built app too. This entry point keeps Flower's check and its
refusal path, and replaces what is checked: before the SuperNode stores a new run's FAB (and so
before any ClientApp process could extract or import it), the FAB's files are digested *here*
(``federation.flower_app.app_digest``; the FAB hash in the task is the SuperLink's claim) and
compared with the digest in ``HOME/trusted-app.json``, pinned by ``agencyfl steward pin`` from this
host's own installation. A refused run gets Flower's FAB-verification error reply and nothing else,
and is recorded in ``HOME/refused-runs.jsonl``.

The two patched names are private to Flower (``flwr/supernode/start_client_internal.py``);
``tests/test_supernode_gate.py`` fails if their source changes, so an upgrade cannot silently
disable the gate. The same module's ``time`` is replaced by one whose waits last at most 0.5 s
(``IDLE_POLL_SECONDS``): Flower's idle poll of 3 s added 1.5 s on average to every protocol step.
Run as ``python -m agencyfl.clients.supernode --home HOME <flower-supernode options>``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agencyfl.federation.flower_app import AppRefused, app_digest, pinned_digest
from agencyfl.federation.refusal_log import append_entry, now, read_entries

PIN_FILE = "trusted-app.json"
REFUSALS_FILE = "refused-runs.jsonl"
_TRUST_KEY = "agencyfl-pinned-app"  # the one "trusted entity": the pin itself


@dataclass(frozen=True)
class PinnedApp:
    """The app an agency accepts: its digest, and the versions it was pinned from."""

    digest: str
    agencyfl_version: str
    flwr_version: str
    pinned_at: str


def read_pin(home: Path) -> PinnedApp | None:
    """The app pinned in ``home``, or None if none is (or the file is unreadable)."""
    try:
        return PinnedApp(**json.loads((home / PIN_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def pin_installed_app(home: Path) -> PinnedApp:
    """Pin this installation's app in ``home`` (first start, or after the steward checked an upgrade)."""
    from importlib.metadata import version

    pin = PinnedApp(pinned_digest(), version("agencyfl"), version("flwr"), now())
    home.mkdir(parents=True, exist_ok=True)
    partial = home / (PIN_FILE + ".partial")
    partial.write_text(json.dumps(asdict(pin), indent=2) + "\n")
    partial.replace(home / PIN_FILE)
    return pin


def refused_runs(home: Path) -> list[dict[str, Any]]:
    """Every run this agency's SuperNode refused, oldest first."""
    return read_entries(home / REFUSALS_FILE)


class AppGate:
    """Decides, for each new run's FAB, whether it is the pinned app; records each refused run once."""

    def __init__(self, home: Path, pin: PinnedApp) -> None:
        self.home = home
        self.pin = pin
        self._refused: set[int] = set()
        self._lock = threading.Lock()
        self.current_run: int | None = None

    def admits(self, fab_content: bytes, claimed_hash: str) -> bool:
        try:
            digest = app_digest(fab_content)
            reason = None if digest == self.pin.digest else f"app digest {digest} is not the pinned {self.pin.digest}"
        except AppRefused as exc:
            digest, reason = None, str(exc)
        if reason is not None:
            self._record(claimed_hash, digest, reason)
        return reason is None

    def _record(self, claimed_hash: str, digest: str | None, reason: str) -> None:
        with self._lock:
            run = self.current_run
            if run is not None and run in self._refused:
                return  # Flower asks again for every message of a refused run
            if run is not None:
                self._refused.add(run)
            append_entry(
                self.home / REFUSALS_FILE,
                {"time": now(), "run_id": run, "fab_hash_claimed": claimed_hash, "digest": digest, "reason": reason},
            )


def install_gate(gate: AppGate) -> None:
    """Make Flower's SuperNode check every new run's FAB with ``gate`` before storing it."""
    import flwr.supernode.start_client_internal as sci

    original_pull: Callable[..., int | None] = sci._pull_and_store_message

    def verify_fab(fab: Any, trusted_entities: dict[str, str]) -> bool:
        return gate.admits(fab.content, fab.hash_str)

    def pull_and_store_message(**kwargs: Any) -> int | None:
        get_fab: Callable[[str, int], Any] = kwargs["get_fab"]

        def fetched(fab_hash: str, run_id: int) -> Any:
            gate.current_run = run_id
            fab = get_fab(fab_hash, run_id)
            # Flower checks this marker before calling _verify_fab; our verification is the pin.
            fab.verifications = {**fab.verifications, "valid_license": _TRUST_KEY}
            return fab

        return original_pull(**{**kwargs, "get_fab": fetched, "trusted_entities": {_TRUST_KEY: gate.pin.digest}})

    # Flower calls both by their module-level names, so replacing them in the module's namespace is enough.
    vars(sci)["_verify_fab"] = verify_fab
    vars(sci)["_pull_and_store_message"] = pull_and_store_message
    vars(sci)["time"] = _ShortWaits(IDLE_POLL_SECONDS)


IDLE_POLL_SECONDS = 0.5
"""How long the SuperNode waits before asking the SuperLink again when nothing was waiting for it.

Flower's loop sleeps 3 s; every step of a protocol (a SecAgg+ stage, an alignment step) pays that
wait once per agency, on average 1.5 s. Four agencies polling every 0.5 s are no load for a SuperLink."""


class _ShortWaits:
    """The ``time`` module as the SuperNode's loop sees it: every wait at most ``longest`` seconds."""

    def __init__(self, longest: float) -> None:
        self._longest = longest

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, at most ``longest``."""
        time.sleep(min(seconds, self._longest))


def main(argv: list[str] | None = None) -> None:
    """``python -m agencyfl.clients.supernode --home HOME <flower-supernode options>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--home":
        sys.exit("usage: python -m agencyfl.clients.supernode --home HOME <flower-supernode options>")
    home = Path(args[1])
    pin = read_pin(home)
    if pin is None:
        sys.exit(f"no app is pinned in {home} ({PIN_FILE}): run `agencyfl steward pin --home {home}` first")
    if pin.digest != pinned_digest():
        sys.exit(f"the app pinned in {home} is not this installation's: check it, then `agencyfl steward pin`")
    install_gate(AppGate(home, pin))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *args[2:]]
    flower_supernode()


if __name__ == "__main__":
    main()
