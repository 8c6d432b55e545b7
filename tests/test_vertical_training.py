"""Vertical training under CKKS against its plaintext reference, and what each party received."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tenseal as ts
from conftest import gaussian_releases_spend
from dp_accounting.rdp import RdpAccountant

from agencyfl.privacy.events import to_dp_event
from agencyfl.vertical import (
    Block,
    LabelData,
    VerticalPlan,
    VerticalResult,
    place_block,
    reference_train,
    train_vertical,
)

FEATURES = ("hrss", "tax", "environment")
PLAN = VerticalPlan(agencies=4, iterations=3, epsilon=3.0, delta=1e-5, optimizer="gd", learning_rate=20.0)


@pytest.fixture(scope="module")
def blocks(vertical_blocks: tuple[list[Block], Block, LabelData]) -> tuple[list[Block], Block, LabelData]:
    assert tuple(b.agency for b in vertical_blocks[0]) == FEATURES
    return vertical_blocks


@pytest.fixture(scope="module")
def run(blocks: tuple[list[Block], Block, LabelData]) -> VerticalResult:
    features, label, labels = blocks
    return train_vertical(features, label, labels, PLAN, noise_rng=np.random.default_rng(7), mask_seed=1)


def test_blocks_are_clipped_and_mark_what_is_not_held(blocks: tuple[list[Block], Block, LabelData]) -> None:
    features, label, labels = blocks
    for b in [*features, label]:
        assert np.linalg.norm(b.x, axis=1).max() <= 1.0 + 1e-12
        assert np.array_equal(b.x[:, -1] == 1.0, ~b.held)
        assert not b.x[~b.held, :-1].any()
    assert 0.55 < features[0].held.mean() < 0.8  # hrss knows about 69% of households
    assert labels.validation.sum() > 0 and not (labels.validation & labels.train).any()


def test_encrypted_weights_match_the_plaintext_reference(
    blocks: tuple[list[Block], Block, LabelData], run: VerticalResult
) -> None:
    features, label, labels = blocks
    reference = reference_train(features, label, labels, PLAN, np.random.default_rng(7))
    for name, w in reference.items():
        assert np.abs(run.weights[name] - w).max() < 1e-3, name
    assert max(np.abs(w).max() for w in reference.values()) > 0.05  # it moved
    assert 0.7 < run.validation_auc <= 1.0  # scored through the encrypted path


def test_clipped_partial_scores_train_as_the_reference_and_leave_the_clipped_rows_out(
    blocks: tuple[list[Block], Block, LabelData],
) -> None:
    """With a clip small enough to bite, the encrypted protocol still takes the reference's steps: each holder
    clips its own partial score and drops the households it clipped from its own gradient."""
    features, label, labels = blocks
    plan = PLAN.model_copy(update={"score_clip": 0.2})
    assert plan.sensitivity == pytest.approx(np.sqrt(5) * (0.5 + 4 * 0.2 / 4))
    two = plan.model_copy(update={"iterations": 2})
    before = reference_train(features, label, labels, two, np.random.default_rng(7))
    for b in [features[1], label]:  # tax and civil affairs: the last iteration clips some of theirs, not all
        w = before[b.agency]
        u = b.x @ w if b is not label else b.x @ w[:-1] + w[-1]
        assert 0.02 < (np.abs(u) >= 0.2).mean() < 0.98, b.agency
    result = train_vertical(features, label, labels, plan, noise_rng=np.random.default_rng(7), mask_seed=1,
                            validate=False)  # fmt: skip
    reference = reference_train(features, label, labels, plan, np.random.default_rng(7))
    unclipped = reference_train(
        features, label, labels, plan.model_copy(update={"score_clip": None}), np.random.default_rng(7)
    )
    # a household whose score lies within the CKKS error of C can fall on either side of the clip in the two
    # runs; each such one moves a weight by at most lr D / N = 20 x 0.7 / 3162 = 0.0044: a few are allowed,
    # far below what the clip itself changes (1.7 here)
    for name, w in reference.items():
        assert np.abs(result.weights[name] - w).max() < 1e-2, name
    assert max(np.abs(reference[n] - unclipped[n]).max() for n in reference) > 0.5  # the clip changed the steps


def test_a_holder_with_huge_weights_still_sends_scores_within_its_clip(run: VerticalResult) -> None:
    """The residual's bound (hence the noise) rests on |z| <= K C whatever the weights: a party whose
    weights grew (or were set) far beyond the projection still encrypts partial scores within [-C, C]."""
    tax, civil, arbiter = run.parties["tax"], run.parties["civil-affairs"], run.parties["arbiter"]
    trained, received = tax.weights, len(civil.received)
    tax.weights = trained * 1e4
    try:
        raw = civil._open(tax.partial_scores(99), "tax", "partial-scores", 99, len(civil.block.x), civil.slots)
    finally:  # the module's run is shared: put it back
        tax.weights = trained
        del civil.received[received:]
    values = np.concatenate([ts.ckks_vector_from(arbiter._context, r).decrypt() for r in raw])[: len(tax.block.x)]
    assert PLAN.score_clip is not None
    assert np.abs(values).max() <= PLAN.score_clip + 1e-4
    assert (np.abs(values) > PLAN.score_clip - 1e-3).mean() > 0.5  # most were clipped


def test_no_party_receives_per_household_plaintext(run: VerticalResult) -> None:
    civil = run.parties["civil-affairs"]
    for r in civil.received:
        assert r.content in {"public-context", "sealed-ciphertexts", "masked-values"}
        if r.content == "sealed-ciphertexts":
            assert r.kind == "partial-scores" and r.sender in FEATURES
    for name in FEATURES:
        for r in run.parties[name].received:
            assert r.content in {"public-context", "sealed-ciphertexts", "masked-values"}
            assert r.sender in {"civil-affairs", "arbiter"}
    arbiter = run.parties["arbiter"]
    gradients = [r for r in arbiter.received if r.kind == "gradient"]
    assert len(gradients) == 4 * PLAN.iterations
    assert all(r.content == "gradient-ciphertexts" and r.slots == 1 for r in gradients)
    others = [r for r in arbiter.received if r.kind != "gradient"]
    assert [(r.sender, r.content) for r in others] == [("civil-affairs", "masked-scores")]  # validation, masked


def test_households_not_assessed_contribute_nothing(
    blocks: tuple[list[Block], Block, LabelData], run: VerticalResult
) -> None:
    features, label, labels = blocks
    rng = np.random.default_rng(3)
    outside = ~labels.train
    x = features[1].x.copy()
    x[outside] = rng.uniform(-1, 1, size=x[outside].shape) / np.sqrt(x.shape[1])  # tax's rows changed there
    changed = [features[0], features[1].with_inputs(x), features[2]]
    again = train_vertical(changed, label, labels, PLAN, noise_rng=np.random.default_rng(7), validate=False)
    for name, w in run.weights.items():
        assert np.abs(again.weights[name] - w).max() < 1e-3, name


def test_the_job_stays_within_its_epsilon(run: VerticalResult) -> None:
    assert len(run.events) == PLAN.iterations
    assert all(e == PLAN.iteration_event() for e in run.events)
    # four partial scores, each clipped by its holder to C: |z| <= 4 C, whatever the weights
    assert PLAN.score_clip is not None and 4 * PLAN.score_clip < np.sqrt(5) * PLAN.weight_bound
    assert PLAN.sensitivity == pytest.approx(np.sqrt(5) * (0.5 + 4 * PLAN.score_clip / 4))
    unclipped = PLAN.model_copy(update={"score_clip": None})
    # joint projection: |z| <= sqrt(K + 1) W (Cauchy-Schwarz over 4 blocks of norm <= 1 and the intercept)
    assert unclipped.sensitivity == pytest.approx(np.sqrt(5) * (0.5 + np.sqrt(5) * PLAN.weight_bound / 4))
    assert unclipped.model_copy(update={"projection": "block"}).sensitivity == pytest.approx(
        np.sqrt(5) * (0.5 + 5 * PLAN.weight_bound / 4)
    )
    # a loose clip: the projection's bound is the smaller one, and both hold
    loose = PLAN.model_copy(update={"score_clip": 1e3})
    assert loose.sensitivity == unclipped.sensitivity
    # Gaussian releases without sampling: calibrated by their exact epsilon (checked with SciPy alone), which
    # RDP (dp_accounting's) bounds from above
    assert 0.999 * PLAN.epsilon < gaussian_releases_spend(run.mechanism, PLAN.delta) <= PLAN.epsilon + 1e-9
    accountant = RdpAccountant()
    accountant.compose(to_dp_event(run.mechanism))
    assert accountant.get_epsilon(PLAN.delta) > PLAN.epsilon


def test_a_planted_sentinel_is_clipped_to_within_the_noise(blocks: tuple[list[Block], Block, LabelData]) -> None:
    features, label, labels = blocks
    hrss = features[0]
    target = int(np.flatnonzero(labels.train & hrss.held)[0])
    values = np.column_stack([hrss.x[hrss.held, :-1], np.zeros(hrss.held.sum())])
    values[np.flatnonzero(hrss.held) == target, -1] = 1e9  # one household's huge planted value
    planted = place_block("hrss", [*hrss.names[:-1], "sentinel"], values, np.flatnonzero(hrss.held), len(hrss.x))
    assert np.linalg.norm(planted.x, axis=1).max() <= 1.0 + 1e-12
    plan = PLAN.model_copy(update={"iterations": 1})
    result = train_vertical(
        [planted, *features[1:]], label, labels, plan, noise_rng=np.random.default_rng(5), validate=False
    )
    scale = 1.0 / len(label.x)
    noise = np.random.default_rng(5).normal(0.0, plan.noise_std * scale, size=planted.width)  # the first draw
    release = result.parties["hrss"].releases[0]
    sentinel = planted.names.index("sentinel")
    signal = release[sentinel] - noise[sentinel]
    assert abs(signal) <= plan.residual_bound * scale + 1e-5  # one clipped household's residual at most
    assert plan.residual_bound * scale < plan.noise_std * scale  # ... far inside the noise's scale


def test_an_arbiter_that_alters_the_validation_scores_is_caught(
    run: VerticalResult, blocks: tuple[list[Block], Block, LabelData]
) -> None:
    """A curious arbiter shifting one household's decrypted score would read its label from the AUC."""
    from agencyfl.vertical.protocol import Arbiter, FeatureHolder, LabelHolder

    _, _, labels = blocks
    civil, arbiter = run.parties["civil-affairs"], run.parties["arbiter"]
    assert isinstance(civil, LabelHolder) and isinstance(arbiter, Arbiter)
    holders = [run.parties[a] for a in FEATURES]
    assert all(isinstance(h, FeatureHolder) for h in holders)

    def decrypted() -> np.ndarray:
        step = len(civil.releases) + 1  # after the last iteration
        partials = {h.name: h.partial_scores(step) for h in holders}  # type: ignore[union-attr]
        return arbiter.decrypt_masked_scores(civil.name, civil.masked_scores(partials, step))

    records = [p.received for p in (civil, arbiter, *holders)]  # the shared run's, as the other tests read them
    kept = [len(r) for r in records]
    try:
        _tamper(civil, decrypted, labels, run.validation_logits)
    finally:
        for record, n in zip(records, kept, strict=True):
            del record[n:]


