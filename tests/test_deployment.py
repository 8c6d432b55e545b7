"""The deployment engine for real: a SuperLink and four SuperNodes as processes, TLS, node auth, SecAgg+.

One deployment (coordinator + 4 agencies on loopback) is shared by the module, and one 3-round job
(epsilon 3 of each agency's lifetime budget of 10) serves several checks, because a deployment round
costs about a minute on 2 cores (a fresh ClientApp process per message, four SecAgg+ hops):

- round 1 trains over TLS with authenticated nodes and secure aggregation;
- hrss's SuperNode is stopped as round 2 starts (a SecAgg+ dropout: round 2 goes ahead with the three
  others, the spec's minimum) and started again (it rejoins);
- the SuperLink is killed right after round 2 aggregates (a crash), started again on the same
  database, and ``coordinator train --resume`` finishes round 3 from the checkpoint, with hrss back.

Each test below asserts one part of that story; the refusal of strangers' nodes needs no job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flwr.common.constant import ErrorCode
from typer.testing import CliRunner

from agencyfl.cli import app
from agencyfl.clients.signed_plan import refused_requests
from agencyfl.clients.supernode import refused_runs
from agencyfl.daemons import start_daemon, stop_daemon, strip_ansi
from agencyfl.deployment import CoordinatorDir, start_superexec, superexec_command
from agencyfl.exit_codes import ExitCode
from agencyfl.federation.flower_app import APP_PYPROJECT
from agencyfl.federation.refusal_log import read_entries
from agencyfl.privacy.ledger import verify_ledger
from agencyfl.server.superexec import pinned_fab_hash
from agencyfl.synth import synthesize

AGENCIES = ["civil-affairs", "hrss", "tax", "environment"]
runner = CliRunner()


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


class Deployment:
    def __init__(self, root: Path) -> None:
        self.root = root
        data = synthesize(root / "data", households=4000, seed=5, rounds=3)
        text = data.spec.read_text()
        # A SecAgg+ stage waits at most this long for a slow agency. A dropped agency is reported by Flower's
        # heartbeat, not by this timeout, so a generous value costs nothing when all answer; 45 s let an agency
        # whose first ClientApp after the SuperLink's restart started slowly (a loaded machine) miss round 3.
        text = text.replace("[privacy]", "[secure_aggregation]\ntimeout = 90.0\nmax_weight = 5000\n\n[privacy]")
        text = text.replace("rounds = 3\n", "rounds = 3\nmin_agencies = 3\n")
        data.spec.write_text(text)
        assert "min_agencies = 3" in text
        self.spec = data.spec
        self.data = data
        self.coord = root / "coord"
        self.port = free_port()

    def start_steward(self, agency: str) -> Any:
        keys = self.root / "sites" / agency / "keys"
        return cli(
            "steward", "start", "--agency", agency, "--spec", self.spec, "--data", self.data.agency_files[agency],
            "--superlink", f"127.0.0.1:{self.port}", "--root-cert", self.coord / "tls" / "ca.crt", "--keys", keys,
            "--coordinator-key", self.coord / "keys" / "ledger.pub",
            "--format", "json",
        )  # fmt: skip

    def home(self, agency: str) -> Path:
        return self.root / "sites" / agency

    def train_process(self, *extra: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "agencyfl", "coordinator", "train", "--dir", str(self.coord)]
        return subprocess.Popen(
            [*cmd, "--spec", str(self.spec), "--format", "json", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def status(self) -> dict[str, Any]:
        result = cli("coordinator", "status", "--dir", self.coord, "--format", "json")
        assert result.exit_code == 0, result.output
        return dict(json.loads(result.stdout))

    def ledger_rounds(self, agency: str, job: str) -> list[int]:
        path = self.home(agency) / "ledger" / "ledger.jsonl"
        events = [json.loads(line) for line in path.read_text().splitlines()]
        return [e["round"] for e in events if e["kind"] == "round" and e["job"] == job]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = Deployment(tmp_path_factory.mktemp("deployment"))
    init = cli("coordinator", "init", "--out", dep.coord, "--port", dep.port, "--bind", "127.0.0.1", "--format", "json")
    assert init.exit_code == 0, init.output
    try:
        started = cli("coordinator", "start", "--dir", dep.coord)
        assert started.exit_code == 0, started.output
        for agency in AGENCIES:
            keys = dep.root / "sites" / agency / "keys"
            assert cli("steward", "keys", "--out", keys, "--agency", agency).exit_code == 0
            assert (
                cli("coordinator", "register", keys / "node.pub", "--agency", agency, "--dir", dep.coord).exit_code == 0
            )
            result = dep.start_steward(agency)
            assert result.exit_code == 0, result.output
        yield dep
    finally:
        for agency in AGENCIES:
            cli("steward", "stop", "--home", dep.home(agency))
        cli("coordinator", "stop", "--dir", dep.coord)


def test_private_keys_are_owner_only(deployment: Deployment) -> None:
    for secret in [deployment.coord / "tls" / "ca.key", deployment.coord / "tls" / "server.key"]:
        assert secret.stat().st_mode & 0o077 == 0
    for agency in AGENCIES:
        keys = deployment.home(agency) / "keys"
        assert (keys / "node.key").stat().st_mode & 0o077 == 0
        assert (keys / "ledger-signing.key").stat().st_mode & 0o077 == 0
        assert (keys / "node.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_unregistered_key_and_plaintext_node_are_refused(deployment: Deployment, tmp_path: Path) -> None:
    keys = tmp_path / "intruder-keys"
    assert cli("steward", "keys", "--out", keys, "--agency", "tax").exit_code == 0
    refused = cli(
        "steward", "start", "--agency", "tax", "--spec", deployment.spec, "--data", deployment.data.agency_files["tax"],
        "--superlink", f"127.0.0.1:{deployment.port}", "--root-cert", deployment.coord / "tls" / "ca.crt",
        "--keys", keys, "--home", tmp_path / "intruder", "--coordinator-key", deployment.coord / "keys" / "ledger.pub",
    )  # fmt: skip
    assert refused.exit_code == ExitCode.DEPLOYMENT_FAILED
    assert "2004" in refused.stderr or "activate" in refused.stderr, refused.stderr
    # A registered key over plaintext gRPC: the SuperLink only speaks TLS.
    plaintext = subprocess.run(
        [
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{deployment.port}",
            "--auth-supernode-private-key",
            str(deployment.home("tax") / "keys" / "node.key"),
            "--port",
            str(free_port()),
            "--max-retries",
            "1",
            "--max-wait-time",
            "20",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr")},
    )
    assert plaintext.returncode != 0
    status = deployment.status()
    assert status["running"] and {a["status"] for a in status["agencies"]} == {"online"}


STRANGER_CLIENT = """
from pathlib import Path
from flwr.app import Context, Message, RecordDict, ConfigRecord
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def steal(msg: Message, context: Context) -> Message:
    data = Path(str(context.node_config["data"])).read_text()[:200]
    key = (Path(str(context.node_config["keys"])) / "ledger-signing.key").read_bytes()[:16]
    Path(MARKER).write_text(data + repr(key))  # evidence the stranger's code ran at an agency
    return Message(RecordDict({"loot": ConfigRecord({"rows": data})}), reply_to=msg)
