"""A loopback deployment for the benchmarks: a coordinator and the four parties' SuperNodes, started with the
agencyfl commands a coordinator and its stewards run (TLS, node authentication, peer keys)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARTIES = ["civil-affairs", "hrss", "tax", "environment"]


def agencyfl(*args: Any) -> dict[str, Any]:
    """Run an agencyfl command; its JSON answer (empty when it prints none); exits on failure."""
    done = subprocess.run([sys.executable, "-m", "agencyfl", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"agencyfl {args[0]} {args[1]}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def deployment(root: Path, spec: Path, files: dict[str, Path]) -> Iterator[Path]:
    """Start the coordinator and every party's SuperNode on loopback; yields the coordinator folder; stops all."""
    coord, port = root / "coord", free_port()
    agencyfl("coordinator", "init", "--out", coord, "--port", port, "--bind", "127.0.0.1", "--stream-port", free_port())
    agencyfl("coordinator", "start", "--dir", coord)
    try:
        for party in PARTIES:
            agencyfl("steward", "keys", "--out", root / "sites" / party / "keys", "--agency", party)
            agencyfl("coordinator", "register", root / "sites" / party / "keys" / "node.pub", "--agency", party,
                     "--dir", coord)  # fmt: skip
        for party in PARTIES:
            peers = PARTIES[1:] if party == "civil-affairs" else ["civil-affairs"]
            keys = [a for p in peers for a in ("--peer-key", f"{p}={root / 'sites' / p / 'keys' / 'ledger.pub'}")]
            agencyfl("steward", "start", "--agency", party, "--spec", spec, "--data", files[party],
                     "--superlink", f"127.0.0.1:{port}", "--root-cert", coord / "tls" / "ca.crt",
                     "--keys", root / "sites" / party / "keys", "--home", root / "sites" / party,
                     "--coordinator-key", coord / "keys" / "ledger.pub", *keys)  # fmt: skip
        yield coord
    finally:
        for party in PARTIES:
            subprocess.run([sys.executable, "-m", "agencyfl", "steward", "stop", "--home", root / "sites" / party],
                           capture_output=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "agencyfl", "coordinator", "stop", "--dir", coord], capture_output=True)