def _tamper(civil: Any, decrypted: Any, labels: LabelData, expected: np.ndarray) -> None:
    from agencyfl.federation.errors import MessageRejectedError

    honest = civil.unmask_scores(decrypted())
    np.testing.assert_allclose(honest, expected, atol=1e-3)
    inside, outside = np.flatnonzero(labels.validation)[0], np.flatnonzero(~labels.validation)[0]
    for position, delta in ((inside, 3.0), (inside, 0.05), (outside, 3.0)):
        values = decrypted()
        values[position] += delta
        with pytest.raises(MessageRejectedError, match="altered"):
            civil.unmask_scores(values)
    values = decrypted()
    with pytest.raises(MessageRejectedError, match="decrypted scores"):
        civil.unmask_scores(values[: len(values) // 2])  # the tags dropped


def test_the_card_s_auc_comes_from_a_histogram_that_tracks_the_exact_one() -> None:
    """The AUC a card carries is computed from a noised score histogram by label (post-processing of the
    fairness release): without noise it is within the binning error of the exact AUC."""
    from agencyfl.federation.metrics import exact_metrics
    from agencyfl.vertical.job import histogram_auc, score_histogram

    rng = np.random.default_rng(3)
    y = rng.random(20_000) < 0.3
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1, len(y)) + 1.5 * y)))
    exact = exact_metrics(scores, y.astype(int)).auc
    counts = score_histogram(scores, y.astype(int))
    assert counts.sum() == len(y) and counts[1].sum() == y.sum()
    binned = histogram_auc(counts)
    assert binned is not None and abs(binned - exact) < 0.02
    noised = histogram_auc(counts + rng.normal(0, 10.0, size=counts.shape))
    assert noised is not None and abs(noised - exact) < 0.03  # thousands per bin: the noise barely moves it
    assert histogram_auc(np.zeros((2, 10))) is None  # nothing left to rank


