"""The two spec kinds, told apart by ``federation.topology``: horizontal and vertical (with ``[alignment]``)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from agencyfl.federation.errors import SpecError
from agencyfl.federation.spec._base import _NAME, _FieldError, _Frozen, _repeats
from agencyfl.federation.spec.sections import (
    AgencySection,
    DuplicatesSection,
    EvaluationSection,
    FairnessSection,
    Feature,
    FederationSection,
    ModelSection,
    PrivacySection,
    RosterSection,
    SchemaSection,
    SecureAggregationSection,
    TrainingSection,
)


class VerticalAgencySection(AgencySection):
    """One agency of a vertical federation and the columns it holds.

    ``features`` names the schema features in its file (disjoint from every other agency's; together
    the agencies hold every feature exactly once). ``label = true`` marks the one agency that holds the
    schema's label; in the eligibility use it is civil affairs, which also holds the household register.

    ``explain`` is the agency's own choice of what it discloses for households on a screening's worklist
    (``docs/screening.md``): ``none`` (default), ``agency`` (its own contribution to the score) or
    ``feature`` (its inputs that moved the score most, with plain labels); ``explain_max`` caps the share
    of the register it will explain in one screening (a request for more is refused).

    ``max_rows`` (optional) is the most rows the agency may put into alignment, e.g. its declared row
    count: each row is one membership test against the register, so civil affairs refuses a longer
    query before decrypting it (``docs/alignment.md``, "What a party that lies can do").
    """

    features: Annotated[list[Annotated[str, Field(pattern=_NAME)]], Field(min_length=1)]
    label: bool = False
    max_rows: Annotated[int, Field(ge=1)] | None = None
    explain: Literal["none", "agency", "feature"] = "none"
    explain_max: Annotated[float, Field(gt=0.0, le=1.0)] = 0.25

    @field_validator("features")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = _repeats(value)
        if dupes:
            raise ValueError(f"features repeat {dupes!r}")
        return value


class AlignmentSection(_Frozen):
    """How the parties of a vertical federation find the households they have in common.

    Every party reads ``id_column`` of its file and normalizes it as ``id_format`` says (``gb11643``:
    18-character resident identity numbers, ``agencyfl.federation.resident_id``; a number whose check
    character is wrong is quarantined, never matched). ``salt`` (hex, at least 16 bytes) separates this
    federation's domain: it is hashed with every id, so the same person gives unrelated values in
    another federation. It is a public parameter, not a key (the blinding keys are each party's own).
    Alignment outputs are kept ``retention_days`` days (``agencyfl alignment purge`` deletes them
    after); blinding keys are drawn per run and never written. ``batch_size`` ids travel per message
    (default 65536).
    """

    id_column: Annotated[str, Field(pattern=_NAME)] = "head_id"
    id_format: Literal["gb11643"] = "gb11643"
    salt: str
    retention_days: Annotated[int, Field(gt=0, le=3650)]
    batch_size: Annotated[int, Field(ge=1, le=1_048_576)] = 65536

    @field_validator("salt")
    @classmethod
    def _salt(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]*", value) or len(value) % 2:
            raise ValueError(
                "salt must be hex digits, two per byte (draw one with `python -c "
                "'import secrets; print(secrets.token_hex(32))'`)"
            )
        if len(value) < 32:
            raise ValueError(f"salt must be at least 16 bytes (32 hex digits); it has {len(value) // 2}")
        if len({value[i : i + 2].lower() for i in range(0, len(value), 2)}) == 1:
            raise ValueError("salt is one byte repeated, a placeholder: draw it at random")
        return value.lower()


class _SpecBase(_Frozen):
    """The sections both topologies share, and the checks across them."""

    federation: FederationSection
    schema_: Annotated[SchemaSection, Field(alias="schema")]
    model: ModelSection = Field(default_factory=ModelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    privacy: PrivacySection
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    fairness: FairnessSection | None = None
    rosters: list[RosterSection] = Field(default_factory=list)
    duplicates: DuplicatesSection | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @property
    def schema(self) -> SchemaSection:  # type: ignore[override]
        """The table schema (``schema`` is a BaseModel attribute, hence the alias)."""
        return self.schema_

    def roster(self, name: str) -> RosterSection:
        """The roster called ``name``; raises SpecError naming the known rosters."""
        for roster in self.rosters:
            if roster.name == name:
                return roster
        known = ", ".join(r.name for r in self.rosters) or "none"
        raise SpecError(f"roster {name!r} is not in the spec (known: {known})")

    def _check_fairness(self) -> None:
        if self.fairness is not None:
            known = {f.name: f.type for f in self.schema_.features}
            for name in self.fairness.attributes:
                if name not in known:
                    raise ValueError(f"fairness attribute {name!r} is not a schema feature")
                if known[name] == "numeric" and name not in self.fairness.bands:
                    raise ValueError(f"fairness attribute {name!r} is numeric: give its bands, e.g. {name} = [40, 65]")
                if known[name] != "numeric" and name in self.fairness.bands:
                    raise ValueError(f"fairness attribute {name!r} is {known[name]}: it takes no bands")

    def _check_rosters(self) -> None:
        dupes = _repeats([r.name for r in self.rosters])
        if dupes:
            raise _FieldError("rosters", f"roster names repeat {dupes!r}")
        if self.duplicates is None:
            return
        if not self.rosters:
            raise _FieldError("duplicates", "[duplicates] needs the [[rosters]] it checks; there are none")
        programmes = {r.programme for r in self.rosters}
        for i, pair in enumerate(self.duplicates.exclusive):
            unknown = [p for p in pair if p not in programmes]
            if unknown:
                raise _FieldError(
                    f"duplicates.exclusive.{i}",
                    f"programme {unknown[0]!r} has no roster (rosters cover {sorted(programmes)!r})",
                )


class FederationSpec(_SpecBase):
    """A horizontal spec: every agency holds the schema's columns for its own households."""

    secure_aggregation: SecureAggregationSection = Field(default_factory=SecureAggregationSection)
    agencies: Annotated[list[AgencySection], Field(min_length=1)]

    @model_validator(mode="after")
    def _distinct_agencies(self) -> FederationSpec:
        if self.federation.topology != "horizontal":
            raise _FieldError(
                "federation.topology",
                f"this spec is read as horizontal, its topology is {self.federation.topology!r}",
            )
        names = [a.name for a in self.agencies]
        dupes = _repeats(names)
        if dupes:
            raise ValueError(f"agency names repeat {dupes!r}")
        if self.training.damping is not None:
            raise _FieldError(
                "training.damping", "is vertical block Newton's; a horizontal federation trains by DP-SGD"
            )
        if self.training.min_agencies > len(self.agencies):
            raise ValueError(
                f"training.min_agencies ({self.training.min_agencies!r}) exceeds the number of "
                f"agencies ({len(self.agencies)})"
            )
        if self.secure_aggregation.enabled and self.training.min_agencies < min(3, len(self.agencies)):
            if "min_agencies" in self.training.model_fields_set:
                raise ValueError(
                    f"training.min_agencies ({self.training.min_agencies!r}) must be at least 3 with secure "
                    "aggregation: the sum of one update is that update, and of two, each agency can subtract its own"
                )
            # not set: with secure aggregation the default is 3 (agencies also refuse to unmask fewer)
            training = self.training.model_copy(update={"min_agencies": 3})
            spec = self.model_copy(update={"training": training})
            spec._check_fairness()
            spec._check_rosters()
            return spec
        self._check_fairness()
        self._check_rosters()
        return self

    def agency(self, name: str) -> AgencySection:
        """The agency called ``name``; raises SpecError naming the known agencies."""
        for agency in self.agencies:
            if agency.name == name:
                return agency
        known = ", ".join(a.name for a in self.agencies)
        raise SpecError(f"agency {name!r} is not in the spec (known: {known})")


class VerticalFederationSpec(_SpecBase):
    """A vertical spec: the agencies hold disjoint blocks of the schema's features about the same households.

    Validation refuses a feature held by two agencies or by none, a name that is not a schema feature,
    anything but exactly one ``label = true`` agency, and an ``alignment.id_column`` other than the
    schema's id (every agency's file is keyed by it). ``training.min_agencies``, if given, must be the
    number of agencies: every agency holds part of every household.
    """

    agencies: Annotated[list[VerticalAgencySection], Field(min_length=2)]
    alignment: AlignmentSection

    @model_validator(mode="after")
    def _partition(self) -> VerticalFederationSpec:
        if self.federation.topology != "vertical":
            raise _FieldError(
                "federation.topology",
                f"this spec is read as vertical, its topology is {self.federation.topology!r}",
            )
        dupes = _repeats([a.name for a in self.agencies])
        if dupes:
            raise _FieldError("agencies", f"agency names repeat {dupes!r}")
        known = [f.name for f in self.schema_.features]
        holder: dict[str, str] = {}
        for i, agency in enumerate(self.agencies):
            for name in agency.features:
                if name not in known:
                    raise _FieldError(
                        f"agencies.{i}.features", f"{name!r} (agency {agency.name!r}) is not a schema feature"
                    )
                if name in holder:
                    raise _FieldError(
                        f"agencies.{i}.features",
                        f"feature {name!r} is held by both {holder[name]!r} and {agency.name!r}: "
                        "in a vertical federation each feature has one holder",
                    )
                holder[name] = agency.name
        missing = [n for n in known if n not in holder]
        if missing:
            raise _FieldError("agencies", f"schema features {missing!r} are held by no agency: list each in one")
        labelled = [a.name for a in self.agencies if a.label]
        if len(labelled) != 1:
            got = "none has" if not labelled else f"{labelled!r} all have"
            raise _FieldError(
                "agencies",
                f"exactly one agency holds the label {self.schema_.label!r} (label = true); {got} it",
            )
        if self.alignment.id_column != self.schema_.id:
            raise _FieldError(
                "alignment.id_column",
                f"{self.alignment.id_column!r} must be the schema's id column ({self.schema_.id!r}): "
                "every agency's file is keyed by it",
            )
        if "min_agencies" in self.training.model_fields_set and self.training.min_agencies != len(self.agencies):
            raise _FieldError(
                "training.min_agencies",
                f"{self.training.min_agencies!r} is not the number of agencies ({len(self.agencies)}): "
                "in a vertical federation every agency holds part of every household",
            )
        self._check_fairness()
        self._check_rosters()
        return self

    def agency(self, name: str) -> VerticalAgencySection:
        """The agency called ``name``; raises SpecError naming the known agencies."""
        for agency in self.agencies:
            if agency.name == name:
                return agency
        known = ", ".join(a.name for a in self.agencies)
        raise SpecError(f"agency {name!r} is not in the spec (known: {known})")

    @property
    def label_agency(self) -> VerticalAgencySection:
        """The agency that holds the label (there is exactly one)."""
        return next(a for a in self.agencies if a.label)

    def feature_block(self, agency: str) -> tuple[Feature, ...]:
        """The features ``agency`` holds, in the schema's order; raises SpecError for an unknown agency."""
        held = set(self.agency(agency).features)
        return tuple(f for f in self.schema_.features if f.name in held)

    def feature_blocks(self) -> dict[str, tuple[str, ...]]:
        """Every agency's feature names (agencies in spec order, features in schema order)."""
        return {a.name: tuple(f.name for f in self.feature_block(a.name)) for a in self.agencies}

    def block_schema(self, agency: str) -> SchemaSection:
        """The schema of ``agency``'s own file: the id, the label, and only its feature block.

        Only the label agency's file carries the label: load the others with ``require_label=False``.
        """
        return SchemaSection(id=self.schema_.id, label=self.schema_.label, features=list(self.feature_block(agency)))

    def alignment_parameters(self) -> dict[str, str | int]:
        """What every party must agree on to align: the federation's name and the ``[alignment]`` section."""
        return {
            "version": "agencyfl-alignment-1",
            "federation": self.federation.name,
            **self.alignment.model_dump(),
        }

    def alignment_sha256(self) -> str:
        """SHA-256 (hex) of the canonical JSON of ``alignment_parameters``.

        Stable across key order, spacing, comments and the salt's letter case in the TOML; parties
        compare it before aligning, so mismatched parameters are refused rather than yielding an
        empty or wrong intersection.
        """
        canonical = json.dumps(self.alignment_parameters(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _topology_tag(value: Any) -> str:
    federation = value.get("federation") if isinstance(value, dict) else getattr(value, "federation", None)
    topology = federation.get("topology") if isinstance(federation, dict) else getattr(federation, "topology", None)
    # anything but "vertical" is read as horizontal, whose Literal then names a misspelt topology
    return "vertical" if topology == "vertical" else "horizontal"


AnyFederationSpec = Annotated[
    Annotated[FederationSpec, Tag("horizontal")] | Annotated[VerticalFederationSpec, Tag("vertical")],
    Discriminator(_topology_tag),
]
"""Either topology's spec, told apart by ``federation.topology`` (default horizontal)."""

_ANY_SPEC: TypeAdapter[FederationSpec | VerticalFederationSpec] = TypeAdapter(AnyFederationSpec)
