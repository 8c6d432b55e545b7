"""Shared fixtures: one synthetic population per worker and one trained federation per run.

Training a federation is the expensive step (15-30 s on 2 cores), so every test that only *reads* a
trained federation shares ``trained``. A test that writes to it (tampering, a second job, more
spending) works on ``copy_of_trained``: its own copy of the workdir, so no test depends on another's
side effects or on the order tests run in (the suite runs in random order with pytest-randomly).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from filelock import FileLock

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Two workers, notebook kernels and the daemons share 2 cores: a BLAS or OpenMP pool of 2 threads in each
# process only oversubscribes them (OpenBLAS's idle threads spin). Inherited by every process a test starts.
for _pool in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_pool, "1")

from typer.testing import CliRunner  # noqa: E402
from xdist.scheduler import LoadGroupScheduling  # noqa: E402

from agencyfl.cli import app  # noqa: E402
from agencyfl.federation.spec import LoadedSpec, load_spec  # noqa: E402
from agencyfl.server.model_card import ModelCard  # noqa: E402
from agencyfl.synth import SynthResult, synthesize  # noqa: E402

AGENCIES = ["civil-affairs", "hrss", "tax", "environment"]

# Two workers share the suite (pyproject: ``-n 2 --dist loadgroup``). The tests that run a coordinator and
# SuperNodes as processes are one unit, run one after the other on one worker: each step of theirs starts
# a ClientApp process per agency, and two such federations at once on 2 cores slowed both threefold. The
# other worker takes everything else, a module (or a notebook) at a time, so module-scoped fixtures start
# once; when it is done it helps with nothing, the daemon unit being one. Order within a unit stays random.
DAEMONS = {"test_deployment.py", "test_multihost.py", "test_notebooks.py::04", "test_notebooks.py::09"}
# The other units, longest first (seconds in a full run on 2 cores, 2026-12-05): the daemon worker joins in when
# its unit ends, and a long unit handed out last would keep the run going after the other worker is done.
SLOW_UNITS = {
    "test_cli.py": 142, "test_notebooks.py::03": 123, "test_notebooks.py::07": 78, "test_accounting.py": 70,
    "test_vertical_stream.py": 63, "test_ledger_binding.py": 62, "test_cli_robustness.py": 59,
    "test_notebooks.py::05": 54, "test_notebooks.py::01": 41, "test_notebooks.py::08": 40, "test_scoring.py": 31,
    "test_audit_verify.py": 23, "test_scoring_hardening.py": 17, "test_vertical_evaluate.py": 14,
}  # fmt: skip


def _unit(item: pytest.Item) -> str:
    if item.path.name == "test_notebooks.py":
        name = f"test_notebooks.py::{item.nodeid.rpartition('[')[2][:2]}"
    else:
        name = item.path.name
    return "daemons" if name in DAEMONS else name


# After pytest-randomly's shuffle (a wrapper, before its yield) and before xdist reads the xdist_group marks.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_unit(item)))
    # the daemon unit first, then the others longest first; stable (random, within a unit) otherwise
    items.sort(key=lambda item: (_unit(item) != "daemons", -SLOW_UNITS.get(_unit(item), 0)))


class _OneUnitAhead(LoadGroupScheduling):
    """``--dist loadgroup``, queueing at most one unit ahead on a worker.

    xdist's scheduler gives a worker its next unit once at most two of its tests are pending, so a worker on
    a one-test unit (a notebook) took two more: when the daemon worker finished, the other could still hold
    two long units while it sat idle. A worker keeps its last pending test until more arrives (it needs the
    next item), so one pending is the least that cannot stall it."""

    def _reschedule(self, node: Any) -> None:
        if node.shutting_down:
            return
        if not self.workqueue:
            node.shutdown()
            return
        if self._pending_of(self.assigned_work[node]) > 1:
            return
        self._assign_work_unit(node)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadGroupScheduling | None:
    """Our scheduler for ``--dist loadgroup`` (pyproject's addopts); xdist's own otherwise."""
    return _OneUnitAhead(config, log) if config.getvalue("dist") == "loadgroup" else None


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [  # headless, and no background connections (this machine's network is closed)
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def in_a_fresh_process(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code args`` as a command's or a Flower message's process would start (nothing imported
    yet, Python's default warning filters); fails the test with its stderr unless it exits 0."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


def imported_after(code: str, modules: tuple[str, ...], *args: str) -> list[str]:
    """Which of ``modules`` a fresh process has imported once ``code`` ran."""
    report = f"import json as _json, sys as _sys\nprint(_json.dumps([m for m in {modules!r} if m in _sys.modules]))\n"
    check = f"{code}\n{report}"
    return list(json.loads(in_a_fresh_process(check, *args).stdout.splitlines()[-1]))


def gaussian_releases_spend(mechanism: Any, delta: float) -> float:
    """The exact epsilon at ``delta`` of Gaussian releases without sampling (``privacy.events`` tree), written
    with SciPy alone (Dong, Roth, Su, Corollary 2.13: mu-GDP with mu = sqrt(sum (sensitivity / std)^2)), to
    check the enforcing accountant's calibration by a computation that shares none of its code."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    from agencyfl.privacy.events import step_records

    records = step_records(mechanism)
    assert records and all(r.sample_rate == 1.0 for r in records)
    mu = sum(r.steps / r.noise_multiplier**2 for r in records) ** 0.5

    def excess(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2)) - delta

    return float(brentq(excess, 0.0, 100.0, xtol=1e-12))