"""

STRANGER_SERVER = """
import json
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    nodes = list(grid.get_node_ids())
    asks = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(asks, timeout=90))
    seen = [{"error": r.has_error(), "code": r.error.code if r.has_error() else None} for r in replies]
    Path(REPLIES).write_text(json.dumps({"nodes": len(nodes), "replies": seen}))
"""

STRANGER_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "stranger-app"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "stranger_server:app"
clientapp = "stranger_client:app"
"""


def stranger_flwr_home(deployment: Deployment, tmp_path: Path) -> Path:
    """A Flower CLI home that knows only what every agency is handed: the SuperLink's address and ca.crt."""
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "target"\n\n[superlink.target]\n'
        f'address = "127.0.0.1:{deployment.port}"\nroot-certificates = "{deployment.coord / "tls" / "ca.crt"}"\n'
    )
    return home


def test_our_own_app_started_by_a_stranger_does_nothing(deployment: Deployment, tmp_path: Path) -> None:
    """The stranger rebuilds our public app (it passes every app pin) and starts it. It cannot name the
    coordinator's ledger key or work folder (no settings of the app: the ServerApp takes them from the
    coordinator's folder), and without the coordinator CLI's authorization the ServerApp records the refusal
    and sends nothing: no agency is asked anything, nothing is signed, spent or registered."""
    app_dir = tmp_path / "agencyfl-app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT)
    home = stranger_flwr_home(deployment, tmp_path)
    job = "job-of-a-stranger"
    env = {**os.environ, "FLWR_HOME": str(home)}
    ledgers = {a: (deployment.home(a) / "ledger" / "ledger.jsonl") for a in AGENCIES}
    before = {a: p.read_bytes() if p.exists() else b"" for a, p in ledgers.items()}

    def submit(overrides: str) -> dict[str, Any]:
        submitted = subprocess.run(
            ["flwr", "run", str(app_dir), "target", "--run-config", overrides, "--format", "json"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        return dict(json.loads(strip_ansi(submitted.stdout)))

    # The ledger key and work folder are no settings of the app: Flower refuses a run config that names them.
    named = submit(f"spec='{deployment.spec.resolve()}' job='{job}' "
                   f"ledger-key='{deployment.coord / 'keys' / 'ledger-signing.key'}'")  # fmt: skip
    assert "run-id" not in named and "Invalid run configuration" in named["error-message"]
    answer = submit(f"spec='{deployment.spec.resolve()}' job='{job}' resume=false authorization='1.00.forged'")
    assert "run-id" in answer, answer
    refused = deployment.coord / "refused-runs.jsonl"

    def refused_by_the_coordinator() -> bool:
        return any(e.get("job") == job for e in read_entries(refused))

    try:
        wait_for(refused_by_the_coordinator, 240, "the coordinator's ServerApp to refuse the stranger's run")
    finally:
        subprocess.run(["flwr", "stop", str(answer["run-id"]), "target"], capture_output=True, timeout=120, env=env)
    entry = next(e for e in read_entries(refused) if e.get("job") == job)
    assert "not submitted by this coordinator" in entry["reason"]
    for agency in AGENCIES:
        assert not [e for e in refused_requests(deployment.home(agency)) if e["job"] == job]  # nothing reached it
        after = ledgers[agency].read_bytes() if ledgers[agency].exists() else b""
        assert after == before[agency]  # nothing spent, nothing recorded
    assert not (deployment.coord / "work" / "runs" / job).exists()  # no job was started


def stranger_app(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A Flower app whose ClientApp would copy an agency's data and key; where its evidence would appear."""
    app_dir, marker, replies = tmp_path / "stranger-app", tmp_path / "stolen.txt", tmp_path / "replies.json"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(STRANGER_PYPROJECT)
    (app_dir / "stranger_client.py").write_text(f"MARKER = {str(marker)!r}\n" + STRANGER_CLIENT)
    (app_dir / "stranger_server.py").write_text(f"REPLIES = {str(replies)!r}\n" + STRANGER_SERVER)
    return app_dir, marker, replies


def flwr_run(app_dir: Path, home: Path) -> int:
    submitted = subprocess.run(
        ["flwr", "run", str(app_dir), "target", "--format", "json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "FLWR_HOME": str(home)},
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr  # open-source Flower accepts any run
    answer = json.loads(strip_ansi(submitted.stdout))
    assert "run-id" in answer, answer
    return int(answer["run-id"])


def test_a_strangers_app_never_runs_on_the_coordinator_host(deployment: Deployment, tmp_path: Path) -> None:
    """Holding only the SuperLink's address and ca.crt, a stranger submits its own app: the coordinator's
    SuperExec does not launch its ServerApp (so it sends nothing to any agency) and records the run."""
    app_dir, marker, replies = stranger_app(tmp_path)
    home = stranger_flwr_home(deployment, tmp_path)
    run_id = flwr_run(app_dir, home)
    refused = deployment.coord / "refused-runs.jsonl"
    wait_for(lambda: any(e["run_id"] == run_id for e in read_entries(refused)), 120, "the SuperExec to refuse")
    entry = next(e for e in read_entries(refused) if e["run_id"] == run_id)
    assert entry["reason"] == "not the agencyfl app" and entry["fab_hash"] != pinned_fab_hash()
    time.sleep(5)  # a launched ServerApp would have written its replies by now
    assert not replies.exists() and not marker.exists()
    subprocess.run(["flwr", "stop", str(run_id), "target"], capture_output=True, timeout=120,
                   env={**os.environ, "FLWR_HOME": str(home)})  # fmt: skip


def test_a_curious_coordinators_app_never_runs_at_an_agency(deployment: Deployment, tmp_path: Path) -> None:
    """The coordinator itself (it holds the SuperExec secret) swaps in Flower's own SuperExec and runs an app
    of its own: every agency refuses it before storing it (no ClientApp of it starts), answers with Flower's
    FAB-verification error, logs it, and spends nothing."""
    app_dir, marker, replies = stranger_app(tmp_path)
    home = stranger_flwr_home(deployment, tmp_path)
    cdir = CoordinatorDir(deployment.coord)
    ledgers = {a: (deployment.home(a) / "ledger" / "ledger.jsonl") for a in AGENCIES}
    before = {a: p.read_bytes() if p.exists() else b"" for a, p in ledgers.items()}
    refused_before = {a: len(refused_runs(deployment.home(a))) for a in AGENCIES}
    stop_daemon(cdir.superexec_pid_file)
    ungated = tmp_path / "ungated.pid"
    start_daemon(superexec_command(cdir, gated=False), tmp_path / "ungated.log", ungated, dict(os.environ))
    try:
        run_id = flwr_run(app_dir, home)
        wait_for(replies.exists, 240, "the coordinator's own ServerApp to collect its replies")
    finally:
        stop_daemon(ungated)
        start_superexec(cdir)
    answer = json.loads(replies.read_text())
    assert answer["nodes"] == 4 and len(answer["replies"]) == 4
    assert all(r["error"] and r["code"] == ErrorCode.INVALID_FAB for r in answer["replies"])  # only the refusal
    assert not marker.exists()  # no code of it ran at any agency
    for agency in AGENCIES:
        refusals = refused_runs(deployment.home(agency))
        assert len(refusals) == refused_before[agency] + 1 and refusals[-1]["run_id"] == run_id, (agency, refusals)
        assert "files the agencyfl app never has" in refusals[-1]["reason"]
        after = ledgers[agency].read_bytes() if ledgers[agency].exists() else b""
        assert after == before[agency]  # nothing spent, nothing recorded
        status = cli("steward", "status", "--home", deployment.home(agency), "--format", "json")
        assert status.exit_code == 0 and json.loads(status.stdout)["refused_runs"][-1] == refusals[-1]


def _checkpoints(deployment: Deployment) -> list[Path]:
    return sorted((deployment.coord / "work" / "registry").glob("*/checkpoints/*/round-*.npz"))


@dataclass
class JobStory:
    """What happened to the module's one job: the crashed first run, then the resumed one."""

    job: str
    crashed_returncode: int
    crashed_stderr: str
    resumed: dict[str, Any]


@pytest.fixture(scope="module")
def story(deployment: Deployment) -> JobStory:
    """Run the module's job: hrss drops out in round 2 and rejoins; the SuperLink crashes after round 2."""
    proc = deployment.train_process()
    try:
        wait_for(lambda: len(_checkpoints(deployment)) >= 1, 400, "round 1 to aggregate")
        assert cli("steward", "stop", "--home", deployment.home("hrss")).exit_code == 0  # killed with its ClientApp
        time.sleep(5)
        restarted = deployment.start_steward("hrss")
        assert restarted.exit_code == 0, restarted.output
        wait_for(lambda: len(_checkpoints(deployment)) >= 2, 400, "round 2 to aggregate")
        pid = int((deployment.coord / "run" / "superlink.pid").read_text().split()[0])
        os.killpg(pid, signal.SIGKILL)  # a crash, not a clean stop
        _, crashed_stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    job = _checkpoints(deployment)[-1].parent.name
    assert cli("coordinator", "start", "--dir", deployment.coord).exit_code == 0  # same database, same nodes
    # each status is two `flwr` processes (about 2 s of CPU): asked every 3 s, not every 0.5
    wait_for(lambda: {a["status"] for a in deployment.status()["agencies"]} == {"online"}, 120, "agencies to reconnect",
             every=3.0)  # fmt: skip
    resumed = cli(
        "coordinator", "train", "--dir", deployment.coord, "--spec", deployment.spec, "--resume", "--format", "json"
    )
    assert resumed.exit_code == 0, resumed.output
    return JobStory(job, proc.returncode, crashed_stderr, json.loads(resumed.stdout))


def test_train_over_tls_with_authenticated_nodes_and_secure_aggregation(
    deployment: Deployment, story: JobStory
) -> None:
    summary = story.resumed
    assert summary["job"] == story.job
    assert summary["rounds_aggregated"] == 3 and summary["flower"]["status"] == "finished:completed"
    held_out = cli(
        "evaluate", "--model", summary["model"], "--spec", deployment.spec, "--data", deployment.data.test,
        "--format", "json",
    )  # fmt: skip  # the pooled validation AUC is a noised release: judge the model on held-out households
    assert held_out.exit_code == 0 and json.loads(held_out.stdout)["auc"] > 0.75
    card = json.loads((Path(summary["model"]) / "card.json").read_text())
    assert card["secure_aggregation"] is True
    for agency in AGENCIES:
        assert verify_ledger(deployment.home(agency) / "ledger").ok
    jobs = {j["job"]: j for j in deployment.status()["jobs"]}
    assert jobs[story.job]["rounds_evaluated"] == 3 and jobs[story.job]["model"] == summary["model"]
    status = deployment.status()
    assert status["running"] and {a["status"] for a in status["agencies"]} == {"online"}


def test_agency_killed_mid_round_rejoins_and_its_ledger_is_exact(deployment: Deployment, story: JobStory) -> None:
    summary = story.resumed
    hrss = deployment.ledger_rounds("hrss", story.job)
    assert hrss == sorted(set(hrss)) and 1 in hrss  # nothing counted twice
    assert 3 in hrss  # it rejoined: round 3, after its restart and the coordinator's
    assert summary["agencies"]["hrss"]["rounds_trained"] <= len(hrss)
    for agency in AGENCIES:
        if agency != "hrss":
            assert deployment.ledger_rounds(agency, story.job) == [1, 2, 3]  # round 2 went ahead without hrss
    audit = cli("audit", "report", *[deployment.home(a) / "ledger" for a in AGENCIES], "--format", "json")
    assert audit.exit_code == 0, audit.output


def test_coordinator_killed_mid_run_resumes_from_its_checkpoint(deployment: Deployment, story: JobStory) -> None:
    assert story.crashed_returncode == ExitCode.DEPLOYMENT_FAILED, story.crashed_stderr
    assert "the SuperLink stopped" in story.crashed_stderr
    summary = story.resumed
    assert summary["job"] == story.job and summary["rounds_aggregated"] == 3
    assert [h["round"] for h in summary["history"]][0] >= 2  # started past round 2, from the checkpoint
    for agency in AGENCIES:
        rounds = deployment.ledger_rounds(agency, story.job)
        assert rounds == sorted(set(rounds)) and rounds[0] == 1 and rounds[-1] == 3  # each round spent once
