"""Shared fixtures: a small synthetic federation written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from agencyfl.synth import SynthResult, synthesize  # noqa: E402
from federation.spec import LoadedSpec, load_spec  # noqa: E402


@pytest.fixture(scope="session")
def small_fed(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """6,000 households, 3 rounds, 4 agencies, a few malformed rows per agency."""
    return synthesize(tmp_path_factory.mktemp("fed") / "data", households=6000, seed=3, dirty_rows=6, rounds=3)


@pytest.fixture(scope="session")
def small_spec(small_fed: SynthResult) -> LoadedSpec:
    return load_spec(small_fed.spec)


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
