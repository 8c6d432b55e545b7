from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import in_a_fresh_process
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from agencyfl.clients.trainer import dp_sgd, noise_generator
from agencyfl.privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    SpendTally,
    StepRecord,
    calibrate_noise,
    epsilon_for,
    epsilon_prv,
    epsilon_rdp,
)
from agencyfl.privacy.ledger import verify_ledger
from agencyfl.synth import SynthResult


def test_opacus_reference_value() -> None:
    # Published reference (Opacus tests): sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> 7.32911.
    assert epsilon_for([StepRecord(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.32911, abs=1e-4)


def test_the_rdp_analysis_is_opacus_own_on_its_orders() -> None:
    # accounting.py runs Opacus' analysis file under a private name when Opacus is not imported (its package
    # imports torch): in a fresh process (this one has imported Opacus, so here it is Opacus' own module),
    # the same file, the same orders and the same epsilon as an RDPAccountant over the same histories.
    check = (
        "import inspect, random, sys\n"
        "from agencyfl.privacy import accounting\n"
        "assert accounting._RDP.__name__ == 'agencyfl._opacus_rdp_analysis' and 'torch' not in sys.modules\n"
        "from opacus.accountants import RDPAccountant\n"
        "import opacus.accountants.analysis.rdp as opacus_rdp\n"
        "assert inspect.getsourcefile(accounting.compute_rdp) == inspect.getsourcefile(opacus_rdp.compute_rdp)\n"
        "assert tuple(RDPAccountant.DEFAULT_ALPHAS) == accounting.ORDERS\n"
        "rng = random.Random(5)\n"
        "for _ in range(40):\n"
        "    history = [accounting.StepRecord(rng.uniform(0.3, 60.0), rng.choice([1.0, rng.uniform(1e-4, 0.5)]),\n"
        "                                     rng.randint(1, 3000)) for _ in range(rng.randint(1, 4))]\n"
        "    one = RDPAccountant()\n"
        "    one.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in history]\n"
        "    delta = rng.choice([1e-3, 1e-5, 1e-8])\n"
        "    assert accounting.epsilon_rdp(history, delta) == one.get_epsilon(delta), history\n"
        "    assert accounting.epsilon_for(history, delta) <= one.get_epsilon(delta), history\n"
        "print('same')\n"
    )
    assert in_a_fresh_process(check).stdout.strip() == "same"


def test_a_loose_rdp_order_is_not_a_warning_for_the_reader() -> None:
    # A very noisy release (its best RDP order is Opacus' largest: Opacus warns), three DP-SGD rounds with
    # noisy validation releases as the trained federation's ledgers hold (PRV's domain bound at a tiny delta
    # warns), and a calibration (its probe at the least noise: the smallest order). Each epsilon is still an
    # upper bound; `audit verify` printed the warning to auditors. In a fresh process, as a command runs,
    # with Python's default filters: and another warning of the process is still shown once, not after
    # every epsilon (a `catch_warnings` per call had reset that record: 201 torch warnings in one test file).
    check = (
        "import warnings\n"
        "from agencyfl.privacy.accounting import StepRecord, calibrate_noise, epsilon_for, epsilon_prv, epsilon_rdp\n"
        "rounds = [StepRecord(10.0, 1.0, 1), StepRecord(0.8846, 0.02, 50)] * 3 + [StepRecord(5.0, 1.0, 1)]\n"
        "for records in ([StepRecord(50.0, 1.0, 1)], rounds):\n"
        "    assert 0 < epsilon_prv(records, 1e-5) < epsilon_rdp(records, 1e-5) and epsilon_for(records, 1e-5) > 0\n"
        "    warnings.warn('the same warning from the same line', UserWarning)\n"
        "calibrate_noise(1.0, 1e-5, 0.05, 50)\n"
    )
    done = in_a_fresh_process(check)
    assert "Optimal order" not in done.stderr, done.stderr
    assert done.stderr.count("the same warning from the same line") == 1, done.stderr


def test_a_float32_record_does_not_change_the_epsilon_of_a_float64_one() -> None:
    # The per-step curves are cached by (sample rate, noise multiplier): a NumPy float32 and the float64 of
    # its value are one key, and the float32 curve (2.4e-5 lower in epsilon here) was served to both.
    sigma, q = np.float32(1.1371), np.float32(0.0213)
    epsilon_for([StepRecord(sigma, q, 500)], 1e-5)  # type: ignore[arg-type]  # fills the cache first
    one = RDPAccountant()
    one.history = [(float(sigma), float(q), 500)]
    assert epsilon_for([StepRecord(float(sigma), float(q), 500)], 1e-5) == one.get_epsilon(1e-5)


def test_nothing_spent_is_zero() -> None:
    assert epsilon_for([], 1e-5) == 0.0
    assert epsilon_for([StepRecord(1.0, 0.02, 0)], 1e-5) == 0.0


@settings(max_examples=25, deadline=None)
@given(
    target=st.floats(0.3, 10.0),
    q=st.floats(0.005, 0.2),
    steps=st.integers(1, 3000),
)
def test_calibration_never_overshoots(target: float, q: float, steps: int) -> None:
    if epsilon_for([StepRecord(MAX_NOISE_MULTIPLIER, q, steps)], 1e-5) > target:
        with pytest.raises(ValueError, match="cannot be met"):  # infeasible: refused, never overshot
            calibrate_noise(target, 1e-5, q, steps)
        return
    sigma = calibrate_noise(target, 1e-5, q, steps)
    achieved = epsilon_for([StepRecord(sigma, q, steps)], 1e-5)
    assert achieved <= target
    assert achieved > target - 0.05  # and it does not waste the budget either


@pytest.mark.parametrize("rounds", [1, 3])
def test_epsilon_after_rounds_equals_one_accountant_over_all_steps(rounds: int) -> None:
    # Each round trains with a fresh accountant (a fresh process in deployment) whose Opacus optimizer
    # hook counts that round's steps; the ledger records them, and the epsilon composed from the ledger
    # must equal that of one accountant that saw every step of every round.
    q, steps, sigma = 0.05, 20, 1.1
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 3)).astype(np.float32), (rng.random(200) < 0.5).astype(np.float32)
    ledger: list[StepRecord] = []
    continuous = RDPAccountant()
    for _ in range(rounds):
        this_round = RDPAccountant()
        result = dp_sgd(
            nn.Sequential(nn.Linear(3, 1)),
            x,
            y,
            noise_multiplier=sigma,
            sample_rate=q,
            max_grad_norm=1.0,
            learning_rate=0.1,
            steps=steps,
            accountant=this_round,
            generator=noise_generator(1),
        )
        assert result.steps == steps and result.accountant is this_round
        assert this_round.get_epsilon(1e-5) == pytest.approx(
            epsilon_for([StepRecord(sigma, q, steps)], 1e-5), rel=1e-12
        )
        ledger.append(StepRecord(sigma, q, result.steps))
        for _ in range(steps):
            continuous.step(noise_multiplier=sigma, sample_rate=q)
        assert epsilon_for(ledger, 1e-5) == pytest.approx(continuous.get_epsilon(1e-5), rel=1e-12)


