"""The deployment engine: a coordinator's SuperLink and the agencies' SuperNodes, over TLS, authenticated.

Coordinator folder (``coordinator init --out DIR``)::

    DIR/coordinator.json      address, bind host and port
    DIR/tls/                  ca.crt (hand to every agency), ca.key, server.pem, server.key
    DIR/keys/                 the coordinator's ledger signing key (ledger-signing.key, ledger.pub) and the
                              secret its SuperLink and SuperExec share (superexec.secret)
    DIR/app/pyproject.toml    the Flower app submitted for each run (components come from the
                              installed agencyfl: no code is shipped to the agencies)
    DIR/flwr/                 FLWR_HOME of the coordinator's Flower CLI (connection "agencyfl")
    DIR/state/superlink.db    the SuperLink's persisted state (registered nodes, runs)
    DIR/work/                 registry/ (models, per-round checkpoints), runs/JOB/ (events, summary) and
                              coordinator/ledger/ (the countersigned chain of round summaries, for auditors)
    DIR/agencies.json         registered agencies: name, node id, public key fingerprint
    DIR/HANDOUT.txt           what to hand each agency and what to receive

Agency folder (``steward keys --out KEYS``; ``steward start ... --keys KEYS --home HOME``):
``KEYS/node.key`` + ``node.pub`` (SuperNode authentication; hand ``node.pub`` to the coordinator) and
``KEYS/ledger-signing.key`` + ``ledger.pub``; ``HOME/ledger/`` the privacy ledger, ``HOME/run`` and
``HOME/logs`` the SuperNode's PID and log.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agencyfl.daemons import executable, flower_env, running_pid, start_daemon, stop_daemon, strip_ansi, wait_until
from agencyfl.federation.errors import DeploymentError, FederationError, LedgerError
from agencyfl.federation.flower_app import APP_PYPROJECT
from agencyfl.federation.pki import issue_server_certificate, make_ca, make_node_key
from agencyfl.privacy.keys import generate_signing_key, public_pem

CONNECTION = "agencyfl"  # the SuperLink connection's name in DIR/flwr/config.toml
DEFAULT_PORT = 9093

HANDOUT = """\
agencyfl deployment of {name}: what to hand over, and nothing else
================================================================

