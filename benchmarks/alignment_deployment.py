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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results  # noqa: E402
from _deploy import PARTIES, agencyfl, deployment  # noqa: E402


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

    with deployment(root, spec, files) as coord:
        start = time.monotonic()
        deployed = agencyfl("coordinator", "align", "--spec", spec, "--dir", coord, "--format", "json")
        deployment_seconds = time.monotonic() - start

    same = all(
        positions(root / "local" / p / "alignment") == positions(root / "sites" / p / "alignment") for p in PARTIES[1:]
    )
    rows = sum(deployed["sizes"].values())
    result = {
        "households": args.households,
        "input_rows_all_parties": rows,
        "one_machine_seconds": round(one_machine, 2),
        "deployment_seconds": round(deployment_seconds, 2),
        "ratio": round(deployment_seconds / one_machine, 2),
        "steps_seconds": deployed["seconds"],
        "bytes_relayed_one_machine": local["bytes_relayed"],
        "bytes_relayed_deployment": deployed["bytes_relayed"],
        "same_positions": same,
    }
    print(table(["", "one machine (agencyfl align)", "deployment (coordinator align)"], [
        ["wall time (s)", f"{one_machine:.1f}", f"{deployment_seconds:.1f}"],
        ["input rows, all parties", f"{rows:,}", f"{rows:,}"],
        ["bytes relayed (sealed)", f"{local['bytes_relayed']:,}", f"{deployed['bytes_relayed']:,}"],
        ["ratio deployment / one machine", "", f"{deployment_seconds / one_machine:.2f}"],
        ["same positions at every agency", "", str(same)],
    ]))  # fmt: skip
    print("deployment steps (s):", ", ".join(f"{k} {v:.1f}" for k, v in deployed["seconds"].items()))
    print("results:", write_results("alignment_deployment", result))


if __name__ == "__main__":
    main()