def test_prv_is_opacus_prv_accountant_over_the_merged_history() -> None:
    # epsilon_prv composes with Opacus' PRV building blocks instead of writing a history into a
    # PRVAccountant: it must give the accountant's own figure for the same steps taken one by one
    # (merged per mechanism, in the order the accountant merges consecutive steps).
    records = [StepRecord(1.0, 0.02, 50), StepRecord(1.4, 0.02, 30), StepRecord(1.0, 0.02, 20), StepRecord(5.0, 1.0, 1)]
    accountant = PRVAccountant()
    for sigma, q, steps in [(1.0, 0.02, 70), (1.4, 0.02, 30), (5.0, 1.0, 1)]:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    with np.errstate(divide="ignore"):
        expected = accountant.get_epsilon(delta=1e-5, eps_error=0.01)
    assert epsilon_prv(records, 1e-5) == pytest.approx(expected, rel=1e-12)


def test_composition_grows_with_rounds() -> None:
    eps = [epsilon_for([StepRecord(1.0, 0.02, 50)] * r, 1e-5) for r in range(1, 6)]
    assert eps == sorted(eps) and eps[0] < eps[-1]


def test_impossible_budget_raises() -> None:
    with pytest.raises(ValueError):
        calibrate_noise(1e-6, 1e-12, 0.5, 100000)


