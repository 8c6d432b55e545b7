"""The model registry: each trained model saved with its model card, versioned per federation.

Layout: ``ROOT/<federation>/v0001/`` holding ``model.npz`` (weights in ``state_dict`` order),
``card.json`` (the model card) and ``spec.toml`` (the exact spec text the model was trained under).
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.errors import ModelError
from agencyfl.federation.spec import LoadedSpec, parse_spec
from agencyfl.server.model_card import ModelCard, render_html, render_markdown

MODEL_FILE, CARD_FILE, SPEC_FILE = "model.npz", "card.json", "spec.toml"
CARD_MD, CARD_HTML = "card.md", "card.html"  # the card for people, rendered from card.json


def code_version() -> str:
    """agencyfl's version, with the git commit when run from a checkout."""
    from agencyfl import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def next_version_folder(base: Path) -> Path:
    """Create and return ``base/vNNNN``, the next free version (two registrations never share one)."""
    base.mkdir(parents=True, exist_ok=True)
    version = len([p for p in base.iterdir() if p.is_dir() and p.name.startswith("v")]) + 1
    while True:
        target = base / f"v{version:04d}"
        try:
            target.mkdir()
            return target
        except FileExistsError:
            version += 1


def register_model(root: Path, loaded: LoadedSpec, arrays: list[np.ndarray], card: ModelCard) -> Path:
    """Save a model under the next free version of its federation; returns the version folder.

    The registry fills the card's version, spec, inputs, creation time and code version.
    """
    target = next_version_folder(Path(root) / loaded.spec.federation.name)
    np.savez(target / MODEL_FILE, *arrays)
    (target / SPEC_FILE).write_text(loaded.text, encoding="utf-8")
    full = card.model_copy(
        update={
            "model_version": f"{loaded.spec.federation.name}/{target.name}",
            "federation": loaded.spec.federation.name,
            "purpose": loaded.spec.federation.purpose,
            "spec_sha256": loaded.sha256,
            "model": loaded.spec.model.model_dump(),
            "inputs": FeatureEncoder(loaded.spec.schema).names,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": code_version(),
        }
    )
    write_card(target, full)
    return target


def write_card(target: Path, card: ModelCard) -> None:
    """The card in a registry folder: ``card.json`` and, for people, ``card.md`` and ``card.html``."""
    (target / CARD_FILE).write_text(json.dumps(card.as_json(), indent=2), encoding="utf-8")
    (target / CARD_MD).write_text(render_markdown(card), encoding="utf-8")
    (target / CARD_HTML).write_text(render_html(card), encoding="utf-8")


class RegisteredModel:
    """A model loaded from a registry folder, with its card and the spec it was trained under."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.card = ModelCard.model_validate_json((self.directory / CARD_FILE).read_text())
            spec_text = (self.directory / SPEC_FILE).read_text()
            with np.load(self.directory / MODEL_FILE) as npz:
                arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(map(str, problem["loc"]))
            raise ModelError(
                f"{str(self.directory)!r}: card.json is not a model card ({where}: {problem['msg']})"
            ) from None
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{str(self.directory)!r} is not a registered model: {exc}") from exc
        # torch only for a horizontal model's weights: the registry's other readers (a vertical job's
        # parties, screening) would each pay its 2.6 s import
        from agencyfl.federation.model import build_model, model_from_arrays

        self.spec = parse_spec(spec_text, source=str(self.directory / SPEC_FILE))
        self.encoder = FeatureEncoder(self.spec.schema)
        self.model = build_model(self.spec.model, self.encoder.width)
        try:
            model_from_arrays(self.model, arrays)
        except ValueError as exc:
            raise ModelError(f"{str(self.directory)!r}: weights do not fit the model: {exc}") from exc


def checkpoint_dir(root: Path, federation: str, job: str) -> Path:
    """Where a job's per-round checkpoints live: ``ROOT/<federation>/checkpoints/<job>/``."""
    return Path(root) / federation / "checkpoints" / job


def save_checkpoint(directory: Path, job_round: int, weights: list[np.ndarray], velocity: list[np.ndarray]) -> Path:
    """Save the global model and server-momentum buffer after ``job_round`` (written whole, then renamed)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"round-{job_round:04d}.npz"
    partial = target.with_suffix(".partial.npz")
    np.savez(partial, *weights, *velocity)
    partial.replace(target)  # a crash mid-write never leaves a torn checkpoint behind
    return target


def latest_checkpoint(directory: Path) -> tuple[int, list[np.ndarray], list[np.ndarray]] | None:
    """The last complete checkpoint as (round, weights, velocity), or None if there is none."""
    files = sorted(directory.glob("round-[0-9][0-9][0-9][0-9].npz"))
    if not files:
        return None
    with np.load(files[-1]) as npz:
        arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    half = len(arrays) // 2
    return int(files[-1].stem.split("-")[1]), arrays[:half], arrays[half:]


def list_models(root: Path) -> list[dict[str, Any]]:
    """Every registered model's card under ``root`` (all federations), oldest version first."""
    cards = []
    for card_path in sorted(Path(root).glob(f"*/v[0-9]*/{CARD_FILE}")):
        try:
            card: dict[str, Any] = json.loads(card_path.read_text())
        except (OSError, ValueError):
            continue
        cards.append({**card, "directory": str(card_path.parent)})
    return cards
