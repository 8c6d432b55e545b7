"""docker/ checked without a Docker engine: hadolint on every Dockerfile, the compose schema on compose.yaml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it is in the dev extra)")
    return found


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("Dockerfile.*")))
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    done = subprocess.run([tool("hadolint"), str(DOCKER / dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_is_valid_and_the_check_can_fail(tmp_path: Path) -> None:
    check = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run([*check, str(DOCKER / "compose.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (DOCKER / "compose.yaml").read_text()
    for service in ["coordinator", "civil-affairs", "hrss", "tax", "environment", "scoring"]:
        assert f"\n  {service}:\n" in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace("    restart: unless-stopped", "    restrat: unless-stopped", 1))
    assert subprocess.run([*check, str(broken)], capture_output=True).returncode != 0


def test_every_dockerfile_is_used() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    for name in ["Dockerfile.coordinator", "Dockerfile.agency", "Dockerfile.scoring"]:
        assert f"docker/{name}" in text