def test_prv_is_reported_beside_rdp_and_is_the_tighter_bound() -> None:
    # Both are upper bounds on the same mechanism; PRV (numerical) is tighter than RDP, which is why
    # enforcement uses RDP: refusing by the larger bound is the safe side.
    records = [StepRecord(1.0, 0.02, 500), StepRecord(1.4, 0.02, 300)]
    rdp, prv = epsilon_for(records, 1e-5), epsilon_prv(records, 1e-5)
    assert 0.5 * rdp < prv < rdp
    assert epsilon_prv([], 1e-5) == 0.0


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.5, 0.04, 2250), (1.0, 0.02, 500), (0.9, 0.02, 250)])
def test_prv_and_rdp_agree_with_google_dp_accounting(sigma: float, q: float, steps: int) -> None:
    # Independent oracles: Google's dp_accounting. Its PLD accountant computes the same privacy curve
    # as PRV by another numerical method (within PRV's eps_error of 0.01); its RDP accountant is a
    # second implementation of the RDP bound enforcement uses.
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(event)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(event)
    records = [StepRecord(sigma, q, steps)]
    assert epsilon_prv(records, 1e-5) == pytest.approx(pld.get_epsilon(1e-5), abs=0.02)
    assert epsilon_for(records, 1e-5) == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-3)


ROUND_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
import numpy as np
from agencyfl.clients.rounds import TrainRequest, train_round
from agencyfl.clients.site import AgencySite
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.model import build_model, model_to_arrays
from agencyfl.federation.spec import load_spec

spec_path, home, job, round_ = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
loaded = load_spec(spec_path)
site = AgencySite(agency="tax", spec_path=spec_path, data_path=loaded.data_path("tax"), home=home)
arrays = model_to_arrays(build_model(loaded.spec.model, FeatureEncoder(loaded.spec.schema).width))
reply = train_round(site, TrainRequest(job, round_, loaded.spec.training.rounds, loaded.sha256, arrays))
print(reply.status, reply.epsilon_lifetime)
"""


def test_composition_across_process_restarts_and_jobs_equals_one_accountant(
    small_fed: SynthResult, tmp_path: Path
) -> None:
    # Each round in its own Python process (as a SuperNode runs each message), two jobs: the lifetime
    # epsilon the agency records must be that of one accountant that saw every step.
    import subprocess
    import sys

    home = tmp_path / "tax"
    plan = [("job-a", 1), ("job-a", 2), ("job-b", 1)]
    for job, round_ in plan:
        run = subprocess.run(
            [sys.executable, "-c", ROUND_IN_A_FRESH_PROCESS, str(small_fed.spec), str(home), job, str(round_)],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        assert run.stdout.split()[0] == "trained", run.stdout + run.stderr
    events = verify_ledger(home / "ledger").events
    assert [(e.job, e.round) for e in events if e.kind == "round"] == plan
    assert [e.release for e in events if e.kind == "release"] == ["evaluation"] * 3  # each round's, accounted too
    one = RDPAccountant()
    for e in events:
        for _ in range(e.steps):
            one.step(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate)
    assert events[-1].epsilon_lifetime == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)
    assert events[-1].epsilon_job == pytest.approx(
        epsilon_for([r for e in events if e.job == "job-b" for r in e.step_records()], 1e-5), rel=1e-9
    )


@settings(max_examples=15, deadline=None)
@given(target=st.floats(1.0, 8.0), release=st.floats(2.0, 50.0), steps=st.integers(50, 1000))
def test_calibration_with_a_planned_release_never_overshoots(target: float, release: float, steps: int) -> None:
    # The job's DP-SGD noise leaves room for a noisy fairness release: both together meet the target.
    also = (StepRecord(release, 1.0, 1),)
    if epsilon_for([StepRecord(MAX_NOISE_MULTIPLIER, 0.02, steps), *also], 1e-5) > target:
        with pytest.raises(ValueError, match="cannot be met"):
            calibrate_noise(target, 1e-5, 0.02, steps, also)
        return
    sigma = calibrate_noise(target, 1e-5, 0.02, steps, also)
    achieved = epsilon_for([StepRecord(sigma, 0.02, steps), *also], 1e-5)
    assert target - 0.05 < achieved <= target
    # a release can only cost training noise (up to the two searches' tolerances of 0.005 in epsilon)
    assert sigma >= 0.99 * calibrate_noise(target, 1e-5, 0.02, steps)


def test_a_release_composes_with_training_in_both_accountants() -> None:
    # A noisy fairness release (q = 1) on top of DP-SGD: RDP and PRV both against dp_accounting's PLD.
    import dp_accounting

    records = [StepRecord(1.0, 0.02, 500), StepRecord(5.0, 1.0, 1)]
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.0)), 500
        )
    )
    pld.compose(dp_accounting.GaussianDpEvent(5.0))
    exact = pld.get_epsilon(1e-5)
    assert epsilon_prv(records, 1e-5) == pytest.approx(exact, abs=0.02)
    assert exact < epsilon_for(records, 1e-5) < exact * 1.25  # RDP: an upper bound, not far above
    assert epsilon_for(records, 1e-5) > epsilon_for(records[:1], 1e-5)


def _gdp_delta(epsilon: float, mu: float) -> float:
    """Dong, Roth, Su's Corollary 2.13, written here with SciPy (not dp_accounting): delta of mu-GDP at epsilon."""
    from scipy.stats import norm

    return float(norm.cdf(-epsilon / mu + mu / 2) - np.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2))


