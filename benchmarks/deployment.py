"""Deployment-engine round time: agencyfl (SecAgg+ on and off) against a no-op Flower app, 4 agencies on loopback.

One coordinator (SuperLink with TLS and node auth) and four SuperNodes, started with the agencyfl
commands. In the same run:
- no-op: a minimal Message-API app whose ClientApp replies at once (one message per node per round). The
  agencyfl deployment runs nothing but the agencyfl app (the coordinator's SuperExec and each agency's app
  pin refuse any other), so the no-op app runs on the same SuperLink through Flower's own SuperExec and four
  SuperNodes of Flower's own, with the agencies' node keys, TLS and the same short idle poll as theirs
  (``NOOP_SUPERNODE``): Flower's floor, gated by nothing of ours;
- local training: one agency's ``train_round`` in this process (the largest agency, warm), i.e. the
  work a round has to do besides Flower;
- agencyfl with SecAgg+ off, and on: round time from the coordinator's per-round checkpoints
  (rounds 2..R; round 1 includes the wait for the agencies).
Bytes per agency per round come from Flower's own traffic counters (``flwr ls``).

    python benchmarks/deployment.py [--rounds 4] [--households 8000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results  # noqa: E402

AGENCIES = ["civil-affairs", "hrss", "tax", "environment"]

NOOP_APP = '''\
"""A Flower app that does nothing: the transport and process-start floor of one round."""
import time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    while len(list(grid.get_node_ids())) < 4:
        time.sleep(0.2)
    times = []
    for r in range(int(context.run_config["rounds"])):
        t0 = time.monotonic()
        msgs = [Message(RecordDict({"c": ConfigRecord({"r": r})}), dst_node_id=n, message_type="train")
                for n in grid.get_node_ids()]
        replies = list(grid.send_and_receive(msgs, timeout=120))
        assert len(replies) == 4 and not any(m.has_error() for m in replies)
        times.append(time.monotonic() - t0)
    with open(str(context.run_config["out"]), "w") as fh:
        fh.write(",".join(f"{t:.3f}" for t in times))


@client.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=msg)
'''

NOOP_SUPERNODE = '''\
"""Flower's own SuperNode with the agencies' idle poll (0.5 s instead of Flower's 3 s) and no app gate."""
import sys

import flwr.supernode.start_client_internal as sci
from flwr.supernode.cli.flower_supernode import flower_supernode

from agencyfl.clients.supernode import IDLE_POLL_SECONDS, _ShortWaits

vars(sci)["time"] = _ShortWaits(IDLE_POLL_SECONDS)
sys.argv = ["flower-supernode", *sys.argv[1:]]
flower_supernode()
'''

NOOP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
[project]
name = "noop"
version = "1.0.0"
dependencies = []
[tool.flwr.app]
publisher = "bench"
[tool.flwr.app.components]
serverapp = "noop_app:server"
clientapp = "noop_app:client"
[tool.flwr.app.config]
rounds = 3
out = ""
"""


def checkpoint_round_times(cdir: Path, job: str) -> list[float]:
    files = sorted((cdir / "work" / "registry").glob(f"*/checkpoints/{job}/round-*.npz"))
    stamps = [f.stat().st_mtime for f in files]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--households", type=int, default=8000)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="agencyfl-bench-"))
    lib = root / "lib"
    lib.mkdir()
    (lib / "noop_app.py").write_text(NOOP_APP)
    os.environ["PYTHONPATH"] = f"{lib}:{os.environ.get('PYTHONPATH', '')}"  # the daemons inherit it
    sys.path.insert(0, str(lib))

    from agencyfl.clients.rounds import TrainRequest, train_round
    from agencyfl.clients.site import AgencySite
    from agencyfl.daemons import flower_env, start_daemon, stop_daemon
    from agencyfl.deployment import (
        _free_port,
        follow_run,
        init_coordinator,
        make_steward_keys,
        register_agency,
        start_coordinator,
        start_steward,
        start_superexec,
        stop_coordinator,
        stop_steward,
        submit_run,
        superexec_command,
    )
    from agencyfl.federation.encoding import FeatureEncoder
    from agencyfl.federation.model import build_model, model_to_arrays
    from agencyfl.federation.spec import load_spec
    from agencyfl.synth import synthesize

    data = synthesize(root / "data", households=args.households, seed=11, rounds=args.rounds, budget=100.0)
    base = data.spec.read_text()
    specs = {
        "off": data.spec.parent / "secagg-off.toml",
        "on": data.spec.parent / "secagg-on.toml",
    }
    specs["off"].write_text(base.replace("[privacy]", "[secure_aggregation]\nenabled = false\n\n[privacy]"))
    specs["on"].write_text(
        base.replace("[privacy]", "[secure_aggregation]\nenabled = true\ntimeout = 120.0\n\n[privacy]")
    )

    # Local training alone: the largest agency, one round, warm (second call), in this process.
    largest = max(AGENCIES, key=lambda a: data.rows[a])
    loaded = load_spec(specs["off"])
    site = AgencySite(agency=largest, spec_path=specs["off"], data_path=data.agency_files[largest], home=root / "solo")
    weights = model_to_arrays(build_model(loaded.spec.model, FeatureEncoder(loaded.spec.schema).width))
    train_times = []
    for r in (1, 2, 3):
        t0 = time.perf_counter()
        train_round(site, TrainRequest("solo", r, args.rounds, loaded.sha256, weights))
        train_times.append(time.perf_counter() - t0)
    local_training = min(train_times[1:])

    port = 19000 + os.getpid() % 1000
    cdir = init_coordinator(root / "coord", "bench", [], port, "127.0.0.1")
    start_coordinator(cdir)
    results: dict[str, Any] = {"rounds": args.rounds, "households": args.households, "local_training_s": local_training}
    try:
        # One set of SuperNodes per spec (the agencies' node config names their copy of the spec).
        for mode in ("noop", "off", "on"):
            spec = specs["off" if mode == "noop" else mode]
            pids = []
            if mode == "noop":  # Flower's own SuperExec and SuperNodes: ours run nothing but the agencyfl app
                stop_daemon(cdir.superexec_pid_file)
                ungated = root / "noop" / "superexec.pid"
                ungated.parent.mkdir(parents=True)
                start_daemon(superexec_command(cdir, gated=False), root / "noop" / "superexec.log", ungated,
                             flower_env(cdir.flwr_home))  # fmt: skip
                (lib / "noop_supernode.py").write_text(NOOP_SUPERNODE)
            for agency in AGENCIES:
                # the same agency (home, keys, ledger) for both agencyfl jobs: a ledger the coordinator's chain
                # does not know for that agency would be refused as restarted
                home = root / ("noop" if mode == "noop" else "agencies") / agency
                keys = home / "keys"
                if not keys.exists():
                    make_steward_keys(keys, agency)
                    register_agency(cdir, f"noop-{agency}" if mode == "noop" else agency, keys / "node.pub")
                if mode == "noop":
                    cmd = [sys.executable, str(lib / "noop_supernode.py"), "--superlink", f"127.0.0.1:{port}",
                           "--root-certificates", str(cdir.tls / "ca.crt"), "--port", str(_free_port()),
                           "--auth-supernode-private-key", str(keys / "node.key")]  # fmt: skip
                    pid_file = home / "supernode.pid"
                    pids.append(pid_file)
                    start_daemon(cmd, home / "supernode.log", pid_file, flower_env(home / "flwr"))
                else:
                    start_steward(
                        agency,
                        spec,
                        data.agency_files[agency],
                        f"127.0.0.1:{port}",
                        cdir.tls / "ca.crt",
                        keys,
                        home,
                        coordinator_key=cdir.root / "keys" / "ledger.pub",
                    )
            if mode == "noop":
                app = root / "noop-app"
                app.mkdir()
                (app / "pyproject.toml").write_text(NOOP_PYPROJECT)
                out = root / "noop-times.txt"
                answer = cdir.flwr("run", str(app), "agencyfl", "--run-config", f"rounds={args.rounds} out='{out}'")
                run_id = int(answer["run-id"])
                deadline = time.monotonic() + 600
                while not out.exists():
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the no-op app wrote no times in 600 s (see {root / 'noop'})")
                    time.sleep(0.5)
                times = [float(t) for t in out.read_text().split(",")]
                state = _wait_finished(cdir, run_id)
                results["noop"] = {
                    "round_s": times[1:],
                    "mean_round_s": sum(times[1:]) / len(times[1:]),
                    "traffic": state.get("network-traffic"),
                }
                for pid_file in pids:
                    stop_daemon(pid_file)
                stop_daemon(ungated)
                start_superexec(cdir)  # back to the coordinator's own, which runs only the agencyfl app
            else:
                job = f"bench-{mode}"
                run_id = submit_run(cdir, spec, job, False)
                summary = follow_run(cdir, run_id, job, lambda e: None)
                rounds = checkpoint_round_times(cdir.root, job)
                traffic = summary["flower"]["network-traffic"] or {}
                results[f"secagg_{mode}"] = {
                    "round_s": rounds,
                    "mean_round_s": sum(rounds) / len(rounds),
                    "auc": summary["metrics"]["auc"],
                    "traffic": traffic,
                    "bytes_per_agency_round": (traffic.get("total-bytes", 0)) / (len(AGENCIES) * (args.rounds + 1)),
                }
                for agency in AGENCIES:
                    stop_steward(root / "agencies" / agency)
    finally:  # every daemon this run started, whatever stopped it (stopping a stopped one does nothing)
        for pid_file in [*(root / "noop").glob("*/supernode.pid"), root / "noop" / "superexec.pid"]:
            stop_daemon(pid_file)
        for agency in AGENCIES:
            if (root / "agencies" / agency).exists():
                stop_steward(root / "agencies" / agency)
        stop_coordinator(cdir)
    noop, off, on = (
        results["noop"]["mean_round_s"],
        results["secagg_off"]["mean_round_s"],
        results["secagg_on"]["mean_round_s"],
    )
    budget = noop + local_training
    results["ratios"] = {
        "off_vs_noop_plus_training": off / budget,
        "on_vs_noop_plus_training": on / budget,
        "secagg_on_vs_off": on / off,
    }
    rows = [
        ["no-op Flower app round", f"{noop:.1f}", ""],
        ["local training (largest agency, warm)", f"{local_training:.2f}", ""],
        ["agencyfl round, SecAgg+ off", f"{off:.1f}", f"{off / budget:.2f} x (no-op + training); target <= 1.2"],
        ["agencyfl round, SecAgg+ on", f"{on:.1f}", f"{on / off:.2f} x off; target <= 1.5"],
        ["bytes per agency per round, off", f"{results['secagg_off']['bytes_per_agency_round']:.0f}", ""],
        ["bytes per agency per round, on", f"{results['secagg_on']['bytes_per_agency_round']:.0f}", ""],
    ]
    print(table(["measure", "seconds / bytes", "ratio"], rows))
    print(f"results: {write_results('deployment', results)}")


def _wait_finished(cdir: Any, run_id: int) -> dict[str, Any]:
    from agencyfl.deployment import run_state

    while True:
        state = run_state(cdir, run_id)
        if str(state.get("status", "")).startswith("finished"):
            return state
        time.sleep(1.0)


if __name__ == "__main__":
    main()