def test_a_relay_cannot_hand_a_party_another_iterations_partial_scores_or_residuals(run: VerticalResult) -> None:
    """Partial scores and residuals are sealed for their iteration: a coordinator replaying an earlier one (to
    steer training with stale values) is refused by the party that opens them."""
    from agencyfl.federation.errors import MessageRejectedError
    from agencyfl.vertical.protocol import FeatureHolder, LabelHolder

    civil = run.parties["civil-affairs"]
    holders = [run.parties[a] for a in FEATURES]
    assert isinstance(civil, LabelHolder) and all(isinstance(h, FeatureHolder) for h in holders)
    earlier = {h.name: h.partial_scores(1) for h in holders}  # type: ignore[union-attr]
    with pytest.raises(MessageRejectedError, match="step-1"):
        civil.residuals(earlier, 2)
    own, sealed = civil.residuals({h.name: h.partial_scores(2) for h in holders}, 2)  # type: ignore[union-attr]
    first = holders[0]
    assert isinstance(first, FeatureHolder)
    with pytest.raises(MessageRejectedError, match="step-2"):
        first.open_residuals(sealed[first.name], 3)
    assert len(first.open_residuals(sealed[first.name], 2)) == len(own)  # the same iteration opens


def test_a_block_refuses_positions_outside_the_register_or_repeated() -> None:
    values = np.ones((3, 2))
    placed = place_block("tax", ["a", "b"], values, np.array([4, 0, 2]), 5)
    assert placed.held.tolist() == [True, False, True, False, True] and placed.x[1, -1] == 1.0
    with pytest.raises(ValueError, match="repeats"):
        place_block("tax", ["a", "b"], values, np.array([4, 0, 4]), 5)
    with pytest.raises(ValueError, match="0..4"):
        place_block("tax", ["a", "b"], values, np.array([4, 0, 5]), 5)
    with pytest.raises(ValueError, match="2 inputs"):
        place_block("tax", ["a", "b"], np.ones((3, 3)), np.array([4, 0, 2]), 5)


