"""`agencyfl coordinator align` for real: a SuperLink and four SuperNodes as processes (TLS, node auth), each
party's side of the register alignment in its own SuperNode, the coordinator's ServerApp as the relay.

One deployment on loopback serves the module; one alignment run is shared by the checks of its outcome.
The truth the protocol never sees (every party's file) is the oracle, as in ``test_alignment_cli.py``.
The abuses are tested where they are decided, at the cost of no daemons: a stranger's run is refused by
the coordinator's ServerApp before its task is read (``test_deployment.py``, the same path for an
alignment), and a party's refusals and the all-or-nothing commit run the coordinator's own driver against
the parties' handlers in process (``test_alignment_steps.py``).
"""

from __future__ import annotations

import csv
import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import invoke
from test_alignment_cli import ids_of, valid

from agencyfl.alignment.runs import ProtocolRun, runs_chain
from agencyfl.synth_vertical import VerticalSynthResult, synthesize_vertical

PARTIES = ["civil-affairs", "hrss", "tax", "environment"]
OTHERS = PARTIES[1:]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VerticalDeployment:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.population: VerticalSynthResult = synthesize_vertical(root / "data", households=2000, seed=11)
        self.spec = self.population.spec
        self.coord = root / "coord"
        self.port = free_port()

    def home(self, party: str) -> Path:
        return self.root / "sites" / party

    def keys(self, party: str) -> Path:
        return self.home(party) / "keys"

    def align(self, *extra: Any) -> Any:
        return invoke("coordinator", "align", "--spec", self.spec, "--dir", self.coord, "--format", "json", *extra)

    def chain(self) -> list[ProtocolRun]:
        return runs_chain(self.coord / "work", self.coord / "keys" / "ledger-signing.key").events()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VerticalDeployment]:
    dep = VerticalDeployment(tmp_path_factory.mktemp("vertical-deployment"))
    init = invoke("coordinator", "init", "--out", dep.coord, "--port", dep.port, "--bind", "127.0.0.1")
    assert init.exit_code == 0, init.output
    try:
        assert invoke("coordinator", "start", "--dir", dep.coord).exit_code == 0
        for party in PARTIES:
            assert invoke("steward", "keys", "--out", dep.keys(party), "--agency", party).exit_code == 0
            registered = invoke("coordinator", "register", dep.keys(party) / "node.pub", "--agency", party,
                                "--dir", dep.coord)  # fmt: skip
            assert registered.exit_code == 0, registered.output
        for party in PARTIES:
            # civil affairs talks to every agency, each agency to civil affairs only
            peers = OTHERS if party == "civil-affairs" else ["civil-affairs"]
            peer_keys = [arg for p in peers for arg in ("--peer-key", f"{p}={dep.keys(p) / 'ledger.pub'}")]
            started = invoke(
                "steward", "start", "--agency", party, "--spec", dep.spec, "--data", dep.population.agency_files[party],
                "--superlink", f"127.0.0.1:{dep.port}", "--root-cert", dep.coord / "tls" / "ca.crt",
                "--keys", dep.keys(party), "--home", dep.home(party),
                "--coordinator-key", dep.coord / "keys" / "ledger.pub", *peer_keys, "--format", "json",
            )  # fmt: skip
            assert started.exit_code == 0, started.output
        yield dep
    finally:
        for party in PARTIES:
            invoke("steward", "stop", "--home", dep.home(party))
        invoke("coordinator", "stop", "--dir", dep.coord)


@pytest.fixture(scope="module")
def aligned(deployment: VerticalDeployment) -> dict[str, Any]:
    done = deployment.align("--requested-by", "civil-affairs dibao office")
    assert done.exit_code == 0, done.output
    return dict(json.loads(done.stdout))


def positions(home: Path) -> set[tuple[int, int]]:
    with (home / "alignment" / "alignment-positions.csv").open() as fh:
        return {(int(r["row"]), int(r["position"])) for r in csv.DictReader(fh)}


def test_each_agency_keeps_exactly_its_register_positions_at_its_own_host(
    deployment: VerticalDeployment, aligned: dict[str, Any]
) -> None:
    files = deployment.population.agency_files
    register = [i for i in valid(ids_of(files["civil-affairs"])) if i is not None]
    assert aligned["status"] == "recorded" and aligned["sizes"]["civil-affairs"] == len(register)
    for agency in OTHERS:
        own = valid(ids_of(files[agency]))
        expected = {(row, register.index(i)) for row, i in enumerate(own) if i is not None and i in register}
        assert positions(deployment.home(agency)) == expected and expected
        assert aligned["sizes"][agency] == sum(i is not None for i in own)
        status = invoke("steward", "status", "--home", deployment.home(agency), "--format", "json")
        (record,) = json.loads(status.stdout)["alignment"]["records"]
        assert record["matched"] == len(expected) and record["counterpart_rows"] == len(register)
    held = json.loads((deployment.home("civil-affairs") / "alignment" / "alignment-sizes.json").read_text())
    assert held["query_sizes"] == {a: aligned["sizes"][a] for a in OTHERS}  # civil affairs: sizes only
    assert not (deployment.home("civil-affairs") / "alignment" / "alignment-positions.csv").exists()
    # every step ran, and the relay carried sealed envelopes only between the parties
    assert set(aligned["seconds"]) == {"keys", "parameters", "blind", "answer", "finish", "commit"}
    kinds = {(r["sender"], r["recipient"], r["kind"]) for r in aligned["relayed"]}
    assert ("civil-affairs", "tax", "register") in kinds and ("tax", "civil-affairs", "query") in kinds
    assert all({r["sender"], r["recipient"]} <= set(PARTIES) for r in aligned["relayed"])


def test_the_coordinator_keeps_no_id_and_records_the_run_in_its_signed_chain(
    deployment: VerticalDeployment, aligned: dict[str, Any]
) -> None:
    everyone = {
        "".join(unicodedata.normalize("NFKC", r).split())[:17]
        for f in deployment.population.agency_files.values()
        for r in ids_of(f)
    }
    kept = b"".join(p.read_bytes() for p in (deployment.coord / "work").rglob("*") if p.is_file())
    assert kept and not [i for i in everyone if i.encode() in kept]
    (entry,) = [r for r in deployment.chain() if r.run == aligned["run"]]
    assert entry.requested_by == "civil-affairs dibao office" and entry.sizes == aligned["sizes"]
    assert entry.pairs == [("civil-affairs", a) for a in OTHERS]
    assert "matched" not in entry.model_dump_json() and "quarantined" not in entry.model_dump_json()
    for party in PARTIES:  # the party's own folder is the run's, files owner-only
        folder = deployment.home(party) / "alignment"
        assert json.loads((folder / "retention.json").read_text())["run"] == aligned["run"]
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o600}
        assert not list(folder.parent.glob(".alignment.*"))  # nothing left staged
