"""The zero guard: every gradient ciphertext at one level, and nothing a household could move.

A column that is zero in a whole ciphertext's chunk would give TenSEAL's product a fresh level (its size would
tell the arbiter the column was zero there), so every chunk carries ``ZERO_GUARD``; it sits in the chunk's
reserved slot, where every residual and Hessian weight is 0 whatever the data. Until 2026-12-05 it sat at the
first household of an all-zero chunk, which neighbouring datasets placed differently (docs/vertical.md)."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from agencyfl.alignment.sealed import PartyKeys
from agencyfl.vertical import Block, LabelData
from agencyfl.vertical.protocol import (
    ZERO_GUARD,
    Arbiter,
    FeatureHolder,
    HolderSetup,
    LabelHolder,
    _chunks,
    chunk_count,
    slot_positions,
)

RESIDUAL = 1000.0  # large, so that a guard at a household's slot would show: 2^-20 x 1000 = 9.5e-4 per chunk
CKKS = 5e-4  # the CKKS error of these totals (measured about 1e-4 at 1000 per slot), and a relative 1e-6


def _holder(x: np.ndarray, arbiter: Arbiter) -> FeatureHolder:
    n = len(x)
    block = Block(
        agency="tax", names=("a", "b", "not_held"), held=np.ones(n, dtype=bool), rows=np.zeros((n, 2)),
        positions=np.arange(n, dtype=np.int64),
    ).with_inputs(x)  # fmt: skip
    keys = {name: PartyKeys.generate(name) for name in ("tax", "civil-affairs")}
    setup = HolderSetup(
        keys=keys["tax"], directory={k: v.public() for k, v in keys.items()}, run="guard",
        public_context=arbiter.public_context(), label_holder="civil-affairs", optimizer="gd", learning_rate=1.0,
    )  # fmt: skip
    return FeatureHolder(block, setup, np.random.default_rng(3))


@pytest.fixture(scope="module")
def arbiter() -> Arbiter:
    return Arbiter({"tax": 3}, 0.0, np.random.default_rng(0))


def _inputs(arbiter: Arbiter, one: int | None) -> np.ndarray:
    """Three chunks' worth of households: column a is zero except at household ``one`` (None: everywhere),
    column b zero everywhere, not_held 0.5 everywhere."""
    n = 2 * (arbiter.params.slots - 1) + 5
    x = np.zeros((n, 3))
    x[:, 2] = 0.5
    if one is not None:
        x[one, 0] = 0.8
    return x


def _encrypted(arbiter: Arbiter, values: np.ndarray) -> list[bytes]:
    """Per-household values in the protocol's layout, under the arbiter's key (the label holder's part)."""
    return [bytes(ts.ckks_vector(arbiter._context, c).serialize()) for c in _chunks(values, arbiter.params.slots)]


def test_the_layout_reserves_one_slot_per_ciphertext() -> None:
    slots = 8
    positions = slot_positions(15, slots)
    assert chunk_count(15, slots) == 3 and chunk_count(14, slots) == 2 and chunk_count(0, slots) == 0
    assert list(positions[:8]) == [0, 1, 2, 3, 4, 5, 6, 8]  # slot 7 is the first ciphertext's reserved one
    laid = _chunks(np.arange(1.0, 16.0), slots)
    assert [c[-1] for c in laid] == [0.0, 0.0, 0.0] and sorted(np.concatenate(laid))[-15:] == list(range(1, 16))


@pytest.mark.parametrize("one", [None, 3, 4200])
def test_a_gradient_is_x_t_d_exactly_and_every_ciphertext_sits_at_one_level(arbiter: Arbiter, one: int | None) -> None:
    """Column b is zero in every chunk and column a in all but (at most) one: the ciphertexts are the size of
    any other, and the release is X^T d with no guard in it, even where d is large everywhere."""
    x = _inputs(arbiter, one)
    holder = _holder(x, arbiter)
    d = np.full(len(x), RESIDUAL)
    message = holder.masked_gradient(_encrypted(arbiter, d))
    sizes = [len(c) for c in message.ciphertexts]  # compressed: a fresh level is 41% larger, not a few bytes
    assert max(sizes) < 1.01 * min(sizes)
    released = np.asarray(holder.apply(arbiter.release(message)))
    assert released == pytest.approx(x.T @ d, rel=1e-6, abs=CKKS)
    assert abs(released[1]) < CKKS  # a guard at each chunk's first household would add 2.9e-3


def test_neighbouring_datasets_differ_by_the_household_s_own_row_alone(arbiter: Arbiter) -> None:
    """Remove the only household with a value in column a (a rare category): its chunk's column turns all-zero,
    and every later household moves up one position; the release moves by that household's x d and nothing
    else."""
    x = _inputs(arbiter, 4200)
    d = RESIDUAL * np.linspace(1.0, 2.0, len(x))
    with_it = _holder(x, arbiter)
    before = np.asarray(with_it.apply(arbiter.release(with_it.masked_gradient(_encrypted(arbiter, d)))))
    keep = np.arange(len(x)) != 4200
    without = _holder(x[keep], arbiter)
    after = np.asarray(without.apply(arbiter.release(without.masked_gradient(_encrypted(arbiter, d[keep])))))
    assert before - after == pytest.approx(x[4200] * d[4200], rel=1e-6, abs=CKKS)


def test_the_hessian_s_pair_products_carry_no_guard(arbiter: Arbiter) -> None:
    """The same for the Hessian's pair columns (x_j x_l against Enc(m c / 4)): a pair that is zero everywhere
    totals 0 however large the weights."""
    x = _inputs(arbiter, None)
    holder = _holder(x, arbiter)
    weights = [ts.ckks_vector_from(holder.context, c) for c in _encrypted(arbiter, np.full(len(x), RESIDUAL))]
    products = holder._pair_products(weights)  # pairs (a,a) (a,b) (a,nh) (b,b) (b,nh) (nh,nh)
    totals = [sum(ts.ckks_vector_from(arbiter._context, p.serialize()).decrypt()) for p in products]
    assert totals[3] == pytest.approx(0.0, abs=CKKS)
    assert totals[5] == pytest.approx(0.25 * RESIDUAL * len(x), rel=1e-6)
    assert ZERO_GUARD > 0  # the guard is there (every product at one level), only where it multiplies 0


def test_civil_affairs_ciphertexts_tell_nobody_which_chunks_hold_trained_or_held_out_households(
    arbiter: Arbiter,
) -> None:
    """The residual multiplies Enc(z) by m c / 4 and the validation scores by the held-out indicator: with a
    chunk holding nobody trained on (or nobody held out) those plaintexts are zero there, and a product with
    zeros would come out at another level (its size telling the relay and the recipient agency who is
    trained on, and the arbiter who is held out). The guard in the reserved slot keeps every ciphertext at
    one level, and the values stay the exact ones."""
    slots = arbiter.params.slots
    n = slots + 3  # the second chunk holds 4 households, none trained on and none held out
    keys = {"civil-affairs": PartyKeys.generate("civil-affairs")}
    setup = HolderSetup(
        keys=keys["civil-affairs"], directory={"civil-affairs": keys["civil-affairs"].public()}, run="guard",
        public_context=arbiter.public_context(), label_holder="civil-affairs",
    )  # fmt: skip
    x = np.zeros((n, 2))
    x[:, 0] = np.linspace(-0.5, 0.5, n)
    block = Block(
        agency="civil-affairs", names=("a", "not_held"), held=np.ones(n, dtype=bool), rows=np.zeros((n, 1)),
        positions=np.arange(n, dtype=np.int64),
    ).with_inputs(x)  # fmt: skip
    assessed = np.zeros(n, dtype=bool)
    assessed[:100] = True
    validation = np.zeros(n, dtype=bool)
    validation[:10] = True
    y = (np.arange(n) % 2).astype(np.float64) * assessed
    civil = LabelHolder(block, LabelData(y, assessed, validation), setup, np.random.default_rng(5))
    civil.weights = np.array([1.0, 0.0, 0.25])  # z = x_a + 0.25
    residual = civil.residual()
    sizes = [len(r) for r in residual]
    assert len(sizes) == 2 and max(sizes) < 1.01 * min(sizes)
    d = np.concatenate([ts.ckks_vector_from(arbiter._context, r).decrypt() for r in residual])
    z = x[:, 0] + 0.25
    m = assessed & ~validation
    expected = m * (0.5 + z / 4 - y) / n
    np.testing.assert_allclose(d[slot_positions(n, slots)], expected, atol=1e-7)
    assert abs(d[slots - 1]) < 1e-7  # the reserved slot: 0 whatever the data
    masked = civil.masked_scores({}, 1)
    sizes = [len(r) for r in masked]
    assert len(sizes) == 4 and max(sizes) < 1.01 * min(sizes)
    scores = civil.unmask_scores(arbiter.decrypt_masked_scores("civil-affairs", masked))
    np.testing.assert_allclose(scores, z[validation], atol=1e-4)