@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_a_block_scores_and_explains_without_its_matrix(monkeypatch: pytest.MonkeyPatch, clip: float) -> None:
    """Scoring reads each held row where it sits (no register-sized matrix): the same as ``x @ w`` and ``x[p]``,
    rows above the clip bound and below it, the not-held positions, rows in any order, float32 inputs."""
    import agencyfl.vertical.encoding as encoding

    monkeypatch.setattr(encoding, "CLIP", clip)
    rng = np.random.default_rng(3)
    size = 200_000  # more rows than one scoring slice
    positions = rng.permutation(size)[: size - 37]
    values = rng.normal(size=(len(positions), 4)) * rng.choice([0.01, 0.3, 3.0], size=(len(positions), 1))
    block = place_block("tax", ["a", "b", "c", "d"], values.astype(np.float32), positions, size)
    w = rng.normal(size=5)
    np.testing.assert_allclose(block.scores(w), block.x @ w, rtol=1e-12, atol=1e-12)
    assert np.abs(block.x).sum(axis=1).min() > 0 and np.linalg.norm(block.x, axis=1).max() <= clip + 1e-12
    asked = [*rng.choice(size, 50).tolist(), int(np.flatnonzero(~block.held)[0])]
    np.testing.assert_allclose(block.inputs_at(asked), block.x[asked], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="weights"):
        block.scores(w[:-1])