def invoke(*args: object) -> Any:
    """Run an agencyfl command in process (typer's CliRunner); exceptions propagate."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _small_population(data: Path) -> SynthResult:
    """6,000 households, 3 rounds, 4 agencies, a few malformed rows per agency (the same files for a folder)."""
    return synthesize(data, households=6000, seed=3, dirty_rows=6, rounds=3)


@pytest.fixture(scope="session")
def small_fed(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """6,000 households, 3 rounds, 4 agencies, a few malformed rows per agency."""
    return _small_population(tmp_path_factory.mktemp("fed") / "data")


def shared_by_workers(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, FileLock]:
    """A folder every pytest-xdist worker of this run sees (their base temp folders' parent), and the lock
    that lets one of them build a read-only session fixture there while the others wait to read it."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return root / name, FileLock(str(root / f"{name}.lock"))


@pytest.fixture(scope="session")
def small_spec(small_fed: SynthResult) -> LoadedSpec:
    return load_spec(small_fed.spec)


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@dataclass(frozen=True)
class TrainedFederation:
    """A finished federation: its spec, workdir, the run's JSON summary and an auditor's keyring.

    Read-only: tests that change anything use ``copy_of_trained``.
    """

    spec: Path
    work: Path
    summary: dict[str, Any]
    keyring: Path

    @property
    def model(self) -> Path:
        return Path(self.summary["model"])

    @property
    def chain(self) -> Path:
        """The coordinator's countersigned chain of round summaries."""
        return self.work / "coordinator" / "ledger"

    @property
    def ledgers(self) -> list[Path]:
        return [self.work / "agencies" / agency / "ledger" for agency in self.summary["agencies"]]

    def ledger(self, agency: str) -> Path:
        return self.work / "agencies" / agency / "ledger"


def _train(spec: Path, work: Path) -> TrainedFederation:
    result = invoke("run", "--spec", spec, "--workdir", work, "--format", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    keyring = work / "keyring"
    for agency in summary["agencies"]:
        exported = work / f"{agency}.pub"
        key = work / "agencies" / agency / "keys" / "ledger-signing.key"
        assert invoke("audit", "keys", "export", key, "--out", exported).exit_code == 0
        assert invoke("audit", "keys", "import", agency, exported, "--keyring", keyring).exit_code == 0
    coordinator_pub = work / "coordinator.pub"
    key = work / "coordinator" / "keys" / "ledger-signing.key"
    assert invoke("audit", "keys", "export", key, "--out", coordinator_pub).exit_code == 0
    assert invoke("audit", "keys", "import", "coordinator", coordinator_pub, "--keyring", keyring).exit_code == 0
    return TrainedFederation(spec=spec, work=work, summary=summary, keyring=keyring)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedFederation:
    """One real federation (simulation engine, 4 agencies, 3 rounds at epsilon 3, lifetime budget 10),
    with fairness counts released under Gaussian noise (accounted) and group-threshold mitigation on.

    Trained once per run, by whichever worker asks first (its population has ``small_fed``'s files): a
    second training cost about 30 s of the suite on 2 cores, and nothing may change it anyway."""
    root, lock = shared_by_workers(tmp_path_factory, "trained")
    with lock:
        done = root / "trained.json"
        if not done.exists():
            population = _small_population(root / "data")
            text = population.spec.read_text()
            text = re.sub(r"(\[fairness\]\n)", r'\1noise_multiplier = 5.0\nmitigation = "group-thresholds"\n', text)
            spec = population.spec.parent / "trained.toml"
            spec.write_text(text)
            fed = _train(spec, root / "work")
            done.write_text(json.dumps({"spec": str(fed.spec), "summary": fed.summary}))
        built = json.loads(done.read_text())
    work = root / "work"
    return TrainedFederation(spec=Path(built["spec"]), work=work, summary=built["summary"], keyring=work / "keyring")


@pytest.fixture()
def copy_of_trained(trained: TrainedFederation, tmp_path: Path) -> TrainedFederation:
    """This test's own copy of the trained federation's workdir (ledgers, chain, registry, keys)."""
    work = tmp_path / "work"
    shutil.copytree(trained.work, work, symlinks=True)
    summary = json.loads(json.dumps(trained.summary).replace(str(trained.work), str(work)))
    return TrainedFederation(spec=trained.spec, work=work, summary=summary, keyring=work / "keyring")


def untrained_card(**fields: Any) -> ModelCard:
    """The card of a model registered without a federated job (scoring tests register initial weights)."""
    base: dict[str, Any] = {
        "job": "untrained", "agencies": [], "metrics": {}, "metrics_source": "none (initial weights)",
        "rounds_aggregated": 0, "secure_aggregation": False, "model_sha256": "", "coordinator_ledger": "",
    }  # fmt: skip
    return ModelCard(**(base | fields))


def assert_page_is_drawn(page: Path, shot: Path, profile: Path) -> None:
    """Screenshot ``page`` in headless Chromium: a tall picture, not blank."""
    import subprocess

    import matplotlib.image

    assert CHROMIUM is not None
    subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
         "--window-size=1200,2400", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # drawn, not blank


@dataclass(frozen=True)
class VerticalJob:
    """A vertical federation trained with ``agencyfl run``: its spec (beside the agencies' files), workdir, summary."""

    spec: Path
    work: Path
    summary: dict[str, Any]

    @property
    def data(self) -> Path:
        """The folder of the agencies' files, the rosters and ``truth/``."""
        return self.spec.parent

    @property
    def model(self) -> Path:
        """The registered model's folder."""
        return Path(self.summary["registry"])


@pytest.fixture(scope="session")
def vertical_job(tmp_path_factory: pytest.TempPathFactory) -> VerticalJob:
    """3,000 households, 3 iterations, a lifetime budget of 4 (room for one job of epsilon 3, not two)."""
    from agencyfl.synth_vertical import synthesize_vertical

    population = synthesize_vertical(tmp_path_factory.mktemp("vjob") / "data", households=3000, seed=4, rounds=3)
    text = population.spec.read_text()
    population.spec.write_text(re.sub(r"budget = [0-9.]+", "budget = 4.0", text))
    work = population.spec.parent.parent / "work"
    done = invoke("run", "--spec", population.spec, "--workdir", work, "--format", "json")
    assert done.exit_code == 0, done.output
    return VerticalJob(population.spec, work, json.loads(done.stdout))


@pytest.fixture(scope="session")
def vertical_blocks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], Any, Any]:
    """The blocks of a 4,000-household vertical population, aligned: HRSS, tax and environment's, then civil
    affairs' and its labels. Shared by the training tests, read-only (a test that changes a block copies it)."""
    from agencyfl.alignment.runs import align_from_spec, load_vertical
    from agencyfl.synth_vertical import synthesize_vertical
    from agencyfl.vertical import feature_block, label_block

    root = tmp_path_factory.mktemp("vertical-blocks")
    loaded = load_vertical(synthesize_vertical(root / "data", households=4000, seed=11).spec)
    align_from_spec(loaded, root / "work")
    label, labels = label_block(loaded, root / "work")
    features = [feature_block(loaded, a, root / "work") for a in ("hrss", "tax", "environment")]
    for block in [*features, label]:
        block.x.setflags(write=False)
    return features, label, labels


def copy_vertical(job: VerticalJob, into: Path) -> VerticalJob:
    """A copy of the agencies' files and of the workdir, whose paths point into the copy."""
    shutil.copytree(job.data, into / "data")
    shutil.copytree(job.work, into / "work")
    summary = json.loads(json.dumps(job.summary).replace(str(job.work), str(into / "work")))
    (into / "work" / "federation.json").write_text(json.dumps({"spec": str(into / "data" / job.spec.name)}))
    return VerticalJob(into / "data" / job.spec.name, into / "work", summary)
