"""Issue 11 item 8: `stop_daemon` signals only the daemon it started, never a process that reused its PID."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import imported_after

from agencyfl.daemons import running_pid, start_daemon, stop_daemon
from agencyfl.synth import SynthResult


def test_stop_stops_the_daemon_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "run" / "daemon.pid"
    pid = start_daemon(["sleep", "60"], tmp_path / "daemon.log", pid_file, dict(os.environ))
    assert running_pid(pid_file) == pid and len(pid_file.read_text().split()) == 2  # PID and start time
    assert stop_daemon(pid_file) is True
    deadline = time.monotonic() + 5
    while running_pid(pid_file) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_pid(pid_file) is None and not pid_file.exists()


def test_a_process_that_reused_the_pid_is_left_alone(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "daemon.pid"
        pid_file.write_text(f"{bystander.pid} 1\n")  # the daemon that had this PID started at another time
        assert running_pid(pid_file) is None
        assert stop_daemon(pid_file) is False
        pid_file.write_text(f"{bystander.pid}\n")  # a PID file of an older agencyfl: no start time recorded
        assert stop_daemon(pid_file) is False  # `sleep` is not one of our daemons
        time.sleep(0.2)
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_the_daemons_clientapp_is_flowers_own_function_without_the_supernode_cli(tmp_path: Path) -> None:
    """Flower starts ``flwr-clientapp`` by name: the daemons' PATH finds ours first, which runs Flower's
    ``flwr_clientapp()`` from its own file (and fails here if Flower moves or renames it)."""
    import sys

    from agencyfl.clients.clientapp_entry import flower_module
    from agencyfl.daemons import flower_env

    assert callable(flower_module().flwr_clientapp)
    env = flower_env(tmp_path / "flwr")
    first = env["PATH"].split(os.pathsep)[0]
    assert (Path(first) / "flwr-clientapp").stat().st_mode & 0o777 == 0o700
    done = subprocess.run(["flwr-clientapp", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--runtime-api-address" in done.stdout, done.stderr
    check = (
        "import sys, runpy; sys.argv = ['flwr-clientapp', '--help']\n"
        "try:\n    runpy.run_module('agencyfl.clients.clientapp_entry', run_name='__main__')\n"
        "except SystemExit:\n    pass\nprint('flwr.supernode.cli' in sys.modules)"
    )
    light = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert light.stdout.strip().endswith("False"), light.stdout  # the SuperNode's CLI was never imported


def test_a_message_that_trains_nothing_imports_no_training_code(small_fed: SynthResult) -> None:
    """A SecAgg+ key exchange or an alignment step starts a fresh process per agency (deployment): finding
    the agency's site and its spec must not import pandas, SciPy, dp_accounting or torch (about 1 s of CPU
    per message; measured 2.0 s to 1.06 s per such process in test_deployment's job)."""
    check = (
        "from pathlib import Path\n"
        "import agencyfl.clients.alignment_steps\n"
        "from agencyfl.clients.app import _requires_secure_aggregation\n"
        "from agencyfl.clients.site import AgencySite\n"
        f"site = AgencySite(agency='tax', spec_path=Path({str(small_fed.spec)!r}), data_path=Path('x.csv'),"
        " home=Path('home'))\n"
        "_requires_secure_aggregation(site)\n"
        "site.ledger_dir\n"
    )
    heavy = ("pandas", "pyarrow", "scipy", "dp_accounting", "torch", "opacus", "tenseal")
    assert imported_after(check, heavy) == []


def test_a_vertical_party_accounts_without_torch() -> None:
    """A vertical job's or a screening's party is one process per job in deployment: its accounting (Opacus'
    RDP analysis) and the registry are imported without torch (2.6 s of CPU; measured 3.3 s to 1.6 s for the
    whole import of the party's steps)."""
    check = (
        "import agencyfl.clients.vertical_steps\n"
        "from agencyfl.privacy.accounting import StepRecord, epsilon_for\n"
        "assert epsilon_for([StepRecord(1.0, 1.0, 10)], 1e-5) > 0\n"
    )
    assert imported_after(check, ("torch", "opacus")) == []
