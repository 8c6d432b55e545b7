"""Issue 11 item 2: a curious coordinator probes an agency's validation labels through evaluation replies.

The attack (as the security review ran it): a crafted logistic model puts all its weight on one input,
centred on a chosen household's value, so that this household alone lands in one score bin; the
histograms an agency returns then say the household's label. Here the coordinator sends it as a fit
request through the agency's Flower client (``AgencyClient.fit``, what a SuperNode runs).

- Refused requests (a crafted model at round 1, a round of a job the agency never trained in, a plan
  that differs from the agency's spec) are answered with the refusal alone: the attack is at chance.
- Accepted requests carry a Gaussian-noised, accounted release: the attack does no better than the DP
  bound of the releases it saw allows, ``(e^eps + delta) / (1 + e^eps)`` for neighbouring datasets that
  differ in the target's label; the Clopper-Pearson interval of its accuracy must not lie above it.
- Control: the same attack on the exact histograms (what agencies returned before) recovers the labels,
  so the test can fail.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import beta

from agencyfl.clients.admission import initial_arrays
from agencyfl.clients.app import AgencyClient
from agencyfl.clients.local_data import load_local_data
from agencyfl.clients.site import AgencySite
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.messages import NoisedEvaluation, TrainReport
from agencyfl.federation.metrics import score_histograms
from agencyfl.federation.model import build_model, model_from_arrays, predict_proba
from agencyfl.federation.plan import JobPlan
from agencyfl.federation.spec import LoadedSpec, load_spec
from agencyfl.privacy.accounting import StepRecord, epsilon_for
from agencyfl.privacy.keys import generate_signing_key, public_pem
from agencyfl.privacy.ledger import verify_ledger
from agencyfl.privacy.plan_signature import CONFIG_KEY, sign_plan
from agencyfl.synth import SynthResult

LOGIT = 0.1  # the crafted model puts the target at this logit, alone in its score bin
WEIGHT = 1e6
TRIALS = 240  # refused requests (no training: cheap)
# a refused request is answered with exactly these keys (federation.messages.Refusal)
REFUSAL_KEYS = {
    "agency", "status", "reason", "epsilon-job", "epsilon-lifetime", "epsilon-lifetime-rdp", "ledger-origin"
}  # fmt: skip
ACCEPTED_TRIALS = 100  # each trains two rounds at a fresh agency; enough to see the exact channel's 100 %
DELTA = 1e-5


def clopper_pearson(successes: int, trials: int, confidence: float = 0.99) -> tuple[float, float]:
    """The exact binomial interval (two-sided, ``confidence``)."""
    alpha = 1 - confidence
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lo, hi


@dataclass(frozen=True)
class Target:
    index: int  # row of the validation split
    label: int
    arrays: list[np.ndarray]  # the crafted model isolating it


def fast_spec(fed: SynthResult, tmp_path: Path) -> LoadedSpec:
    """The federation's spec with 2 DP-SGD steps a round (sample rate 0.5), so a trial costs little."""
    text = fed.spec.read_text().replace('data = "', f'data = "{fed.spec.parent}/')
    text = re.sub(r"\[training\]\nrounds = \d+", "[training]\nrounds = 3\nsample_rate = 0.5", text)
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    return load_spec(spec)


# The coordinator, whose signed job plans the agency answers (issue 11 item 1): the attacker here is the
# coordinator itself, crafting the models it sends, so its requests carry valid signatures.
_COORDINATOR_DIR = Path(tempfile.mkdtemp(prefix="probing-coordinator-"))
COORDINATOR = generate_signing_key(_COORDINATOR_DIR / "ledger-signing.key")
(_COORDINATOR_DIR / "ledger.pub").write_bytes(public_pem(COORDINATOR.public_key()))


def site_at(loaded: LoadedSpec, home: Path, salt_from: AgencySite | None = None) -> AgencySite:
    site = AgencySite(
        agency="tax", spec_path=loaded.path, data_path=loaded.data_path("tax"), home=home,
        coordinator_key=_COORDINATOR_DIR / "ledger.pub",
    )  # fmt: skip
    if salt_from is not None:  # the same agency's split in every trial: the attacker's targets stay in it
        site.salt_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(salt_from.salt_path, site.salt_path)
    return site


