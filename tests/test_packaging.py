"""The installed project is one namespace: the wheel's only top-level name is ``agencyfl``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_has_agencyfl_as_its_only_top_level_name(tmp_path: Path) -> None:
    source = tmp_path / "source"  # built from a copy: setuptools writes build/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    shutil.copytree(REPO / "agencyfl", source / "agencyfl", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, source],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("agencyfl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"agencyfl"}, f"the wheel installs more than agencyfl at the top: {sorted(top_level)}"
    declared = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(declared).decode().split() == ["agencyfl"]
    # The parts the layout names are inside it, with the gRPC stubs' type file.
    for part in ("server", "clients", "privacy", "federation"):
        assert f"agencyfl/{part}/__init__.py" in names
    assert "agencyfl/federation/proto/scoring_pb2.py" in names
