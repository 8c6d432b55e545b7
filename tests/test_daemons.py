"""Issue 11 item 8: `stop_daemon` signals only the daemon it started, never a process that reused its PID."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from agencyfl.daemons import running_pid, start_daemon, stop_daemon


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