def targets(site: AgencySite, loaded: LoadedSpec, count: int) -> list[Target]:
    """Validation households the attacker can isolate on per-capita income, half of each label."""
    data = load_local_data(site, loaded)
    column = FeatureEncoder(loaded.spec.schema).names.index("per_capita_income")
    x = data.x_val[:, column].astype(np.float64)
    order = np.argsort(x)
    gaps = np.diff(x[order])
    alone = [order[i] for i in range(1, len(order) - 1) if min(gaps[i - 1], gaps[i]) > 1e-6]
    chosen: dict[int, list[int]] = {0: [], 1: []}
    for i in alone:
        label = int(data.y_val[i])
        if len(chosen[label]) < count // 2:
            chosen[label].append(int(i))
    half = min(len(chosen[0]), len(chosen[1]))
    picked = sorted(chosen[0][:half] + chosen[1][:half])  # as many of each label: chance is exactly 1/2
    assert len(picked) >= 20, "the population has too few isolatable households for the test"
    found = []
    for i in picked:
        arrays = [np.zeros_like(a) for a in initial_arrays(loaded)]
        arrays[0][0, column] = WEIGHT
        arrays[1][0] = np.float32(LOGIT) - np.float32(WEIGHT) * data.x_val[i, column]
        found.append(Target(i, int(data.y_val[i]), arrays))
    return found


def label_bound(loaded: LoadedSpec, releases: int) -> tuple[float, float]:
    """Epsilon and the best accuracy (e^eps + delta) / (1 + e^eps) any attack on one household's label can
    have from ``releases`` evaluation releases of its row.

    Changing the label moves one count from one histogram to the other and the squared-error sum by at
    most 1: L2 distance sqrt(3), against noise calibrated to sqrt(2). So the label is protected by the
    Gaussian mechanism at noise multiplier ``sigma * sqrt(2/3)``, composed ``releases`` times.
    """
    sigma = loaded.spec.evaluation.noise_multiplier
    eps = epsilon_for([StepRecord(sigma * np.sqrt(2 / 3), 1.0, releases)], DELTA)
    return eps, float((np.exp(eps) + DELTA) / (1 + np.exp(eps)))


def target_bin(bins: int) -> int:
    return int(1 / (1 + np.exp(-LOGIT)) * bins)


def guess(pos: np.ndarray, neg: np.ndarray, bins: int) -> int:
    """The attacker's guess of the label: which histogram the isolated household went into."""
    b = target_bin(bins)
    return int(pos[b] > neg[b])


def config(
    loaded: LoadedSpec, job: str, round_: int, rounds: int | None = None
) -> dict[str, bool | bytes | float | int | str]:
    return {
        "job": job,
        "round": round_,
        "rounds": loaded.spec.training.rounds if rounds is None else rounds,
        "spec-sha256": loaded.sha256,
        "max-weight": 100_000,
        "epsilon": loaded.spec.privacy.epsilon,
        CONFIG_KEY: sign_plan(JobPlan.from_spec(loaded, job).signed_bytes(), COORDINATOR),
    }


@pytest.fixture()
def setting(small_fed: SynthResult, tmp_path: Path) -> tuple[LoadedSpec, AgencySite, list[Target]]:
    loaded = fast_spec(small_fed, tmp_path)
    first = site_at(loaded, tmp_path / "first")
    return loaded, first, targets(first, loaded, 40)


def test_the_attack_recovers_labels_from_exact_histograms(setting: tuple[LoadedSpec, AgencySite, list[Target]]) -> None:
    # The control: what an agency returned before this change (exact counts) gives the labels away.
    loaded, site, found = setting
    data = load_local_data(site, loaded)
    bins = loaded.spec.evaluation.bins
    correct = 0
    for t in found:
        model = build_model(loaded.spec.model, FeatureEncoder(loaded.spec.schema).width)
        model_from_arrays(model, t.arrays)
        pos, neg, _ = score_histograms(predict_proba(model, data.x_val), data.y_val, bins)
        assert pos[target_bin(bins)] + neg[target_bin(bins)] == 1  # the target is alone in its bin
        correct += guess(np.asarray(pos), np.asarray(neg), bins) == t.label
    lo, _ = clopper_pearson(correct, len(found))
    _, bound = label_bound(loaded, 2)
    assert correct == len(found) and lo > bound  # the exact channel refutes what the DP release claims