def test_the_card_s_size_pools_every_noised_total_without_bias() -> None:
    """The card's n is post-processing of the fairness release: every attribute's cells and the AUC
    histogram each sum to the validation count. Their inverse-variance mean is unbiased and tighter than
    any one of them; the histogram's bins clipped at 0 (what the card used to carry) read high when most
    bins are empty, as on a small validation split."""
    from agencyfl.federation.fairness import Layout, household_totals, pooled_total

    lay = Layout({"region": ["a", "b", "unknown"]}, None)
    exact = np.zeros(lay.size)
    exact[: 4 * 2] = [20, 5, 10, 100, 10, 3, 7, 50]  # 205 households in groups a and b; none unknown
    histogram = np.zeros((2, 10))
    histogram[0, 0], histogram[1, 9] = 165, 40  # most bins empty
    rng = np.random.default_rng(11)
    pooled, clipped = [], []
    for _ in range(4000):
        noisy, noised_hist = exact + rng.normal(0, 10, exact.shape), histogram + rng.normal(0, 10, histogram.shape)
        pooled.append(pooled_total([*household_totals(noisy, lay), (float(noised_hist.sum()), noised_hist.size)]))
        clipped.append(float(np.clip(noised_hist, 0, None).sum()))
    assert abs(np.mean(pooled) - 205) < 1.5  # unbiased (its std over 4,000 draws is about 0.2)
    assert np.std(pooled) < 10 * np.sqrt(12) * 0.8  # tighter than region's 12 cells alone (34.6)
    assert np.mean(clipped) - 205 > 40  # the old figure: about 18 empty bins x 10 x 0.4 high


def test_a_party_s_id_column_reads_as_alignment_numbered_its_rows(tmp_path: Any) -> None:
    """The fast column reader gives exactly what alignment's row-by-row reader gives: blank lines are rows,
    values as written (spaces, quotes), short rows empty, quoted commas and newlines kept."""
    from pathlib import Path

    from agencyfl.alignment.runs import read_ids
    from agencyfl.federation.errors import DataFileError
    from agencyfl.federation.table import read_plain_csv
    from agencyfl.vertical.encoding import _column

    cases = {
        "first": 'id,name,x\n 01 ,"a, b",1\n\n02,"multi\nline",2\n03\n"04",,3\n05,x,4,extra\n  \n06,"q""uote",5\n',
        "second": 'name,id,x\na,01,1\nb\n\n"c,d", 02 ,3\ne,"0""3",4,5,6\nf,,7\n',
        "crlf": "id,x\r\n01,1\r\n02,2\r\n\r\n03,3\r\n",
        # plain files (no quote character), which Arrow reads; the blank lines and short rows go to pandas
        "plain": "x,id\n1, 01 \n2,02\n3,\n4,é中\n",
        "plain-crlf": "id,x\r\n01,1\r\n02,2\r\n",
        "plain-blank-end": "id,x\n01,1\n02,2\n\n",
        "plain-blank-inside": "id,x\n01,1\n\n02,2\n",
        "plain-short": "id,x\n01\n02,2\n",
        "plain-spaces-line": "id,x\n01,1\n   \n02,2\n",
    }
    for name, text in cases.items():
        path = Path(tmp_path) / f"{name}.csv"
        path.write_text(text, encoding="utf-8")
        assert list(_column(str(path), 0, len(text), "id")) == list(read_ids(path, "id")), name
    assert read_plain_csv(Path(tmp_path) / "plain.csv", ["id"], blank_lines_are_rows=True) is not None
    fast = read_plain_csv(Path(tmp_path) / "plain-blank-end.csv", ["id"], blank_lines_are_rows=True)
    assert fast is None or fast.column(0).to_pylist() == list(read_ids(Path(tmp_path) / "plain-blank-end.csv", "id"))
    latin = Path(tmp_path) / "latin.csv"
    latin.write_bytes("id,x\n\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataFileError, match="not a UTF-8"):  # what alignment says, through the same reader
        _column(str(latin), 0, 0, "id")