The coordinator gives each agency:
  1. {ca}                (the CA certificate: the agency's SuperNode checks the SuperLink with it)
  2. the SuperLink address: {address}, and for vertical jobs the port of the coordinator's
     streams, {stream} (the agency's SuperNode dials it during a job: let it through its firewall)
  3. the federation spec file (the agencies' copies must be byte-identical: its SHA-256 is checked)
  4. {coordinator_key}    (the coordinator's public ledger key: an agency accepts only the job
                          plans it signed; `steward start --coordinator-key`)

Each agency gives the coordinator:
  1. its node.pub        (from `agencyfl steward keys --out KEYS`; register it with
                          `agencyfl coordinator register --agency NAME node.pub`)
  2. its ledger.pub      (for auditors checking its privacy ledger)

In a vertical federation the agencies also exchange ledger.pub files with the parties they align
with (civil affairs with every agency; confirm each fingerprint out of band) and pass them to
`steward start --peer-key NAME=ledger.pub`: a party accepts only run keys those keys signed.

Auditors receive from every party its ledger.pub (the coordinator's is keys/ledger.pub here) and
import it with `agencyfl audit keys import NAME KEY.pub`; from the coordinator, work/coordinator/ledger
(its countersigned chain of round summaries); from each agency, its ledger folder.

Never hand over: ca.key, server.key, superexec.secret, node.key, ledger-signing.key, data files, ledgers' private parts.
"""


@dataclass(frozen=True)
class CoordinatorDir:
    """The coordinator's folder; see the module docstring."""

    root: Path

    @property
    def settings_file(self) -> Path:
        return self.root / "coordinator.json"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def pid_file(self) -> Path:
        return self.root / "run" / "superlink.pid"

    @property
    def log(self) -> Path:
        return self.root / "logs" / "superlink.log"

    @property
    def superexec_pid_file(self) -> Path:
        return self.root / "run" / "superexec.pid"

    @property
    def superexec_log(self) -> Path:
        return self.root / "logs" / "superexec.log"

    @property
    def superexec_secret(self) -> Path:
        """The secret the SuperLink and its SuperExec share (owner-only; never handed to anyone)."""
        return self.root / "keys" / "superexec.secret"

    @property
    def refused_runs_file(self) -> Path:
        """Runs of another app than agencyfl's that the SuperExec did not launch."""
        return self.root / "refused-runs.jsonl"

    @property
    def agencies_file(self) -> Path:
        return self.root / "agencies.json"

    def settings(self) -> dict[str, Any]:
        """The folder's settings; raises DeploymentError if it was not made by ``coordinator init``."""
        try:
            data: dict[str, Any] = json.loads(self.settings_file.read_text())
        except (OSError, ValueError) as exc:
            raise DeploymentError(
                f"{self.root} is not a coordinator folder (run `agencyfl coordinator init`): {exc}"
            ) from exc
        return data

    def flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run the Flower CLI against this coordinator's SuperLink; returns its JSON answer."""
        cmd = [executable("flwr"), *args, "--format", "json"]
        try:
            env = {**flower_env(self.flwr_home), "NO_COLOR": "1", "TERM": "dumb"}  # plain JSON, even under Jupyter
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from exc
        stdout = strip_ansi(done.stdout)
        text = stdout[stdout.find("{") :] if "{" in stdout else ""
        try:
            answer: dict[str, Any] = json.loads(text)
        except ValueError:
            answer = {}
        if done.returncode != 0 or not answer.get("success", False):
            reason = answer.get("error-message") or (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise DeploymentError(f"`flwr {' '.join(args[:2])}` failed: {reason}")
        return answer


def init_coordinator(
    out: Path, name: str, hosts: list[str], port: int, bind: str, stream_port: int | None = None
) -> CoordinatorDir:
    """Make a coordinator folder: CA, server certificate, ledger key, Flower app and connection."""
    cdir = CoordinatorDir(out.resolve())
    if cdir.settings_file.exists():
        raise DeploymentError(f"{out} already holds a coordinator (coordinator.json); choose another folder")
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    ca_crt, ca_key = make_ca(cdir.tls, name)
    issue_server_certificate(ca_crt, ca_key, cdir.tls, hosts)
    key = generate_signing_key(cdir.root / "keys" / "ledger-signing.key")
    (cdir.root / "keys" / "ledger.pub").write_bytes(public_pem(key.public_key()))
    _superexec_secret(cdir)
    (cdir.root / "app").mkdir(parents=True, exist_ok=True)
    (cdir.root / "app" / "pyproject.toml").write_text(APP_PYPROJECT)
    address = f"{hosts[0]}:{port}"
    cdir.flwr_home.mkdir(parents=True, exist_ok=True)
    (cdir.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\nroot-certificates = "{ca_crt}"\n'
    )
    (cdir.root / "state").mkdir(exist_ok=True)
    cdir.work.mkdir(exist_ok=True)
    settings = {"name": name, "address": address, "bind": bind, "port": port, "hosts": hosts,
                "stream_port": stream_port or port + 1}  # fmt: skip
    cdir.settings_file.write_text(json.dumps(settings, indent=2))
    (cdir.root / "HANDOUT.txt").write_text(
        HANDOUT.format(
            name=name,
            ca=ca_crt,
            address=address,
            coordinator_key=cdir.root / "keys" / "ledger.pub",
            stream=f"{hosts[0]}:{stream_port or port + 1}",
        )  # fmt: skip
    )
    return cdir


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_coordinator(cdir: CoordinatorDir, timeout: float = 60.0) -> int:
    """Start the SuperLink detached (TLS, SuperNode authentication, persisted state, no runtime installs,
    ServerApps launched only by its own SuperExec, which runs nothing but the agencyfl app)."""
    settings = cdir.settings()
    secret = _superexec_secret(cdir)
    cmd = [
        executable("flower-superlink"),
        "--ssl-ca-certfile", str(cdir.tls / "ca.crt"),
        "--ssl-certfile", str(cdir.tls / "server.pem"),
        "--ssl-keyfile", str(cdir.tls / "server.key"),
        "--enable-supernode-auth",
        "--database", str(cdir.root / "state" / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--isolation", "process",  # ServerApps run only where our SuperExec launches them
        "--superexec-auth-secret-file", str(secret),
        "--host", str(settings["bind"]),
        "--port", str(settings["port"]),
    ]  # fmt: skip
    pid = start_daemon(cmd, cdir.log, cdir.pid_file, flower_env(cdir.flwr_home))
    probe = "127.0.0.1" if settings["bind"] in ("0.0.0.0", "::") else str(settings["bind"])
    wait_until(
        lambda: _port_open(probe, int(settings["port"])),
        lambda: running_pid(cdir.pid_file) is not None,
        timeout,
        "the SuperLink",
        cdir.log,
    )
    stop_daemon(cdir.superexec_pid_file)  # after a crash: a fresh SuperExec, and no orphaned ServerApp
    start_superexec(cdir)
    return pid


def superexec_command(cdir: CoordinatorDir, gated: bool = True) -> list[str]:
    """The SuperExec beside the SuperLink: ours (only the agencyfl app) or, ``gated=False``, Flower's own."""
    settings = cdir.settings()
    probe = "127.0.0.1" if settings["bind"] in ("0.0.0.0", "::") else str(settings["bind"])
    flower = [
        "--runtime-api-address", f"{probe}:{settings['port']}",
        "--root-certificates", str(cdir.tls / "ca.crt"),
        "--superexec-auth-secret-file", str(_superexec_secret(cdir)),
    ]  # fmt: skip
    if not gated:
        return [executable("flower-superexec"), *flower]
    return [sys.executable, "-m", "agencyfl.server.superexec", "--refusals", str(cdir.refused_runs_file), *flower]


def start_superexec(cdir: CoordinatorDir) -> int:
    """Start the coordinator's SuperExec detached (it launches the ServerApp of each agencyfl run, which finds
    the coordinator's folder, its key and secret through ``AGENCYFL_COORDINATOR_DIR``)."""
    from agencyfl.server.run_authorization import ENV

    env = {**flower_env(cdir.flwr_home), ENV: str(cdir.root.resolve())}
    return start_daemon(superexec_command(cdir), cdir.superexec_log, cdir.superexec_pid_file, env)


def _superexec_secret(cdir: CoordinatorDir) -> Path:
    """The shared SuperExec secret (32 random bytes, 0600), made on first start."""
    path = cdir.superexec_secret
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path


def stop_coordinator(cdir: CoordinatorDir) -> bool:
    """Stop the SuperExec (and the ServerApp it runs) and the SuperLink; False if the SuperLink was not running."""
    stop_daemon(cdir.superexec_pid_file)
    return stop_daemon(cdir.pid_file)


def register_agency(cdir: CoordinatorDir, agency: str, public_key: Path) -> dict[str, Any]:
    """Register an agency's SuperNode public key with the SuperLink; recorded in agencies.json."""
    key_text = public_key.read_bytes()
    answer = cdir.flwr("supernode", "register", str(public_key), CONNECTION, "--name", agency)
    agencies = _registered(cdir)
    entry = {
        "agency": agency,
        "node_id": str(answer.get("node-id", "")),
        "key_sha256": hashlib.sha256(key_text.split()[1] if len(key_text.split()) > 1 else key_text).hexdigest(),
        "public_key": key_text.decode("ascii", errors="replace").strip(),  # checks a vertical job's stream hello
        "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    agencies[agency] = entry
    cdir.agencies_file.write_text(json.dumps(agencies, indent=2))
    return entry


def _registered(cdir: CoordinatorDir) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(cdir.agencies_file.read_text())
        return data
    except (OSError, ValueError):
        return {}


def latest_unfinished_job(cdir: CoordinatorDir) -> str | None:
    """The newest job that started (job.json) but registered no model (no summary with a model)."""
    runs = sorted((cdir.work / "runs").glob("*/job.json"), key=lambda p: p.stat().st_mtime)
    for job_file in reversed(runs):
        summary = job_file.parent / "summary.json"
        if not summary.exists() or json.loads(summary.read_text()).get("model") is None:
            return job_file.parent.name
    return None


def submit_run(
    cdir: CoordinatorDir, spec: Path, job: str, resume: bool, task: str = "train", requested_by: str = ""
) -> int:
    """Submit a run of ``spec`` to the SuperLink (``task``: train, or align), authorized by this coordinator
    (``server.run_authorization``); returns Flower's run id."""
    from agencyfl.server.run_authorization import authorize

    fields = {"task": task, "spec": str(spec.resolve()), "job": job, "resume": "true" if resume else "false",
              "requested-by": _quote(requested_by)}  # fmt: skip
    if any("'" in value or "\\" in value for value in fields.values()):
        raise DeploymentError(f"a path or name with a quote or backslash cannot be passed to Flower: {fields}")
    overrides = " ".join(f"{k}='{v}'" for k, v in fields.items() if k != "resume")
    overrides += f" resume={fields['resume']} authorization='{authorize(_superexec_secret(cdir), fields)}'"
    answer = cdir.flwr("run", str(cdir.root / "app"), CONNECTION, "--run-config", overrides)
    return int(answer["run-id"])


def _quote(text: str) -> str:
    """A value safe inside the run config's single quotes (Flower parses it as TOML)."""
    return "".join(c for c in text if c.isprintable() and c not in "'\\")


def run_state(cdir: CoordinatorDir, run_id: int) -> dict[str, Any]:
    """Flower's record of one run (status, elapsed, network traffic)."""
    answer = cdir.flwr("ls", CONNECTION, "--run-id", str(run_id))
    runs: list[dict[str, Any]] = answer.get("runs", [])
    if not runs:
        raise DeploymentError(f"the SuperLink knows no run {run_id}")
    return runs[0]


STATUS_POLL_SECONDS = 10.0
"""How often the coordinator asks Flower whether a run ended while the run has written no summary yet. Each
``flwr ls`` is a process that imports Flower, about 1 s of CPU: asked every second, it took half a core from
the job it watched. Once the run's summary is written, it asks every second until Flower says finished."""


def _follow(
    cdir: CoordinatorDir, run_id: int, job: str, on_event: Callable[[dict[str, Any]], None], offset: int
) -> dict[str, Any]:
    """Relay the run's events until Flower reports it finished; returns its summary (empty if none)."""
    events = cdir.work / "runs" / job / "events.jsonl"
    summary_file = cdir.work / "runs" / job / "summary.json"
    state: dict[str, Any] = {}
    next_ask = 0.0
    while True:
        offset = _relay(events, offset, on_event)
        if running_pid(cdir.pid_file) is None:  # a crashed SuperLink: said at once, not at the next question
            raise DeploymentError(f"the SuperLink stopped during run {run_id}; restart it and resume")
        written = summary_file.exists()
        if written or time.monotonic() >= next_ask:
            try:
                state = run_state(cdir, run_id)
            except DeploymentError:
                if running_pid(cdir.pid_file) is None:
                    raise DeploymentError(f"the SuperLink stopped during run {run_id}; restart it and resume") from None
                state = {}
            if str(state.get("status", "")).startswith("finished"):
                _relay(events, offset, on_event)
                break
            next_ask = time.monotonic() + STATUS_POLL_SECONDS
        time.sleep(1.0 if written else 0.5)
    summary: dict[str, Any] = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    summary["flower"] = {k: state.get(k) for k in ("run-id", "status", "elapsed", "network-traffic")}
    return summary


def follow_run(
    cdir: CoordinatorDir, run_id: int, job: str, on_event: Callable[[dict[str, Any]], None], offset: int = 0
) -> dict[str, Any]:
    """Relay the run's events until Flower reports it finished; returns the job summary.

    Raises FederationError if the run ended without a registered model.
    """
    summary = _follow(cdir, run_id, job, on_event, offset)
    error = summary.get("error") or {}
    if summary.get("model") is None and error:
        from agencyfl.federation.errors import error_class

        raise error_class(str(error.get("class", "")))(str(error.get("message", "")))
    if summary.get("model") is None:
        raise FederationError(
            f"run {run_id} ({summary['flower'].get('status')}) registered no model; see {cdir.log} and "
            f"{cdir.work / 'runs' / job / 'summary.json'}"
        )
    return summary


def follow_alignment(
    cdir: CoordinatorDir, run_id: int, run: str, on_event: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Follow a ``coordinator align`` run to its end; returns its summary.

    Raises
    ------
    AgencyflError
        The error a party refused or failed with (its own class, so its exit code), or DeploymentError
        if the run ended without a summary.
    """
    return follow_recorded(cdir, run_id, run, on_event, "alignment")


def follow_recorded(
    cdir: CoordinatorDir, run_id: int, run: str, on_event: Callable[[dict[str, Any]], None], what: str
) -> dict[str, Any]:
    """Follow a run whose summary ends ``recorded`` (an alignment, a screening); raises the error class a party
    named (its exit code), else DeploymentError, when it recorded nothing."""
    from agencyfl.federation.errors import error_class

    summary = _follow(cdir, run_id, run, on_event, 0)
    if summary.get("status") == "recorded":
        return summary
    error = summary.get("error") or {}
    if error.get("class"):
        raise error_class(str(error["class"]))(str(error.get("message", "")))
    raise DeploymentError(f"{what} run {run_id} ({summary['flower'].get('status')}) recorded nothing; see {cdir.log}")


def _relay(path: Path, offset: int, on_event: Callable[[dict[str, Any]], None]) -> int:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # a line still being written
                offset += len(line)
                on_event(json.loads(line))
    except FileNotFoundError:
        pass
    return offset


def events_size(cdir: CoordinatorDir, job: str) -> int:
    """Bytes already in a job's event file (a resumed run's follower starts after them)."""
    path = cdir.work / "runs" / job / "events.jsonl"
    return path.stat().st_size if path.exists() else 0


def coordinator_status(cdir: CoordinatorDir) -> dict[str, Any]:
    """SuperLink process, registered agencies with online state, runs with rounds and refusals."""
    settings = cdir.settings()
    pid = running_pid(cdir.pid_file)
    status: dict[str, Any] = {"address": settings["address"], "superlink_pid": pid, "running": pid is not None}
    registered = _registered(cdir)
    nodes: dict[str, str] = {}
    runs: list[dict[str, Any]] = []
    if pid is not None:
        nodes = {
            str(n["node-id"]): str(n["status"]) for n in cdir.flwr("supernode", "list", CONNECTION).get("nodes", [])
        }
        runs = cdir.flwr("ls", CONNECTION).get("runs", [])
    status["agencies"] = [
        {
            "agency": name,
            "node_id": e["node_id"],
            "status": nodes.get(str(e["node_id"]), "unknown" if pid is None else "offline"),
        }
        for name, e in sorted(registered.items())
    ]
    status["runs"] = [{"run_id": r["run-id"], "status": r["status"], "elapsed": r.get("elapsed")} for r in runs]
    status["jobs"] = [_job_progress(p.parent) for p in sorted((cdir.work / "runs").glob("*/job.json"))]
    return status


def _job_progress(run_dir: Path) -> dict[str, Any]:
    events = []
    path = run_dir / "events.jsonl"
    if path.exists():
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rounds = [e for e in events if e.get("type") == "round"]
    return {
        "job": run_dir.name,
        "rounds_evaluated": max((int(e["round"]) for e in rounds), default=0),
        "last_auc": rounds[-1]["auc"] if rounds else None,
        "refusals": sum(1 for e in events if e.get("type") == "refusal"),
        "skipped_rounds": sum(1 for e in events if e.get("type") == "skipped"),
        "model": next((e["model"] for e in events if e.get("type") == "done"), None),
    }


# ------------------------------------------------------------------------------------------ steward
def make_steward_keys(out: Path, agency: str) -> dict[str, Path]:
    """The agency's SuperNode key pair and ledger signing key, made inside its domain."""
    out = out.resolve()
    if (out / "node.key").exists() or (out / "ledger-signing.key").exists():
        raise DeploymentError(f"{out} already holds keys; refusing to overwrite them")
    node_key, node_pub = make_node_key(out, agency)
    signing = generate_signing_key(out / "ledger-signing.key")
    (out / "ledger.pub").write_bytes(public_pem(signing.public_key()))
    return {
        "node_key": node_key,
        "node_pub": node_pub,
        "ledger_key": out / "ledger-signing.key",
        "ledger_pub": out / "ledger.pub",
    }


@dataclass(frozen=True)
class StewardHome:
    """An agency's working folder on its own host."""

    root: Path

    @property
    def pid_file(self) -> Path:
        return self.root / "run" / "supernode.pid"

    @property
    def log(self) -> Path:
        return self.root / "logs" / "supernode.log"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_steward(
    agency: str,
    spec: Path,
    data: Path,
    superlink: str,
    root_cert: Path,
    keys: Path,
    home: Path,
    coordinator_key: Path,
    timeout: float = 90.0,
    peers: dict[str, Path] | None = None,
) -> int:
    """Start the agency's SuperNode detached and wait until the SuperLink has accepted it.

    ``coordinator_key`` is the coordinator's ledger public key (its ``keys/ledger.pub``): the agency
    accepts only job plans it signed. It is kept as ``HOME/coordinator.pub``; a different key later is
    refused (the steward removes the old one after checking the new one with the coordinator).
    The caller checks the data first. Raises DeploymentError quoting Flower's reason if the node is
    refused (unregistered key, TLS failure) or does not connect within ``timeout``.
    """
    site = StewardHome(home.resolve())
    trusted_key = keep_coordinator_key(site.root, coordinator_key)
    keep_peer_keys(site.root, peers or {}, own=keys / "ledger-signing.key")
    node_config = " ".join(
        f"{k}='{v}'"
        for k, v in {
            "agency": agency,
            "spec": spec.resolve(),
            "data": data.resolve(),
            "home": site.root,
            "keys": keys.resolve(),
            "coordinator_key": trusted_key,
            "ca": root_cert.resolve(),
        }.items()
    )
    pin_app(site.root, first_start_only=True)
    cmd = [
        sys.executable, "-m", "agencyfl.clients.supernode", "--home", str(site.root),  # behind the app pin
        "--superlink", superlink,
        "--root-certificates", str(root_cert.resolve()),
        "--auth-supernode-private-key", str((keys / "node.key").resolve()),
        "--node-config", node_config,
        "--port", str(_free_port()),  # the SuperNode's local runtime API (its ClientApp processes)
    ]  # fmt: skip
    for needed in (root_cert, keys / "node.key"):
        if not needed.exists():
            raise DeploymentError(f"{needed} does not exist")
    size = site.log.stat().st_size if site.log.exists() else 0
    pid = start_daemon(cmd, site.log, site.pid_file, flower_env(site.root / "flwr"))

    def accepted() -> bool:
        with site.log.open("rb") as fh:
            fh.seek(size)
            return b"SuperNode ID:" in fh.read()

    try:
        wait_until(accepted, lambda: running_pid(site.pid_file) is not None, timeout, f"{agency}'s SuperNode", site.log)
    except DeploymentError:
        stop_daemon(site.pid_file)
        raise
    return pid


def keep_coordinator_key(home: Path, source: Path) -> Path:
    """Keep the coordinator's public ledger key as ``HOME/coordinator.pub``; refuse a different one later."""
    from agencyfl.privacy.keys import load_public_key

    try:
        key = public_pem(load_public_key(source))
    except LedgerError as exc:
        raise DeploymentError(f"{source}: not the coordinator's public key (its keys/ledger.pub): {exc}") from exc
    kept = home / "coordinator.pub"
    if kept.exists() and kept.read_bytes() != key:
        raise DeploymentError(
            f"{source} is not the coordinator key this agency kept ({kept}); if the coordinator really changed "
            f"its key, check the new one with it and remove {kept}"
        )
    home.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(key)
    return kept


def keep_peer_keys(home: Path, peers: dict[str, Path], own: Path | None = None) -> None:
    """Keep other parties' ledger keys in ``HOME/peers/`` (``coordinator align`` accepts run keys they signed).

    A different key later for the same party is refused: a key change is checked with that party first.
    The coordinator's key (``HOME/coordinator.pub``) or the agency's own (``own``, its signing key) is
    refused as a peer's: with it, the coordinator could vouch for run keys of its own and open what it relays.
    """
    from agencyfl.clients.alignment_steps import peers_dir
    from agencyfl.privacy.keys import import_public_key, load_public_key, load_signing_key

    reserved: dict[bytes, str] = {}
    if (home / "coordinator.pub").exists():
        reserved[public_pem(load_public_key(home / "coordinator.pub"))] = "the coordinator's key"
    if own is not None and own.exists():
        reserved[public_pem(load_signing_key(own).public_key())] = "this agency's own key"
    for name, source in peers.items():
        try:
            pem = public_pem(load_public_key(source))
            if pem in reserved:
                raise LedgerError(f"that is {reserved[pem]}, not {name}'s: ask {name} for its keys/ledger.pub")
            import_public_key(peers_dir(home), name, source)
        except LedgerError as exc:
            raise DeploymentError(f"--peer-key {name}={source}: {exc}") from exc


def pin_app(home: Path, first_start_only: bool = False) -> dict[str, Any]:
    """Pin this installation's Flower app as the only one the agency's SuperNode runs.

    With ``first_start_only`` (``steward start``): pin if nothing is pinned yet; if a different app
    is pinned (agencyfl was upgraded), refuse until the steward re-pins with ``steward pin``.
    Returns the pin and the digest it replaced (None if none or unchanged).
    """
    from agencyfl.clients.supernode import pin_installed_app, read_pin
    from agencyfl.federation.flower_app import pinned_digest

    previous = read_pin(home)
    installed = pinned_digest()
    if first_start_only and previous is not None:
        if previous.digest != installed:
            raise DeploymentError(
                f"the app pinned in {home} (digest {previous.digest[:16]}..., agencyfl {previous.agencyfl_version}) "
                f"is not this installation's ({installed[:16]}...): check the upgrade, then run "
                f"`agencyfl steward pin --home {home}`"
            )
        return {"pin": asdict(previous), "replaced": None}
    pin = pin_installed_app(home)
    replaced = previous.digest if previous is not None and previous.digest != pin.digest else None
    return {"pin": asdict(pin), "replaced": replaced}


def steward_status(home: Path) -> dict[str, Any]:
    """The agency's own view: its SuperNode, the pinned app, refused runs and each job's releases."""
    from agencyfl.clients.signed_plan import refused_requests
    from agencyfl.clients.supernode import read_pin, refused_runs
    from agencyfl.privacy.ledger import verify_ledger

    site = StewardHome(home.resolve())
    pin = read_pin(site.root)
    verified = verify_ledger(site.root / "ledger") if (site.root / "ledger").exists() else None
    jobs: dict[str, dict[str, Any]] = {}
    for event in verified.events if verified is not None else []:
        if event.kind not in ("round", "release", "refusal"):
            continue
        job = jobs.setdefault(event.job, {"job": event.job, "rounds": 0, "releases": 0, "refusals": 0})
        job[{"round": "rounds", "release": "releases", "refusal": "refusals"}[event.kind]] += 1
        if event.kind != "refusal":
            job["epsilon_job"] = event.epsilon_job
        job["epsilon_lifetime"] = event.epsilon_lifetime
    return {
        "home": str(site.root),
        "running": running_pid(site.pid_file) is not None,
        "pid": running_pid(site.pid_file),
        "pinned_app": asdict(pin) if pin is not None else None,
        "refused_runs": refused_runs(site.root),
        "refused_requests": refused_requests(site.root),
        "ledger_verified": None if verified is None else verified.ok,
        "alignment": _own_alignment(site.root),
        "jobs": list(jobs.values()),
        "log": str(site.log),
    }


def _own_alignment(home: Path) -> dict[str, Any] | None:
    """This party's last committed alignment, from its own folder: run, expiry and its own counts."""
    folder = home / "alignment"
    try:
        retention = json.loads((folder / "retention.json").read_text())
        records = json.loads((folder / "alignment-record.json").read_text())
    except (OSError, ValueError):
        return None
    parts = []
    for r in records:
        matched = "" if r.get("matched") is None else f", {r['matched']:,} in it"
        parts.append(f"{r['own_rows']:,} own rows against {r['counterpart']}'s {r['counterpart_rows']:,}{matched}")
    return {"run": retention.get("run"), "expires": retention.get("expires"), "records": records,
            "summary": "; ".join(parts) or "no counterpart"}  # fmt: skip


def stop_steward(home: Path) -> bool:
    """Stop the agency's SuperNode; False if it was not running."""
    return stop_daemon(StewardHome(home.resolve()).pid_file)
