"""`coordinator train` (each party in its own SuperNode, iterations over the streams) against `agencyfl run`.

The same synthetic vertical population (`agencyfl data synth --topology vertical --rounds T`), trained
twice in one run: every party in one process (`agencyfl run`, alignment included; its time per
iteration from its summary), then through a coordinator (SuperLink with TLS and node auth) and four
SuperNodes on loopback, started with the agencyfl commands: `coordinator align`, then `coordinator
train`, each timed. Reported: time per iteration both ways and their ratio, the deployment's job time
(Flower's start and end included), bytes per iteration per party over the streams, Flower's own
traffic, and both models' validation AUC (different noise draws: close, not equal).

    python benchmarks/vertical_deployment.py [--households 60000] [--iterations 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results  # noqa: E402
from _deploy import PARTIES, agencyfl, deployment  # noqa: E402


def _auc(summary: dict[str, Any]) -> str:
    auc = summary["metrics"].get("validation_auc")
    return "not released" if auc is None else f"{auc:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--households", type=int, default=60_000)
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="agencyfl-vertical-deploy-"))
    made = agencyfl("data", "synth", "--topology", "vertical", "--out", root / "data", "--households",
                    args.households, "--rounds", args.iterations, "--seed", 21, "--format", "json")  # fmt: skip
    spec, files = Path(made["spec"]), {p: Path(made["files"][p]) for p in PARTIES}

    start = time.monotonic()
    local = agencyfl("run", "--spec", spec, "--workdir", root / "local", "--format", "json")
    one_machine = time.monotonic() - start

    with deployment(root, spec, files) as coord:
        start = time.monotonic()
        agencyfl("coordinator", "align", "--spec", spec, "--dir", coord, "--format", "json")
        align_seconds = time.monotonic() - start
        start = time.monotonic()
        deployed = agencyfl("coordinator", "train", "--spec", spec, "--dir", coord, "--format", "json")
        train_seconds = time.monotonic() - start

    per_local, per_deployed = local["seconds_per_iteration"], deployed["seconds_per_iteration"]
    result = {
        "households": args.households,
        "iterations": args.iterations,
        "register": local["alignment"]["register"],
        "one_machine_seconds_align_and_train": round(one_machine, 2),
        "one_machine_seconds_per_iteration": round(per_local, 3),
        "deployment_align_seconds": round(align_seconds, 2),
        "deployment_train_seconds": round(train_seconds, 2),
        "deployment_seconds_per_iteration": round(per_deployed, 3),
        "ratio_per_iteration": round(per_deployed / per_local, 3),
        "bytes_per_iteration_one_machine": local["bytes_per_iteration"],
        "bytes_per_iteration_deployment": deployed["bytes_per_iteration"],
        "flower_traffic_bytes": deployed["flower"]["network-traffic"]["total-bytes"],
        # both are the noised releases the cards carry (independent noise draws)
        "validation_auc_one_machine": local["metrics"]["validation_auc"],
        "validation_auc_deployment": deployed["metrics"]["validation_auc"],
        "epsilon_job": {p: deployed["agencies"][p]["epsilon_job"] for p in PARTIES},
    }
    print(table(["", "one machine (agencyfl run)", "deployment (coordinator train)"], [
        ["register households", f"{local['alignment']['register']:,}", f"{local['alignment']['register']:,}"],
        ["seconds per iteration", f"{per_local:.2f}", f"{per_deployed:.2f}"],
        ["ratio deployment / one machine", "", f"{per_deployed / per_local:.2f}"],
        ["wall time (s)", f"{one_machine:.1f} (align, train)", f"{align_seconds:.1f} align, {train_seconds:.1f} train"],
        ["validation AUC (noised release)", _auc(local), _auc(deployed)],
        ["Flower's traffic (bytes)", "", f"{result['flower_traffic_bytes']:,}"],
    ]))  # fmt: skip
    for party in PARTIES:
        print(f"{party:14} MB per iteration: one machine {local['bytes_per_iteration'][party] / 1e6:.2f}, "
              f"over its stream {deployed['bytes_per_iteration'][party] / 1e6:.2f}")  # fmt: skip
    print("results:", write_results("vertical_deployment", result))


if __name__ == "__main__":
    main()
