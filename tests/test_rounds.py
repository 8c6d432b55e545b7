"""An agency's round logic: budget enforcement across rounds and jobs, refusals, DP mechanics."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from agencyfl.clients.rounds import TrainRequest, evaluate_round, train_round
from agencyfl.clients.sampling import SamplingError, poisson_batches, require_poisson
from agencyfl.clients.site import AgencySite
from agencyfl.clients.trainer import dp_sgd, noise_generator
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.errors import LedgerError
from agencyfl.federation.model import build_model, model_to_arrays
from agencyfl.federation.spec import load_spec
from agencyfl.privacy.accounting import StepRecord, epsilon_for
from agencyfl.privacy.budget import evaluation_release, planned_releases
from agencyfl.privacy.ledger import spend_records, verify_ledger
from agencyfl.synth import SynthResult


def make_site(fed: SynthResult, tmp_path: Path, budget: float = 10.0, rounds: int = 2) -> tuple[AgencySite, str]:
    text = fed.spec.read_text()
    text = re.sub(r"budget = [0-9.]+", f"budget = {budget}", text)
    text = re.sub(r"\[training\]\nrounds = \d+", f"[training]\nrounds = {rounds}", text)
    text = text.replace('data = "', f'data = "{fed.spec.parent}/')
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    loaded = load_spec(spec)
    site = AgencySite(agency="tax", spec_path=spec, data_path=loaded.data_path("tax"), home=tmp_path / "tax")
    return site, loaded.sha256


def initial(site: AgencySite) -> list[np.ndarray]:
    spec = load_spec(site.spec_path).spec
    return model_to_arrays(build_model(spec.model, FeatureEncoder(spec.schema).width))


def test_budget_spans_jobs_and_a_refused_round_changes_nothing(small_fed: SynthResult, tmp_path: Path) -> None:
    site, sha = make_site(small_fed, tmp_path, budget=3.0)
    arrays = initial(site)
    for r in (1, 2):
        reply = train_round(site, TrainRequest("job-1", r, 2, sha, arrays), seed=r)
        assert reply.status == "trained" and reply.steps == 50
        assert not all(np.array_equal(a, b) for a, b in zip(reply.arrays, arrays, strict=True))
    # two rounds and their two evaluation releases; the job's plan keeps room for its final releases
    spec = load_spec(site.spec_path).spec
    spent = [StepRecord(reply.noise_multiplier, 0.02, 50), evaluation_release(spec)] * 2
    assert reply.epsilon_job == pytest.approx(epsilon_for(spent, 1e-5), rel=1e-9)
    whole_job = [StepRecord(reply.noise_multiplier, 0.02, 100), *planned_releases(spec)]
    assert epsilon_for(whole_job, 1e-5) == pytest.approx(3.0, abs=0.02) and epsilon_for(whole_job, 1e-5) <= 3.0

    ledger_before = (site.ledger_dir / "ledger.jsonl").read_bytes()
    arrays_before = [a.copy() for a in arrays]
    # A second job on the same data starts from the ledger: its first round would cross the budget.
    refused = train_round(site, TrainRequest("job-2", 1, 2, sha, arrays), seed=3)
    assert refused.status == "refused" and "lifetime epsilon would reach" in (refused.reason or "")
    assert refused.arrays == [] and refused.steps == 0
    assert all(np.array_equal(a, b) for a, b in zip(arrays, arrays_before, strict=True))
    check = verify_ledger(site.ledger_dir)
    assert check.ok
    after = (site.ledger_dir / "ledger.jsonl").read_bytes()
    assert after.startswith(ledger_before)  # nothing rewritten; one refusal entry appended
    assert [e.kind for e in check.events] == ["release", "round", "release", "round", "refusal"]
    assert epsilon_for(spend_records(check.events), 1e-5) == pytest.approx(reply.epsilon_lifetime)


def test_a_job_cannot_run_more_rounds_than_it_was_calibrated_for(small_fed: SynthResult, tmp_path: Path) -> None:
    site, sha = make_site(small_fed, tmp_path)
    arrays = initial(site)
    for r in (1, 2):
        assert train_round(site, TrainRequest("j", r, 2, sha, arrays), seed=r).status == "trained"
    extra = train_round(site, TrainRequest("j", 3, 2, sha, arrays), seed=3)
    assert extra.status == "refused" and "outside the job's plan of 2 rounds" in (extra.reason or "")


def test_replayed_round_and_foreign_spec_are_refused(small_fed: SynthResult, tmp_path: Path) -> None:
    site, sha = make_site(small_fed, tmp_path)
    arrays = initial(site)
    assert train_round(site, TrainRequest("j", 1, 2, sha, arrays), seed=1).status == "trained"
    again = train_round(site, TrainRequest("j", 1, 2, sha, arrays), seed=1)
    assert again.status == "refused" and "already trained" in (again.reason or "")
    other = train_round(site, TrainRequest("j", 2, 2, "0" * 64, arrays), seed=1)
    assert other.status == "refused" and "spec differs" in (other.reason or "")
    assert sum(e.kind == "round" for e in verify_ledger(site.ledger_dir).events) == 1


def test_evaluation_returns_only_aggregates(small_fed: SynthResult, tmp_path: Path) -> None:
    site, _ = make_site(small_fed, tmp_path)
    reply = evaluate_round(site, initial(site))
    assert sum(reply.hist_pos) + sum(reply.hist_neg) == reply.num_examples > 0
    assert len(reply.hist_pos) == len(reply.hist_neg) == 1000


@pytest.mark.parametrize("seed", [0, 1])
def test_poisson_batches_have_binomial_mean_and_variance(seed: int) -> None:
    # The sampler dp_sgd uses: batch sizes are Binomial(N, q), mean Nq and variance Nq(1-q).
    n, q, steps = 1000, 0.05, 4000
    sizes = np.array([len(b) for b in poisson_batches(n, q, steps, torch.Generator().manual_seed(seed))])
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 5 * np.sqrt(var / steps)  # 5 standard errors of the mean
    assert abs(sizes.var(ddof=1) - var) < 5 * var * np.sqrt(2 / (steps - 1))  # ... and of the variance
    # each record's inclusion count is Binomial(steps, q): no record is favoured
    counts = np.bincount(np.concatenate([b for b in poisson_batches(n, q, steps, torch.Generator().manual_seed(9))]))
    assert abs(counts.mean() - steps * q) < 5 * np.sqrt(steps * q * (1 - q) / n)


def loaders(n: int) -> dict[str, DataLoader[Any]]:
    data = TensorDataset(torch.zeros(n, 2))
    return {
        "shuffled": DataLoader(data, batch_size=10, shuffle=True),
        "weighted": DataLoader(data, batch_size=10, sampler=WeightedRandomSampler(torch.ones(n), n)),
        "fixed-size": DataLoader(data, batch_size=10),
    }


@pytest.mark.parametrize(
    ("kind", "explanation"),
    [("shuffled", "sample without replacement"), ("weighted", "different chances"), ("fixed-size", "no subsampling")],
)
def test_a_loader_that_is_not_poisson_is_refused_with_its_reason(kind: str, explanation: str) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 2)).astype(np.float32), (rng.random(100) < 0.5).astype(np.float32)
    model = nn.Sequential(nn.Linear(2, 1))
    before = [p.detach().clone() for p in model.parameters()]
    accountant = RDPAccountant()
    with pytest.raises(SamplingError, match=explanation):
        dp_sgd(
            model, x, y, noise_multiplier=1.0, sample_rate=0.1, max_grad_norm=1.0, learning_rate=0.1, steps=10,
            accountant=accountant, generator=noise_generator(0), batches=loaders(100)[kind],
        )  # fmt: skip
    assert accountant.history == [] and all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_poisson_loader_is_accepted_only_at_the_accounted_rate() -> None:
    data = TensorDataset(torch.zeros(100, 2))
    dp_loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=10), generator=torch.Generator())
    assert require_poisson(dp_loader, dp_loader.sample_rate, 100) is dp_loader.batch_sampler
    with pytest.raises(SamplingError, match="accounted at"):
        require_poisson(dp_loader, 0.5, 100)
    with pytest.raises(SamplingError, match="training set has"):
        require_poisson(dp_loader, dp_loader.sample_rate, 99)


@pytest.mark.parametrize("secure", [True, False])
def test_noise_has_the_calibrated_size(secure: bool) -> None:
    # Zero inputs and targets of 0.5 at logit 0 make every per-sample gradient zero, so one step
    # moves the weights by pure noise: std = lr * sigma * C / expected_batch_size. Secure mode
    # (the default) sums four draws and halves them: the same distribution, drawn differently.
    d, n, q, sigma, clip, lr = 4000, 400, 0.25, 2.0, 1.5, 1.0
    model = nn.Sequential(nn.Linear(d, 1))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    dp_sgd(
        model,
        np.zeros((n, d), np.float32),
        np.full(n, 0.5, np.float32),
        noise_multiplier=sigma,
        sample_rate=q,
        max_grad_norm=clip,
        learning_rate=lr,
        steps=1,
        accountant=RDPAccountant(),
        generator=noise_generator(7),
        secure_noise=secure,
    )
    moved = model[0].weight.detach().numpy().ravel()
    expected = lr * sigma * clip / (n * q)
    assert moved.std() == pytest.approx(expected, rel=0.05)
    assert abs(moved.mean()) < 4 * expected / np.sqrt(d)
    standardized = moved / expected
    assert abs(np.mean(standardized**4) - 3.0) < 0.5  # Gaussian kurtosis, not a sum of few uniforms


def test_empty_poisson_batches_still_count_as_steps() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 2)).astype(np.float32), np.array([0, 1, 0, 1, 1], np.float32)
    accountant = RDPAccountant()
    result = dp_sgd(
        nn.Sequential(nn.Linear(2, 1)),
        x,
        y,
        noise_multiplier=1.0,
        sample_rate=0.05,
        max_grad_norm=1.0,
        learning_rate=0.1,
        steps=40,
        accountant=accountant,
        generator=noise_generator(0),
    )
    assert result.steps == 40  # with 5 records at q=0.05 most batches are empty
    assert sum(h[2] for h in accountant.history) == 40


def test_the_he_friendly_mlp_trains_under_dp(small_fed: SynthResult, tmp_path: Path) -> None:
    site, _ = make_site(small_fed, tmp_path)
    text = site.spec_path.read_text().replace(
        '[model]\nkind = "logistic"', '[model]\nkind = "mlp"\nhidden = [8]\nactivation = "square"'
    )
    site.spec_path.write_text(text)
    loaded = load_spec(site.spec_path)
    reply = train_round(site, TrainRequest("j", 1, 2, loaded.sha256, initial(site)), seed=1)
    assert reply.status == "trained" and reply.steps == 50 and len(reply.arrays) == 4
    assert all(np.isfinite(a).all() for a in reply.arrays)


# ---------------------------------------------------------------- issue 11 item 7: the plan is the agency's
def test_the_coordinator_cannot_choose_the_number_of_rounds(small_fed: SynthResult, tmp_path: Path) -> None:
    # rounds=1 would calibrate the noise for one round and put the whole job budget into it
    site, sha = make_site(small_fed, tmp_path, rounds=2)
    reply = train_round(site, TrainRequest("j", 1, 1, sha, initial(site)), seed=1)
    assert (
        reply.status == "refused" and reply.reason == "the coordinator's plan says rounds 1; this agency's spec says 2"
    )
    assert reply.arrays == [] and reply.steps == 0 and reply.evaluation is None
    claimed_epsilon = train_round(site, TrainRequest("j", 1, 2, sha, initial(site), epsilon=30.0), seed=1)
    assert claimed_epsilon.status == "refused" and "epsilon 30.0" in (claimed_epsilon.reason or "")
    events = verify_ledger(site.ledger_dir).events
    assert [e.kind for e in events] == ["refusal", "refusal"] and epsilon_for(spend_records(events), 1e-5) == 0.0


def test_fresh_job_ids_cannot_carry_a_trained_model_past_the_per_job_cap(
    small_fed: SynthResult, tmp_path: Path
) -> None:
    site, sha = make_site(small_fed, tmp_path, budget=10.0, rounds=2)
    trained = initial(site)
    for r in (1, 2):
        reply = train_round(site, TrainRequest("j", r, 2, sha, trained), seed=r)
        assert reply.status == "trained"
        trained = reply.arrays
    # The coordinator goes on training the same model under new job ids, each with a fresh per-job cap.
    later = train_round(site, TrainRequest("k", 2, 2, sha, trained), seed=3)
    assert later.status == "refused" and "must start at round 1, not 2" in (later.reason or "")
    restart = train_round(site, TrainRequest("k", 1, 2, sha, trained), seed=4)
    assert restart.status == "refused" and "does not start from the spec's initial model" in (restart.reason or "")
    events = verify_ledger(site.ledger_dir).events
    assert {e.job for e in events if e.kind in {"round", "release"}} == {"j"}
    cap = load_spec(site.spec_path).spec.privacy.epsilon
    assert epsilon_for(spend_records(events, "j"), 1e-5) <= cap  # this model's spend stays within one job's cap
    # a genuine new job starts from the spec's initial model and is accepted
    assert train_round(site, TrainRequest("k", 1, 2, sha, initial(site)), seed=5).status == "trained"


def test_zero_planned_steps_are_refused_at_once(small_fed: SynthResult, tmp_path: Path) -> None:
    import time

    from agencyfl.privacy.accounting import calibrate_noise

    site, sha = make_site(small_fed, tmp_path, rounds=2)
    start = time.monotonic()
    reply = train_round(site, TrainRequest("j", 1, 0, sha, initial(site)), seed=1)  # used to hang the ClientApp
    assert reply.status == "refused" and "rounds 0" in (reply.reason or "")
    with pytest.raises(ValueError, match="steps must be positive"):
        calibrate_noise(3.0, 1e-5, 0.02, 0)
    assert time.monotonic() - start < 10.0


# ---------------------------------------------------------------- issue 11 item 3: the agency's side of a reset
def trained_site(fed: SynthResult, tmp_path: Path) -> tuple[AgencySite, str]:
    site, sha = make_site(fed, tmp_path, rounds=2)
    assert train_round(site, TrainRequest("j", 1, 2, sha, initial(site)), seed=1).status == "trained"
    return site, sha


def test_a_deleted_ledger_file_with_its_head_kept_is_not_a_fresh_budget(small_fed: SynthResult, tmp_path: Path) -> None:
    site, sha = trained_site(small_fed, tmp_path)
    (site.ledger_dir / "ledger.jsonl").unlink()
    with pytest.raises(LedgerError, match="records signed entries"):
        train_round(site, TrainRequest("j2", 1, 2, sha, initial(site)), seed=2)
    assert not (site.ledger_dir / "ledger.jsonl").exists()  # nothing written, nothing trained


def test_a_renamed_ledger_folder_is_not_a_fresh_budget(small_fed: SynthResult, tmp_path: Path) -> None:
    site, sha = trained_site(small_fed, tmp_path)
    site.ledger_dir.rename(site.ledger_dir.with_name("ledger.old"))
    with pytest.raises(LedgerError, match="key began ledger"):
        train_round(site, TrainRequest("j2", 1, 2, sha, initial(site)), seed=2)
    assert not (site.ledger_dir / "ledger.jsonl").exists()


def test_a_ledger_swapped_for_another_of_the_same_key_is_refused(small_fed: SynthResult, tmp_path: Path) -> None:
    from agencyfl.privacy.keys import load_signing_key
    from agencyfl.privacy.ledger import Ledger

    site, sha = trained_site(small_fed, tmp_path)
    shutil.rmtree(site.ledger_dir)
    Ledger(site.ledger_dir, load_signing_key(site.signing_key_path), party="environment").ensure_genesis()
    with pytest.raises(LedgerError, match="belongs to 'environment'"):
        train_round(site, TrainRequest("j2", 1, 2, sha, initial(site)), seed=2)


def test_an_empty_ledger_file_is_not_a_fresh_budget(small_fed: SynthResult, tmp_path: Path) -> None:
    site, sha = trained_site(small_fed, tmp_path)
    (site.ledger_dir / "ledger.jsonl").write_bytes(b"")
    (site.ledger_dir / "head.json").unlink()
    with pytest.raises(LedgerError, match="does not verify"):
        train_round(site, TrainRequest("j2", 1, 2, sha, initial(site)), seed=2)


def test_the_validation_split_is_the_agencys_secret(small_fed: SynthResult, tmp_path: Path) -> None:
    # The split used to be salted with the public federation name: anyone could tell who is in it.
    from agencyfl.clients.local_data import load_local_data
    from agencyfl.federation.table import load_table, validation_mask

    site, _ = make_site(small_fed, tmp_path)
    other = site.model_copy(update={"home": tmp_path / "other-home"})
    loaded = load_spec(site.spec_path)
    frame = load_table(site.data_path, loaded.spec.schema, write_quarantine=False).valid
    ids = frame[loaded.spec.schema.id]
    public = validation_mask(ids, loaded.spec.training.validation_fraction, loaded.spec.federation.name)
    x = FeatureEncoder(loaded.spec.schema).encode(frame)
    mine, theirs = load_local_data(site, loaded), load_local_data(other, loaded)
    for data in (mine, theirs):  # neither split is the one the public salt gives
        assert data.x_val.shape != x[public].shape or not np.array_equal(data.x_val, x[public])
    assert mine.x_val.shape != theirs.x_val.shape or not np.array_equal(mine.x_val, theirs.x_val)
    assert (site.salt_path.stat().st_mode & 0o777) == 0o600 and len(site.validation_salt()) == 64
    assert site.validation_salt() != other.validation_salt()
    assert abs(len(mine.y_val) / len(x) - loaded.spec.training.validation_fraction) < 0.03  # still a 20 % split