@pytest.mark.parametrize(
    "history",
    [
        [StepRecord(28.9, 1.0, 51)],  # a vertical job: 50 iterations and the Hessian at epsilon 1 (RDP's sigma)
        [StepRecord(40.7, 1.0, 101)],
        [StepRecord(1.0, 1.0, 1)],
        [StepRecord(5.0, 1.0, 3), StepRecord(12.0, 1.0, 40), StepRecord(300.0, 1.0, 2)],  # several jobs, releases
    ],
)
def test_gaussian_releases_without_sampling_are_accounted_exactly(history: list[StepRecord]) -> None:
    # Gaussian releases compose to one Gaussian (mu adds in quadrature): the enforced epsilon is the exact one,
    # delta(epsilon) <= target and no smaller epsilon would do, and it is below RDP's bound
    mu = float(np.sqrt(sum(r.steps / r.noise_multiplier**2 for r in history)))
    eps = epsilon_for(history, 1e-5)
    assert _gdp_delta(eps, mu) <= 1e-5 < _gdp_delta(eps * (1 - 1e-6), mu)
    assert eps < 0.95 * epsilon_rdp(history, 1e-5)
    tally = SpendTally()
    for record in history:
        tally.add(record)
    assert tally.epsilon(1e-5) == eps and tally.epsilon(1e-5, "rdp") == epsilon_rdp(history, 1e-5)
    assert epsilon_for(history, 1e-5, "rdp") == epsilon_rdp(history, 1e-5)


def test_one_subsampled_step_and_the_whole_history_is_accounted_by_rdp() -> None:
    releases = [StepRecord(28.9, 1.0, 51)]
    mixed = [*releases, StepRecord(1.0, 0.02, 1)]
    assert epsilon_for(mixed, 1e-5) == epsilon_rdp(mixed, 1e-5) > epsilon_rdp(releases, 1e-5)


def test_calibration_for_releases_spends_the_budget_exactly() -> None:
    # a vertical job at epsilon 1, 50 iterations and the Hessian: 8% less noise than RDP's calibration
    sigma = calibrate_noise(1.0, 1e-5, 1.0, 51)
    mu = np.sqrt(51) / sigma
    assert _gdp_delta(1.0, mu) <= 1e-5 < _gdp_delta(1.0, np.sqrt(51) / (sigma * 0.9999))
    assert sigma == pytest.approx(26.64, abs=0.01)
    assert epsilon_rdp([StepRecord(sigma, 1.0, 51)], 1e-5) > 1.08  # RDP alone would call this spend 1.08+


@pytest.mark.parametrize("sigma", [0.0, 1e-160, 1e-170, float("inf"), float("nan")])
def test_a_degenerate_noise_multiplier_is_left_to_rdp(sigma: float) -> None:
    # no exact figure for a noise multiplier that is not finite and positive, or whose 1 / sigma^2 overflows:
    # RDP's figure decides, in the running tally as in the recomputation, and nothing raises
    records = [StepRecord(28.9, 1.0, 50), StepRecord(sigma, 1.0, 1)]
    tally = SpendTally()
    for record in records:
        tally.add(record)
    rdp = epsilon_rdp(records, 1e-5)
    assert epsilon_for(records, 1e-5) == rdp
    assert tally.epsilon(1e-5) == rdp
