"""Detached daemons (SuperLink, SuperNode) started in their own session and stopped by recorded PID.

Each daemon runs in a new session (``setsid``) so it outlives the command that started it, and its
whole process group (Flower's SuperExec and app processes included) is stopped together.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agencyfl.federation.errors import DeploymentError


def executable(name: str) -> str:
    """A console script installed beside this Python (falls back to PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise DeploymentError(f"{name!r} is not installed (pip install 'flwr[simulation]==1.41.0')")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower commands: their own FLWR_HOME, no telemetry, and this Python's scripts first
    on PATH: the processes Flower starts by name (``flower-superexec``, a ``flwr-clientapp`` per message) are
    then this installation's, not whatever another environment or a version-manager shim puts first (a pyenv
    shim costs each of them about 0.15 s of starting)."""
    path = os.pathsep.join(
        [str(light_clientapp(flwr_home)), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )
    return {**os.environ, "PATH": path, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0"}


def light_clientapp(flwr_home: Path) -> Path:
    """A folder whose ``flwr-clientapp`` runs Flower's, without the SuperNode's CLI imports
    (``agencyfl.clients.clientapp_entry``: about 0.6 s of CPU less for every Flower message)."""
    folder = flwr_home / "bin"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    script = folder / "flwr-clientapp"
    # a shell script, not a #!python line: a shebang longer than the kernel's limit (127 bytes) would not run
    text = f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m agencyfl.clients.clientapp_entry "$@"\n'
    if not script.exists() or script.read_text() != text:
        script.write_text(text)
        script.chmod(0o700)
    return folder


def start_daemon(cmd: list[str], log: Path, pid_file: Path, env: dict[str, str]) -> int:
    """Start ``cmd`` detached, output to ``log``; record and return its PID."""
    if (pid := running_pid(pid_file)) is not None:
        raise DeploymentError(f"already running (pid {pid}, recorded in {pid_file}); stop it first")
    log.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    pid_file.write_text(f"{proc.pid} {_start_ticks(proc.pid)}\n")  # the start time tells PID reuse apart
    return proc.pid


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_ticks(pid: int) -> str:
    """When the process started (clock ticks since boot; proc(5) field 22), or "" where /proc has none."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else ""


def _looks_like_a_daemon(pid: int) -> bool:
    """For a PID file without a start time (older agencyfl): is it one of the daemons agencyfl starts?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return any(name in cmdline for name in (b"flower-superlink", b"flower-supernode", b"agencyfl.clients.supernode"))


def running_pid(pid_file: Path) -> int | None:
    """The recorded PID if it is still the daemon that was started (zombies and reused PIDs count as dead)."""
    try:
        recorded = pid_file.read_text().split()
        pid = int(recorded[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    fields = _proc_stat(pid)
    if fields is None:
        return pid
    if fields[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        return None
    started = recorded[1] if len(recorded) > 1 else None
    if started is not None and started != _start_ticks(pid):
        return None  # the daemon died and another process now has its PID: never signal that one
    if started is None and not _looks_like_a_daemon(pid):
        return None
    return pid


def stop_daemon(pid_file: Path, grace: float = 5.0) -> bool:
    """Stop the recorded daemon and its process group (TERM, then KILL after ``grace`` s).

    Returns False if nothing was running, or if the recorded PID now belongs to another process
    (it is left alone).
    """
    pid = running_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running_pid(pid_file) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)  # Flower's SuperExec children may ignore TERM
    pid_file.unlink(missing_ok=True)
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, sig)


def wait_until(ready: Callable[[], bool], alive: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    """Wait for ``ready()``; raise DeploymentError quoting the log if the daemon dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not alive():
            raise DeploymentError(f"{what} exited: {log_reason(log)} (log: {log})")
        time.sleep(0.2)
    raise DeploymentError(f"{what} not ready after {timeout:.0f} s: {log_reason(log)} (log: {log})")


def log_reason(log: Path) -> str:
    """The most telling line of a Flower daemon's log (its coded error, else the last line)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for marker in ("[code:", "Exit Code", "ERROR", "Error"):
        hits = [line for line in lines if marker in line]
        if hits:
            return strip_ansi(hits[-1])
    return strip_ansi(lines[-1]) if lines else "no output"


def strip_ansi(text: str) -> str:
    """Strip ANSI colour codes (Flower colours its logs and, under Jupyter, its JSON)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
