"""The coordinator's SuperExec: Flower's ``flower-superexec``, launching only the agencyfl app.

With ``--isolation subprocess`` (Flower's default) the SuperLink launches every submitted run's
ServerApp itself, so a stranger who reaches the SuperLink port runs code on the coordinator host,
and in that mode the SuperLink ignores the SuperExec secret, so a stranger's own SuperExec could
claim our runs' ServerApp tasks (and read their run config). agencyfl runs the SuperLink with
``--isolation process --superexec-auth-secret-file`` and this SuperExec beside it, holding the same
secret (``coord/keys/superexec.secret``, made by ``coordinator init``). Before it launches a task's
process it compares the task's FAB hash with the SHA-256 of the app this installation builds
(``federation.flower_app.build_app_fab``): the hash comes from our own SuperLink, on this host, so
it can be trusted here (an agency cannot trust it, and digests the FAB itself). Any other app's
task is not launched and is recorded once in ``coord/refused-runs.jsonl``.

The replaced name is Flower's (``flwr/supercore/superexec/run_superexec.py`` instantiates
``AutoExecPlugin`` by that module-level name); ``tests/test_supernode_gate.py`` fails if that code
changes. Run as ``python -m agencyfl.server.superexec --refusals FILE <flower-superexec options>``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

from agencyfl.federation.flower_app import build_app_fab


def pinned_fab_hash() -> str:
    """SHA-256 of the FAB Flower builds from this installation's app (what `flwr run` submits here)."""
    return hashlib.sha256(build_app_fab()).hexdigest()


def install_gate(refusals: Path) -> None:
    """Make Flower's SuperExec launch only tasks of the pinned app."""
    import flwr.supercore.superexec.run_superexec as rse
    from flwr.supercore.superexec.executor.types import LaunchResult
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    from agencyfl.federation.refusal_log import append_entry, now

    pinned = pinned_fab_hash()
    refused: set[int] = set()

    class PinnedAppExecPlugin(AutoExecPlugin):
        """Flower's task-driven plugin, refusing tasks of any app but ours."""

        def launch_task(self, token: str, task: Any) -> Any:
            fab_hash = getattr(task, "fab_hash", "") or ""
            if fab_hash == pinned:
                return super().launch_task(token, task)
            run_id = int(getattr(task, "run_id", 0))
            if run_id not in refused:
                refused.add(run_id)
                append_entry(
                    refusals,
                    {"time": now(), "run_id": run_id, "fab_hash": fab_hash, "reason": "not the agencyfl app"},
                )
            return LaunchResult.failed(f"run {run_id}: FAB {fab_hash[:16]} is not the agencyfl app; not launched")

    vars(rse)["AutoExecPlugin"] = PinnedAppExecPlugin


def main(argv: list[str] | None = None) -> None:
    """``python -m agencyfl.server.superexec --refusals FILE <flower-superexec options>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--refusals":
        sys.exit("usage: python -m agencyfl.server.superexec --refusals FILE <flower-superexec options>")
    install_gate(Path(args[1]))
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv = ["flower-superexec", *args[2:]]
    flower_superexec()


if __name__ == "__main__":
    main()
