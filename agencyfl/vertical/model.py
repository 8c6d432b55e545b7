"""A registered vertical model: the coordinator's manifest and card, each agency's part in its own folder.

No party holds the whole model in clear. ``register_vertical`` writes each agency's block into that
agency's folder (``WORKDIR/<agency>/model/<version>/weights.npy``, 0600) and the coordinator's registry
entry (``WORKDIR/registry/<federation>/<version>/``): ``manifest.json`` (each part's holder, input
names and SHA-256, never weights), ``card.json`` / ``card.md`` / ``card.html`` and the spec text.
An agency uses its part only when the part's hash matches the manifest (``load_part``): a crafted
manifest or swapped weights are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, ValidationError

from agencyfl.federation.errors import ModelError
from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
from agencyfl.server.model_card import ModelCard
from agencyfl.server.registry import CARD_FILE, SPEC_FILE, code_version, next_version_folder, write_card

MANIFEST_FILE = "manifest.json"
INTERCEPT = "intercept"


class ModelPart(BaseModel):
    """One agency's block of a vertical model, as the manifest describes it (no weights)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    holder: str
    path: str  # relative to the holder's own folder
    inputs: list[str]
    sha256: str


class VerticalManifest(BaseModel):
    """Which agency holds which part of a vertical model, and each part's hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_version: str
    federation: str
    label_holder: str
    parts: dict[str, ModelPart]
    score_clip: float | None = None
    """Each holder clips its own part's score to [-C, C] (``VerticalPlan.score_clip``): the model's function,
    applied wherever it scores. None: not clipped (models registered before 2026-12-05)."""

    def sha256(self) -> str:
        """SHA-256 of the canonical manifest: the model's identity (the card's ``model_sha256``; an unclipped
        model's hash is the one it had before ``score_clip`` existed)."""
        canonical = json.dumps(self.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _digest(weights: npt.NDArray[np.float64]) -> str:
    return hashlib.sha256(np.ascontiguousarray(weights, dtype="<f8").tobytes()).hexdigest()


def save_part(folder: Path, version: str, weights: npt.NDArray[np.float64]) -> tuple[str, str]:
    """An agency's part written in its own folder (``model/<version>/weights.npy``, 0600); returns the path
    relative to that folder and the part's SHA-256 (what the manifest records).

    Raises
    ------
    ModelError
        If that version's part exists already: a registered part is never rewritten.
    """
    relative = Path("model") / version / "weights.npy"
    target = folder / relative.parent
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(target / "weights.npy", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ModelError(f"{folder.name} already holds a part of {version}: it is never rewritten") from None
    with open(fd, "wb") as fh:
        np.save(fh, np.asarray(weights, dtype=np.float64))
    return str(relative), _digest(weights)


def new_version(workdir: Path, loaded: LoadedVerticalSpec) -> Path:
    """The registry folder of the next model version (made now; ``register_parts`` fills it)."""
    return next_version_folder(workdir / "registry" / loaded.spec.federation.name)


def register_vertical(
    workdir: Path,
    loaded: LoadedVerticalSpec,
    weights: dict[str, npt.NDArray[np.float64]],
    inputs: dict[str, list[str]],
    card: ModelCard,
    score_clip: float | None,
) -> Path:
    """Save each agency's part in its own folder, the manifest and card in the registry; returns the version folder."""
    target = new_version(workdir, loaded)
    parts = {}
    for agency, block in weights.items():
        path, digest = save_part(workdir / agency, target.name, block)
        parts[agency] = ModelPart(holder=agency, path=path, inputs=inputs[agency], sha256=digest)
    return register_parts(target, loaded, parts, card, score_clip)


def register_parts(
    target: Path, loaded: LoadedVerticalSpec, parts: dict[str, ModelPart], card: ModelCard, score_clip: float | None
) -> Path:
    """Write the manifest (each part's holder, path, inputs, SHA-256, the parts' score clip; never weights), spec
    and card in ``target``."""
    spec = loaded.spec
    version = f"{spec.federation.name}/{target.name}"
    manifest = VerticalManifest(
        model_version=version, federation=spec.federation.name, label_holder=spec.label_agency.name, parts=parts,
        score_clip=score_clip,
    )  # fmt: skip
    (target / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(exclude_none=True), indent=2), encoding="utf-8")
    (target / SPEC_FILE).write_text(loaded.text, encoding="utf-8")
    full = card.model_copy(
        update={
            "model_version": version,
            "federation": spec.federation.name,
            "purpose": spec.federation.purpose,
            "spec_sha256": loaded.sha256,
            "model_sha256": manifest.sha256(),
            "model": spec.model.model_dump(),
            "inputs": [f"{agency}:{name}" for agency, part in parts.items() for name in part.inputs],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": code_version(),
        }
    )
    write_card(target, full)
    return target


class RegisteredVerticalModel:
    """A vertical model's registry entry: manifest, card and spec (the weights stay with the agencies).

    Raises
    ------
    ModelError
        If the folder is not a registered vertical model (exit 8).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.manifest = VerticalManifest.model_validate_json((self.directory / MANIFEST_FILE).read_text())
            self.card = ModelCard.model_validate_json((self.directory / CARD_FILE).read_text())
        except FileNotFoundError:
            raise ModelError(
                f"{str(self.directory)!r} is not a registered vertical model (no {MANIFEST_FILE} or {CARD_FILE})"
            ) from None
        except (OSError, ValueError, ValidationError) as exc:
            raise ModelError(f"{str(self.directory)!r} is not a registered vertical model: {exc}") from None
        if self.card.model_sha256 != self.manifest.sha256():
            raise ModelError(f"{str(self.directory)!r}: the manifest does not match the card's model SHA-256")
        loaded = load_any_spec(self.directory / SPEC_FILE)
        if not isinstance(loaded, LoadedVerticalSpec):
            raise ModelError(f"{str(self.directory)!r} was not trained under a vertical spec")
        self.loaded = loaded

    @property
    def version(self) -> str:
        """``<federation>/vNNNN``."""
        return self.manifest.model_version


def load_part(workdir: Path, agency: str, manifest: VerticalManifest) -> npt.NDArray[np.float64]:
    """``agency``'s own part, read from its own folder, checked against the manifest's hash.

    Raises
    ------
    ModelError
        If the manifest names no part for ``agency``, or the part is missing or its hash differs.
    """
    part = manifest.parts.get(agency)
    if part is None:
        raise ModelError(f"model {manifest.model_version!r} has no part held by {agency!r}")
    path = workdir / agency / part.path
    try:
        weights = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{agency}: cannot read its part of {manifest.model_version!r} at {str(path)!r}: {exc}"
        ) from None
    if _digest(weights) != part.sha256 or weights.shape != (len(part.inputs),):
        raise ModelError(
            f"{agency}: its part of {manifest.model_version!r} does not match the manifest's SHA-256: "
            "refusing to score with weights it did not train"
        )
    return weights
