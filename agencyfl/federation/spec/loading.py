"""Reading a spec file: TOML, validation with every error naming its field, and where the data lives."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from agencyfl.federation.errors import SpecError
from agencyfl.federation.spec._base import _FieldError
from agencyfl.federation.spec.topologies import _ANY_SPEC, FederationSpec, VerticalFederationSpec, _topology_tag


def _resolve(spec_path: Path, raw: str) -> Path:
    path = Path(raw)
    return path if path.is_absolute() else (spec_path.parent / path).resolve()


SpecT = TypeVar("SpecT", FederationSpec, VerticalFederationSpec)


class _Loaded(BaseModel, Generic[SpecT]):
    """A validated spec with where it came from and the hash of its text (model cards cite it)."""

    model_config = ConfigDict(frozen=True)

    spec: SpecT
    path: Path
    text: str
    sha256: str

    def data_path(self, agency: str) -> Path:
        """Absolute path of an agency's data file (relative paths are taken from the spec's folder)."""
        return _resolve(self.path, self.spec.agency(agency).data)

    def roster_path(self, name: str) -> Path:
        """Absolute path of a roster's file (relative paths are taken from the spec's folder)."""
        return _resolve(self.path, self.spec.roster(name).data)


class LoadedSpec(_Loaded[FederationSpec]):
    """A validated horizontal spec, with its path, text and SHA-256."""


class LoadedVerticalSpec(_Loaded[VerticalFederationSpec]):
    """A validated vertical spec, with its path, text and SHA-256."""


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = item["loc"]
        if loc and loc[0] in ("horizontal", "vertical"):  # the tag of AnyFederationSpec
            loc = loc[1:]
        where = ".".join(str(p) for p in loc if not str(p).startswith("function-after"))
        where = re.sub(r"\.(numeric|categorical|boolean)\b", "", where).replace("schema_", "schema")
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            where = cause.where
        bad = item.get("input")
        got = "" if isinstance(bad, dict) else f" (got {bad!r})"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where or '<top>'}: {message}{got}")
    return "; ".join(lines)


def _read_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML: {exc}") from exc


def parse_spec(text: str, source: str = "<spec>") -> FederationSpec:
    """Parse and validate the text of a horizontal spec (what today's training and scoring run).

    Raises
    ------
    SpecError
        On TOML syntax errors or invalid fields (the message names the field and quotes the value),
        and for a vertical spec, which these commands do not run (read it with ``parse_any_spec``).
    """
    raw = _read_toml(text, source)
    if _topology_tag(raw) == "vertical":
        raise SpecError(
            f"{source}: federation.topology: 'vertical' (agencies holding different features of the same "
            "households) is not supported by horizontal commands (got 'vertical')"
        )
    try:
        return FederationSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{source}: {_format_errors(exc)}") from exc


def parse_any_spec(text: str, source: str = "<spec>") -> FederationSpec | VerticalFederationSpec:
    """Parse and validate spec text of either topology (``federation.topology``, default horizontal).

    Raises
    ------
    SpecError
        On TOML syntax errors or invalid fields; the message names the field and quotes the value.
    """
    raw = _read_toml(text, source)
    try:
        return _ANY_SPEC.validate_python(raw)
    except ValidationError as exc:
        raise SpecError(f"{source}: {_format_errors(exc)}") from exc


def _read_spec_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec {str(path)!r}: {exc.__class__.__name__}: {exc}") from exc


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate the horizontal spec file at ``path``.

    Raises
    ------
    SpecError
        If the file cannot be read or does not validate, or it is a vertical spec (see ``load_any_spec``).
    """
    path = Path(path).resolve()
    text = _read_spec_text(path)
    spec = parse_spec(text, source=str(path))
    return LoadedSpec(spec=spec, path=path, text=text, sha256=hashlib.sha256(text.encode()).hexdigest())


def load_any_spec(path: str | Path) -> LoadedSpec | LoadedVerticalSpec:
    """Read and validate the spec file at ``path``, of either topology.

    Raises
    ------
    SpecError
        If the file cannot be read or does not validate.
    """
    path = Path(path).resolve()
    text = _read_spec_text(path)
    spec = parse_any_spec(text, source=str(path))
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    if isinstance(spec, VerticalFederationSpec):
        return LoadedVerticalSpec(spec=spec, path=path, text=text, sha256=sha256)
    return LoadedSpec(spec=spec, path=path, text=text, sha256=sha256)
