"""The empirical privacy audit: the one-run bound's statistics, and the attack on a real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import TrainedFederation, invoke
from scipy import stats

from agencyfl.exit_codes import ExitCode
from agencyfl.privacy.empirical import clopper_pearson, epsilon_lower_bound, guess_and_bound, p_value
from agencyfl.synth import SynthResult


def test_p_value_is_the_binomial_tail_without_delta() -> None:
    # Pure DP: correct guesses are dominated by Binomial(r, e^eps / (1 + e^eps)).
    assert p_value(100, 40, 30, 0.0, 0.0) == pytest.approx(stats.binom.sf(29, 40, 0.5))
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert p_value(100, 40, 30, 1.0, 0.0) == pytest.approx(stats.binom.sf(29, 40, q))
    assert p_value(100, 40, 30, 1.0, 1e-5) > p_value(100, 40, 30, 1.0, 0.0)  # delta only loosens


def test_lower_bound_edges() -> None:
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance: nothing refuted
    assert epsilon_lower_bound(1000, 100, 0, 1e-5) == 0.0
    perfect = epsilon_lower_bound(1000, 100, 100, 0.0)
    q = 0.05 ** (1 / 100)  # all r correct: p_value = q^r = 0.05 at the bound
    assert perfect == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in range(50, 101, 10)]
    assert bounds == sorted(bounds) and bounds[-1] > 3


def test_clopper_pearson_covers() -> None:
    lo, hi = clopper_pearson(30, 40)
    assert lo < 0.75 < hi and clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_the_bound_is_valid_for_a_mechanism_that_is_exactly_epsilon_dp(epsilon: float) -> None:
    # Simulate the best possible attack on an epsilon-DP mechanism (randomised response on each
    # canary's membership): the 95% lower bound may exceed the true epsilon in at most ~5% of trials.
    rng = np.random.default_rng(0)
    m, trials, exceed = 400, 200, 0
    keep = math.exp(epsilon) / (1 + math.exp(epsilon))
    bounds = []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        says_in = np.where(rng.random(m) < keep, included, ~included)
        scores = (says_in + rng.random(m) * 0.1).tolist()  # ties broken at random
        bound = guess_and_bound(scores, included.tolist(), delta=0.0, guess_fraction=0.5).epsilon_lower_bound
        bounds.append(bound)
        exceed += bound > epsilon
    assert exceed <= stats.binom.ppf(0.999, trials, 0.05)  # valid at 95%, with room for chance
    assert np.median(bounds) > 0.3 * epsilon  # and not vacuous: the game finds much of the true epsilon


@pytest.fixture()
def model_dir(trained: TrainedFederation) -> Path:
    """The session's trained model (the attack reads its folder and writes nothing there)."""
    return trained.model


def test_the_attack_finds_leakage_without_dp_and_none_beyond_the_claim_with_it(
    model_dir: Path, small_fed: SynthResult
) -> None:
    data = small_fed.agency_files["tax"]
    common = ("audit", "attack", "--model", model_dir, "--data", data, "--runs", 4, "--seed", 5, "--format", "json")
    control = invoke(*common, "--non-private")
    assert control.exit_code == 0, control.output
    leak = json.loads(control.stdout)
    assert leak["canaries"] == 4 * 40 and leak["guesses"] == 40
    assert leak["epsilon_claimed"] is None and leak["epsilon_lower_bound"] > 1.0  # the attack has power
    private = invoke(*common)
    assert private.exit_code == 0, private.output
    found = json.loads(private.stdout)
    assert found["epsilon_claimed"] == 3.0 and found["noise_multiplier"] > 0.5
    assert found["epsilon_lower_bound"] <= found["epsilon_claimed"] and not found["refutes_claim"]
    assert found["correct"] < leak["correct"]


def test_a_false_claim_is_refuted_with_exit_16(model_dir: Path, small_fed: SynthResult) -> None:
    # Someone claims the non-private recipe is 0.5-DP: the attack's bound refutes it.
    data = small_fed.agency_files["tax"]
    result = invoke(
        "audit", "attack", "--model", model_dir, "--data", data, "--runs", 4, "--seed", 5,
        "--non-private", "--claim", 0.5,
    )  # fmt: skip
    assert result.exit_code == ExitCode.PRIVACY_CLAIM_REFUTED, result.output
    assert "claimed 0.5" in result.stdout and "exceeds the claimed epsilon" in result.stdout
    bad_data = invoke("audit", "attack", "--model", model_dir, "--data", data.parent / "missing.csv")
    assert bad_data.exit_code == ExitCode.DATA_UNUSABLE
