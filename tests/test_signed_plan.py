"""Issue 11 item 1: an agency answers only jobs whose plan the coordinator signed.

The attacks go through the agency's real ClientApp client (``clients.app.AgencyClient``, what every
Flower message reaches): a stranger running our own app with no signature, with a signature of its
own key, or replaying the coordinator's signature of another job. Each is refused with the refusal
alone, spends nothing and leaves the ledger as it was; the refusal is logged at the agency. The same
attack through real daemons is in ``tests/test_deployment.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import imported_after, invoke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agencyfl.clients.admission import initial_arrays
from agencyfl.clients.app import AgencyClient
from agencyfl.clients.signed_plan import refused_requests
from agencyfl.clients.site import AgencySite
from agencyfl.federation.messages import Scalar
from agencyfl.federation.plan import JobPlan
from agencyfl.federation.spec import LoadedSpec, load_spec
from agencyfl.privacy.keys import generate_signing_key, public_pem
from agencyfl.privacy.plan_signature import CONFIG_KEY, plan_signature_problem, sign_plan
from agencyfl.synth import SynthResult


@dataclass(frozen=True)
class Agency:
    site: AgencySite
    loaded: LoadedSpec
    coordinator: Ed25519PrivateKey
    stranger: Ed25519PrivateKey

    def signed(self, job: str, key: Ed25519PrivateKey | None = None) -> str:
        return sign_plan(JobPlan.from_spec(self.loaded, job).signed_bytes(), key or self.coordinator)

    def config(self, job: str, signature: str | None) -> dict[str, Scalar]:
        spec = self.loaded.spec
        config: dict[str, Scalar] = {
            "job": job, "round": 1, "rounds": spec.training.rounds, "spec-sha256": self.loaded.sha256,
            "max-weight": 100000, "epsilon": spec.privacy.epsilon,
        }  # fmt: skip
        if signature is not None:
            config[CONFIG_KEY] = signature
        return config


@pytest.fixture()
def agency(small_fed: SynthResult, tmp_path: Path) -> Agency:
    coordinator = generate_signing_key(tmp_path / "coordinator.key")
    (tmp_path / "coordinator.pub").write_bytes(public_pem(coordinator.public_key()))
    loaded = load_spec(small_fed.spec)
    site = AgencySite(
        agency="tax", spec_path=small_fed.spec, data_path=loaded.data_path("tax"), home=tmp_path / "tax",
        coordinator_key=tmp_path / "coordinator.pub",
    )  # fmt: skip
    return Agency(site, loaded, coordinator, generate_signing_key(tmp_path / "stranger.key"))


def ledger_bytes(site: AgencySite) -> bytes:
    path = site.ledger_dir / "ledger.jsonl"
    return path.read_bytes() if path.exists() else b""


@pytest.mark.parametrize("attack", ["unsigned", "stranger's key", "another job's signature", "garbage"])
def test_a_job_the_coordinator_did_not_sign_is_refused_and_spends_nothing(agency: Agency, attack: str) -> None:
    site = agency.site
    signature = {
        "unsigned": None,
        "stranger's key": agency.signed("job-x", agency.stranger),
        "another job's signature": agency.signed("job-the-coordinator-ran"),
        "garbage": "!!not base64!!",
    }[attack]
    arrays = initial_arrays(agency.loaded)
    before = ledger_bytes(site)
    client = AgencyClient(site)
    update, weight, metrics = client.fit(arrays, agency.config("job-x", signature))
    assert metrics["status"] == "refused" and weight == 0
    assert "not signed" in str(metrics["reason"])
    assert not any(key.startswith("hist") or key in {"brier-sum", "rows"} for key in metrics)  # the refusal alone
    assert "dataset" not in metrics and all(not np.any(u) for u in update)
    _, count, evaluated = client.evaluate(arrays, agency.config("job-x", signature))
    assert evaluated["status"] == "refused" and count == 0 and "hist-pos" not in evaluated
    assert ledger_bytes(site) == before  # nothing spent, nothing recorded in the ledger
    logged = refused_requests(site.home)
    assert [e["kind"] for e in logged] == ["fit", "evaluate"] and logged[0]["job"] == "job-x"
    status = invoke("steward", "status", "--home", site.home, "--format", "json")
    assert status.exit_code == 0 and json.loads(status.stdout)["refused_requests"] == logged


def test_a_refused_request_is_answered_before_any_training_code_loads(agency: Agency) -> None:
    # Each Flower message is a fresh process in deployment: an unsigned fit and evaluate are refused without
    # importing torch or Opacus (2.6 s of CPU an unsigned request made each agency spend before).
    shapes = [a.shape for a in initial_arrays(agency.loaded)]
    check = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from agencyfl.clients.app import AgencyClient\n"
        "from agencyfl.clients.site import AgencySite\n"
        "site, config, shapes = json.loads(sys.argv[1])\n"
        "client = AgencyClient(AgencySite(**{k: Path(v) if k != 'agency' else v for k, v in site.items()}))\n"
        "arrays = [np.zeros(s, dtype=np.float32) for s in shapes]\n"
        "_, weight, fitted = client.fit(arrays, config)\n"
        "_, count, evaluated = client.evaluate(arrays, config)\n"
        "assert weight == 0 and count == 0 and fitted['status'] == evaluated['status'] == 'refused'\n"
    )
    site = {
        "agency": agency.site.agency, "spec_path": str(agency.site.spec_path),
        "data_path": str(agency.site.data_path), "home": str(agency.site.home),
        "coordinator_key": str(agency.site.coordinator_key),
    }  # fmt: skip
    argument = json.dumps([site, agency.config("job-x", None), shapes])
    assert imported_after(check, ("torch", "opacus"), argument) == []
    assert [e["kind"] for e in refused_requests(agency.site.home)] == ["fit", "evaluate"]


def test_the_coordinators_signature_admits_the_round(agency: Agency) -> None:
    site = agency.site
    arrays = initial_arrays(agency.loaded)
    _, weight, metrics = AgencyClient(site).fit(arrays, agency.config("job-1", agency.signed("job-1")))
    assert metrics["status"] == "trained" and weight > 0 and "hist-pos" in metrics
    assert refused_requests(site.home) == []


def test_no_coordinator_key_means_no_job(agency: Agency) -> None:
    # failing closed: an agency that was not handed the coordinator's key cannot tell who started a job
    plan = JobPlan.from_spec(agency.loaded, "j")
    good = agency.signed("j")
    assert plan_signature_problem(plan.signed_bytes(), good, None) is not None
    site = agency.site
    assert plan_signature_problem(plan.signed_bytes(), good, site.coordinator_key) is None
    tampered = plan.model_copy(update={"rounds": 1})  # the plan that would put the whole budget in one round
    assert plan_signature_problem(tampered.signed_bytes(), good, site.coordinator_key) is not None


@pytest.mark.parametrize("damage", ["rounds missing", "rounds not a number", "max-weight missing"])
def test_a_signed_request_that_does_not_parse_is_refused_and_spends_nothing(agency: Agency, damage: str) -> None:
    site = agency.site
    config = agency.config("job-1", agency.signed("job-1"))
    if damage == "rounds missing":
        del config["rounds"]
    elif damage == "rounds not a number":
        config["rounds"] = "three"
    else:
        del config["max-weight"]
    before = ledger_bytes(site)
    _, weight, metrics = AgencyClient(site).fit(initial_arrays(agency.loaded), config)
    assert metrics["status"] == "refused" and weight == 0 and "malformed RoundRequest" in str(metrics["reason"])
    assert ledger_bytes(site) == before  # nothing read, nothing spent
    assert [e["kind"] for e in refused_requests(site.home)] == ["fit"]
