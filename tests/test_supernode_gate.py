"""The agency's app pin: which FABs its SuperNode admits, and a guard on the Flower internals it patches.

The attack through real daemons (a stranger's app submitted to the SuperLink) is in
``tests/test_deployment.py``; here, the decision itself and what it rests on.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from conftest import invoke
from flwr.cli.build import build_fab_from_disk, build_fab_from_files

from agencyfl.clients.supernode import PIN_FILE, AppGate, read_pin, refused_runs
from agencyfl.exit_codes import ExitCode
from agencyfl.federation.flower_app import APP_PYPROJECT, AppRefused, app_digest, build_app_fab, pinned_digest
from agencyfl.privacy.keys import generate_signing_key
from agencyfl.server.superexec import pinned_fab_hash
from agencyfl.synth import SynthResult

# SHA-256 of the source of the Flower 1.41.0 code the two gates rely on (clients.supernode at the
# agency, server.superexec at the coordinator). If an upgrade changes it, a gate may no longer sit where
# it did: re-read the code, re-check the gate, update here.
FLOWER_SOURCES = {
    "flwr.supernode.start_client_internal": {
        "start_client_internal": "1689ad636bd5386d906306f83c7de991b523780f50a2134358608e84769cc51c",
        "_pull_and_store_message": "234b741865b0adf475fa0d6d9c8764ee499afa47383ac664a237708e9afe9734",
        "_verify_fab": "9cd83091a0b6f2d5b54a42efff719f70a4bdf255800a37bb593680ee3d240c9e",
    },
    "flwr.supercore.superexec.run_superexec": {
        "run_superexec": "03d363749a0fb2b51f0cbdcf59f2cfd1ef4dab6a448535815b3884b0b3b03310",
    },
    "flwr.supercore.superexec.plugin.base_exec_plugin": {
        "BaseExecPlugin": "dcf3b3f0cf5df2f17af5c35020be4b85a2d707e3564165f2cf1d12b2f7164f39",
    },
}


@pytest.mark.parametrize("module", sorted(FLOWER_SOURCES))
def test_the_flower_internals_the_gates_patch_are_unchanged(module: str) -> None:
    source = Path(str(importlib.import_module(module).__file__)).read_text()
    found = {
        node.name: hashlib.sha256(str(ast.get_source_segment(source, node)).encode()).hexdigest()
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in FLOWER_SOURCES[module]
    }
    assert found == FLOWER_SOURCES[module]


def test_the_coordinators_superexec_pins_the_app_flwr_run_submits(tmp_path: Path) -> None:
    # what `flwr run` builds from the coordinator's app folder is the FAB whose hash the SuperExec launches
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(APP_PYPROJECT)
    assert hashlib.sha256(build_fab_from_disk(app)).hexdigest() == pinned_fab_hash()


def fab_with(files: dict[str, bytes]) -> bytes:
    fab, _ = build_fab_from_files(files)
    return fab


def test_only_the_installed_app_has_the_pinned_digest() -> None:
    assert app_digest(build_app_fab()) == pinned_digest()
    # the same app repacked with other compression is the same files: same digest
    repacked = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(build_app_fab())) as original, zipfile.ZipFile(repacked, "w") as stored:
        for info in original.infolist():
            stored.writestr(info.filename, original.read(info))
    assert app_digest(repacked.getvalue()) == pinned_digest()
    # our pyproject pointing its ClientApp at other code is another app
    evil = APP_PYPROJECT.replace('clientapp = "agencyfl.clients.app:app"', 'clientapp = "evil:app"')
    assert app_digest(fab_with({"pyproject.toml": evil.encode()})) != pinned_digest()


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "files the agencyfl app never has: clients/app.py"),
        (b"not a zip at all", "not a FAB"),
    ],
)
def test_a_fab_with_code_or_garbage_is_refused(content: bytes | None, why: str) -> None:
    if content is None:  # our pyproject, plus a module that shadows ours on the ClientApp's sys.path
        content = fab_with(
            {"pyproject.toml": APP_PYPROJECT.encode(), "clients/app.py": b"import os; os.system('cat ledger')"}
        )
    with pytest.raises(AppRefused, match=why):
        app_digest(content)


def test_an_oversize_file_is_refused_by_its_declared_size() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as fab:
        fab.writestr("pyproject.toml", b"\0" * (2 << 20))  # compresses to almost nothing
    with pytest.raises(AppRefused, match="more than this app ever holds"):
        app_digest(buffer.getvalue())


def test_the_gate_admits_the_pin_and_records_each_refused_run_once(tmp_path: Path) -> None:
    pinned = invoke("steward", "pin", "--home", tmp_path, "--format", "json")
    assert pinned.exit_code == 0, pinned.output
    pin = read_pin(tmp_path)
    assert pin is not None and pin.digest == pinned_digest() == json.loads(pinned.stdout)["pin"]["digest"]
    gate = AppGate(tmp_path, pin)
    gate.current_run = 7
    assert gate.admits(build_app_fab(), "claimed")
    stranger = fab_with({"pyproject.toml": APP_PYPROJECT.replace("agencyfl-job", "stranger-job").encode()})
    for _ in range(3):  # one refusal per message of the run; recorded once
        assert not gate.admits(stranger, "claimed-hash")
    gate.current_run = 8
    assert not gate.admits(b"garbage", "other")
    refusals = refused_runs(tmp_path)
    assert [r["run_id"] for r in refusals] == [7, 8]
    assert "is not the pinned" in refusals[0]["reason"] and refusals[0]["fab_hash_claimed"] == "claimed-hash"
    status = invoke("steward", "status", "--home", tmp_path, "--format", "json")
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    assert report["pinned_app"]["digest"] == pin.digest and len(report["refused_runs"]) == 2
    assert report["running"] is False and report["jobs"] == []


def test_start_refuses_a_pin_that_is_not_the_installed_app(small_fed: SynthResult, tmp_path: Path) -> None:
    # As after an upgrade that changed the app: the SuperNode does not start until the steward re-pins.
    assert invoke("steward", "pin", "--home", tmp_path).exit_code == 0
    pin_file = tmp_path / PIN_FILE
    pin_file.write_text(pin_file.read_text().replace(pinned_digest(), "0" * 64))
    (tmp_path / "keys").mkdir()
    generate_signing_key(tmp_path / "coordinator.key")
    assert invoke("audit", "keys", "export", tmp_path / "coordinator.key", "--out", tmp_path / "c.pub").exit_code == 0
    result = invoke(
        "steward", "start", "--agency", "tax", "--spec", small_fed.spec, "--data", small_fed.agency_files["tax"],
        "--superlink", "127.0.0.1:1", "--root-cert", tmp_path / "ca.crt", "--keys", tmp_path / "keys",
        "--home", tmp_path, "--coordinator-key", tmp_path / "c.pub",
    )  # fmt: skip
    assert result.exit_code == ExitCode.DEPLOYMENT_FAILED and "steward pin --home" in result.stderr
    assert not (tmp_path / "run" / "supernode.pid").exists()  # nothing was started
    repinned = invoke("steward", "pin", "--home", tmp_path, "--format", "json")
    assert json.loads(repinned.stdout)["replaced"] == "0" * 64
    pin = read_pin(tmp_path)
    assert pin is not None and pin.digest == pinned_digest()