def test_refused_requests_give_the_attack_nothing(
    setting: tuple[LoadedSpec, AgencySite, list[Target]], tmp_path: Path
) -> None:
    loaded, first, found = setting
    rng = np.random.default_rng(11)
    site = site_at(loaded, tmp_path / "victim", salt_from=first)
    client = AgencyClient(site)
    initial = initial_arrays(loaded)
    client.fit(initial, config(loaded, "real-job", 1))  # the agency trained round 1 of a real job
    before = [e.kind for e in verify_ledger(site.ledger_dir).events]
    refusals = [
        lambda t, n: config(loaded, f"fresh-{n}", 1),  # round 1 must start from the spec's initial model
        lambda t, n: config(loaded, f"fresh-{n}", 2),  # a job this agency never trained in
        lambda t, n: config(loaded, "real-job", 2, rounds=1),  # a plan that is not the agency's spec
    ]
    correct, trials = 0, 0
    for n in range(TRIALS):
        t = found[n % len(found)]
        _, weight, metrics = client.fit(t.arrays, refusals[n % len(refusals)](t, n))
        assert metrics["status"] == "refused" and weight == 0
        assert set(metrics) == REFUSAL_KEYS  # the refusal alone: no histograms, no dataset fingerprint
        leaked = NoisedEvaluation.from_metrics(metrics)
        if leaked is not None:  # what the attack would use if anything leaked
            g = guess(np.asarray(leaked.hist_pos), np.asarray(leaked.hist_neg), loaded.spec.evaluation.bins)
        else:
            g = int(rng.integers(2))  # nothing to go on: a coin
        correct += g == t.label
        trials += 1
    lo, hi = clopper_pearson(correct, trials)
    assert lo <= 0.5 <= hi, (correct, trials)
    after = verify_ledger(site.ledger_dir).events
    assert [e.kind for e in after[len(before) :]] == ["refusal"] * TRIALS  # each refusal recorded, nothing spent
    assert sum(e.kind == "release" for e in after) == sum(k == "release" for k in before)


def test_accepted_requests_are_bounded_by_the_accounted_release(
    setting: tuple[LoadedSpec, AgencySite, list[Target]], tmp_path: Path
) -> None:
    """Each trial is an agency that trained round 1 of a job; round 2 carries the crafted model."""
    loaded, first, found = setting
    bins = loaded.spec.evaluation.bins
    initial = initial_arrays(loaded)
    correct = 0
    for n in range(ACCEPTED_TRIALS):
        t = found[n % len(found)]
        site = site_at(loaded, tmp_path / f"trial-{n}", salt_from=first)
        client = AgencyClient(site)
        client.fit(initial, config(loaded, "job", 1))
        _, weight, metrics = client.fit(t.arrays, config(loaded, "job", 2))
        assert metrics["status"] == "trained" and weight > 0
        report = TrainReport.from_metrics(metrics)
        assert isinstance(report, TrainReport) and report.evaluation is not None
        evaluation = report.evaluation
        correct += guess(np.asarray(evaluation.hist_pos), np.asarray(evaluation.hist_neg), bins) == t.label
        events = verify_ledger(site.ledger_dir).events  # accounted before it was sent
        assert [(e.kind, e.release) for e in events] == [("release", "evaluation"), ("round", None)] * 2
    eps, bound = label_bound(loaded, 2)  # two releases of the target's row: rounds 1 and 2
    lo, hi = clopper_pearson(correct, ACCEPTED_TRIALS)
    assert lo <= bound, (correct, ACCEPTED_TRIALS, eps, bound)
    assert bound < 0.9  # the bound says something: the exact channel gives 100 %
