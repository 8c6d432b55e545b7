"""`coordinator align` (each party in its own SuperNode) against `agencyfl align` (every party in one process).

The same synthetic vertical population (`agencyfl data synth --topology vertical`), aligned twice in one
run: on one machine through the in-process relay, then through a coordinator (SuperLink with TLS and node
auth) and four SuperNodes on loopback, started with the agencyfl commands. Reported: both wall times and
their ratio, the deployment's time per step (from its summary), bytes relayed, and whether both gave every
agency the same register positions. On 2 cores the parties' blinding shares the cores in both cases;
what the deployment adds is Flower's per-message cost (a fresh ClientApp process per party per step).

    python benchmarks/alignment_deployment.py [--households 100000]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results  # noqa: E402

PARTIES = ["civil-affairs", "hrss", "tax", "environment"]


def agencyfl(*args: Any) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "agencyfl", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"agencyfl {args[0]} {args[1]}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def positions(folder: Path) -> bytes:
    return (folder / "alignment-positions.csv").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--households", type=int, default=100_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="agencyfl-align-deploy-"))
    made = agencyfl("data", "synth", "--topology", "vertical", "--out", root / "data",
                    "--households", args.households, "--seed", 21, "--format", "json")  # fmt: skip
    spec, files = Path(made["spec"]), {p: Path(made["files"][p]) for p in PARTIES}

    start = time.monotonic()
    local = agencyfl("align", "--spec", spec, "--workdir", root / "local", "--format", "json")
    one_machine = time.monotonic() - start

    coord, port = root / "coord", free_port()
    agencyfl("coordinator", "init", "--out", coord, "--port", port, "--bind", "127.0.0.1")
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
        start = time.monotonic()
        deployed = agencyfl("coordinator", "align", "--spec", spec, "--dir", coord, "--format", "json")
        deployment = time.monotonic() - start
    finally:
        for party in PARTIES:
            subprocess.run([sys.executable, "-m", "agencyfl", "steward", "stop", "--home", root / "sites" / party],
                           capture_output=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "agencyfl", "coordinator", "stop", "--dir", coord], capture_output=True)

    same = all(
        positions(root / "local" / p / "alignment") == positions(root / "sites" / p / "alignment") for p in PARTIES[1:]
    )
    rows = sum(deployed["sizes"].values())
    result = {
        "households": args.households,
        "input_rows_all_parties": rows,
        "one_machine_seconds": round(one_machine, 2),
        "deployment_seconds": round(deployment, 2),
        "ratio": round(deployment / one_machine, 2),
        "steps_seconds": deployed["seconds"],
        "bytes_relayed_one_machine": local["bytes_relayed"],
        "bytes_relayed_deployment": deployed["bytes_relayed"],
        "same_positions": same,
    }
    print(table(["", "one machine (agencyfl align)", "deployment (coordinator align)"], [
        ["wall time (s)", f"{one_machine:.1f}", f"{deployment:.1f}"],
        ["input rows, all parties", f"{rows:,}", f"{rows:,}"],
        ["bytes relayed (sealed)", f"{local['bytes_relayed']:,}", f"{deployed['bytes_relayed']:,}"],
        ["ratio deployment / one machine", "", f"{deployment / one_machine:.2f}"],
        ["same positions at every agency", "", str(same)],
    ]))  # fmt: skip
    print("deployment steps (s):", ", ".join(f"{k} {v:.1f}" for k, v in deployed["seconds"].items()))
    print("results:", write_results("alignment_deployment", result))


if __name__ == "__main__":
    main()
