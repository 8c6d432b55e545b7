"""Issue 11 item 8, the smaller items: caps that are not numbers, secure aggregation over too few
agencies, the audit's running accountant, and the SecAgg+ participant count an agency checks itself."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from hypothesis import given, settings
from hypothesis import strategies as st

from agencyfl.clients.app import check_unmask
from agencyfl.clients.site import AgencySite
from agencyfl.federation.errors import SpecError
from agencyfl.federation.spec import load_spec, parse_spec
from agencyfl.privacy.accounting import SpendTally, StepRecord, epsilon_for
from agencyfl.synth import SynthResult


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("budget = 10.0", "budget = inf", "privacy.budget"),
        ("max_grad_norm = 1.0", "max_grad_norm = inf", "privacy.max_grad_norm"),
        ("max_grad_norm = 1.0", "max_grad_norm = nan", "privacy.max_grad_norm"),
    ],
)
def test_caps_that_are_not_finite_numbers_are_refused(small_fed: SynthResult, old: str, new: str, field: str) -> None:
    text = small_fed.spec.read_text()
    assert old in text
    with pytest.raises(SpecError, match=re.escape(field)):
        parse_spec(text.replace(old, new))


@pytest.mark.parametrize("minimum", [1, 2])
def test_secure_aggregation_over_fewer_than_three_agencies_is_refused(small_fed: SynthResult, minimum: int) -> None:
    text = small_fed.spec.read_text().replace("rounds = 3\n", f"rounds = 3\nmin_agencies = {minimum}\n")
    with pytest.raises(SpecError, match="must be at least 3 with secure aggregation"):
        parse_spec(text)
    plain = text + "\n[secure_aggregation]\nenabled = false\n"
    assert parse_spec(plain).training.min_agencies == minimum  # without masks nothing pretends otherwise
    assert parse_spec(small_fed.spec.read_text()).training.min_agencies == 3  # the default with secure aggregation


def test_an_agency_refuses_to_unmask_too_few_participants(small_fed: SynthResult, tmp_path: Path) -> None:
    loaded = load_spec(small_fed.spec)
    site = AgencySite(agency="tax", spec_path=loaded.path, data_path=loaded.data_path("tax"), home=tmp_path / "tax")

    def unmask(active: list[int], dead: list[int]) -> ConfigRecord:
        return ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})

    # a coordinator that claims two of four dropped out, to unmask the sum of the other two
    with pytest.raises(PermissionError, match="sum of 2 agencies' updates"):
        check_unmask(unmask([1, 2], [3, 4]), site)
    check_unmask(unmask([1, 2, 3], [4]), site)  # three: allowed
    check_unmask(ConfigRecord({Key.STAGE: Stage.SETUP}), site)  # other stages pass


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.8, 1.0, 5.0, 20.0]), st.sampled_from([0.02, 0.05, 1.0]), st.integers(0, 200)),
        min_size=1,
        max_size=30,
    )
)
def test_the_audits_running_accountant_equals_recomputing_every_prefix(records: list[tuple[float, float, int]]) -> None:
    # The audit adds each entry to a running RDP vector (linear) instead of recomputing every prefix
    # (quadratic); both must give the same epsilon after every entry.
    tally = SpendTally()
    steps = [StepRecord(*r) for r in records]
    for i, record in enumerate(steps):
        tally.add(record)
        assert tally.epsilon(1e-5) == pytest.approx(epsilon_for(steps[: i + 1], 1e-5), rel=1e-12, abs=1e-12)
    assert np.isfinite(tally.epsilon(1e-5))
