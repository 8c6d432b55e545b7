"""The federation spec: one TOML file that every party reads.

A newcomer writes it by hand; pydantic validates it and every error names the field and quotes the
bad value. Training fields have defaults tuned for DP-SGD on tabular data (see docs/benchmarks.md),
so a spec with only ``[federation]``, ``[schema]``, ``[privacy]`` and ``[[agencies]]`` trains well.

One spec, two topologies, told apart by ``federation.topology`` (a tagged union, ``AnyFederationSpec``):

- ``horizontal`` (``FederationSpec``): agencies hold the same columns about different households.
- ``vertical`` (``VerticalFederationSpec``): agencies hold different columns about the same households;
  each ``[[agencies]]`` entry lists the ``features`` it holds (disjoint, together the whole schema), one has
  ``label = true``, and ``[alignment]`` fixes how the parties find their common households.

Both share ``[federation]``, ``[schema]``, ``[model]``, ``[training]``, ``[privacy]``, ``[evaluation]``,
``[fairness]`` and the optional duplicate-benefit check (``[[rosters]]``, ``[duplicates]``).
``parse_spec``/``load_spec`` return a horizontal spec (what today's jobs run) and refuse a vertical one
clearly; ``parse_any_spec``/``load_any_spec`` return either.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from agencyfl.federation.errors import SpecError

_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _FieldError(ValueError):
    """A spec-level check's error that belongs to one field: ``where`` is that field's dotted path.

    Checks that span sections (a vertical agency's features against the schema) run after the whole
    spec is parsed, where pydantic reports no location; ``_format_errors`` puts ``where`` back.
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where


def _repeats(values: Sequence[str]) -> list[str]:
    return sorted({v for v in values if values.count(v) > 1})


class FederationSection(_Frozen):
    """Who federates and why: ``name`` identifies the federation, ``purpose`` the registered use.

    ``topology`` says who holds what: ``horizontal`` (the default) for agencies holding the same columns
    about different households, ``vertical`` for different columns about the same households.
    """

    name: Annotated[str, Field(pattern=_NAME)]
    topology: Literal["horizontal", "vertical"] = "horizontal"
    purpose: str = "eligibility-identification"


class NumericFeature(_Frozen):
    """A number within ``[min, max]``; ``transform = "log"`` spreads skewed amounts (money)."""

    name: Annotated[str, Field(pattern=_NAME)]
    type: Literal["numeric"]
    min: float
    max: float
    nullable: bool = False
    transform: Literal["none", "log"] = "none"
    label: str | None = None

    @model_validator(mode="after")
    def _range(self) -> NumericFeature:
        if not self.max > self.min:
            raise ValueError(f"max ({self.max!r}) must be greater than min ({self.min!r})")
        return self


class CategoricalFeature(_Frozen):
    """One of a fixed list of categories."""

    name: Annotated[str, Field(pattern=_NAME)]
    type: Literal["categorical"]
    categories: Annotated[list[str], Field(min_length=2)]
    nullable: bool = False
    label: str | None = None

    @field_validator("categories")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"categories repeat {dupes!r}")
        return value


class BooleanFeature(_Frozen):
    """true/false (also accepted: 1/0, yes/no)."""

    name: Annotated[str, Field(pattern=_NAME)]
    type: Literal["boolean"]
    nullable: bool = False
    label: str | None = None


Feature = Annotated[NumericFeature | CategoricalFeature | BooleanFeature, Field(discriminator="type")]


class SchemaSection(_Frozen):
    """The columns every agency's table has: an id, a 0/1 label and the features."""

    id: Annotated[str, Field(pattern=_NAME)]
    label: Annotated[str, Field(pattern=_NAME)]
    features: Annotated[list[Feature], Field(min_length=1)]

    @model_validator(mode="after")
    def _distinct_names(self) -> SchemaSection:
        names = [self.id, self.label, *(f.name for f in self.features)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"column names repeat {dupes!r}")
        return self

    def feature(self, name: str) -> Feature:
        """Return the feature called ``name``; raises KeyError if there is none."""
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(name)

    def plain_label(self, name: str) -> str:
        """The plain-language label of a feature (its name with spaces when none is given)."""
        label = self.feature(name).label
        return label if label else name.replace("_", " ")


class ModelSection(_Frozen):
    """``logistic``, or an ``mlp`` with ``hidden`` layer widths and an activation.

    ``activation = "square"`` is the polynomial activation that encrypted scoring can evaluate.
    """

    kind: Literal["logistic", "mlp"] = "logistic"
    hidden: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default_factory=list)
    activation: Literal["relu", "square"] = "relu"

    @model_validator(mode="after")
    def _hidden_matches_kind(self) -> ModelSection:
        if self.kind == "mlp" and not self.hidden:
            raise ValueError("kind 'mlp' needs at least one hidden layer, e.g. hidden = [16]")
        if self.kind == "logistic" and self.hidden:
            raise ValueError(f"kind 'logistic' takes no hidden layers (got {self.hidden!r})")
        return self


class TrainingSection(_Frozen):
    """Federated DP-SGD settings. Defaults were tuned on the synthetic population (docs/benchmarks.md).

    ``sample_rate`` is the Poisson sampling probability of each record at each step; one local epoch
    is ``round(1 / sample_rate)`` steps. ``server_momentum`` is FedAvgM's momentum on the averaged
    update (0.9 measured best on the synthetic agencies, whose data differ greatly; 0 = plain FedAvg).
    """

    rounds: Annotated[int, Field(ge=1, le=1000)] = 10
    local_epochs: Annotated[int, Field(ge=1, le=100)] = 1
    sample_rate: Annotated[float, Field(gt=0.0, le=0.5)] = 0.02
    learning_rate: Annotated[float, Field(gt=0.0, le=100.0)] = 2.0
    validation_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    min_agencies: Annotated[int, Field(ge=1)] = 2  # 3 when secure aggregation is on (``FederationSpec``)
    server_learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    server_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    seed: int = 0


class PrivacySection(_Frozen):
    """Per-agency DP: ``epsilon`` per job, ``budget`` over the dataset's lifetime (both at ``delta``)."""

    epsilon: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)]
    delta: Annotated[float, Field(gt=0.0, lt=1e-2)] = 1e-5
    max_grad_norm: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0
    budget: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    accountant: Literal["rdp"] = "rdp"

    @model_validator(mode="after")
    def _job_fits_budget(self) -> PrivacySection:
        if self.epsilon > self.budget:
            raise ValueError(f"epsilon per job ({self.epsilon!r}) exceeds the lifetime budget ({self.budget!r})")
        return self


class SecureAggregationSection(_Frozen):
    """Flower's SecAgg+ over the agencies' updates: the coordinator sees only their weighted sum.

    ``timeout`` bounds each of the protocol's four stages (seconds; an agency that misses it counts
    as dropped out). ``max_weight`` bounds the rows an update is weighted by (larger agencies are
    capped at it); it also sets the quantisation scale, so keep it near the largest agency's rows.
    """

    enabled: bool = True
    timeout: Annotated[float, Field(gt=0.0, le=3600.0)] = 300.0
    max_weight: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000


class EvaluationSection(_Frozen):
    """How an agency releases the validation metrics of a model: Gaussian-noised score histograms.

    Each release is ``bins`` per-label histogram counts and the squared-error sum of the agency's
    validation split, with Gaussian noise of std ``noise_multiplier * sqrt(2)`` on each (one
    household moves one count by 1 and the sum by at most 1: L2 sensitivity sqrt(2)). A job makes
    ``rounds + 1`` of them (one per round for the model it starts from, one for the final model),
    accounted in the agency's ledger inside the job's epsilon. ``bins`` is even, so that 0.5 is a bin
    edge and accuracy at 0.5 needs no interpolation.
    """

    noise_multiplier: Annotated[float, Field(gt=0.0, le=1000.0, allow_inf_nan=False)] = 10.0
    bins: Annotated[int, Field(ge=2, le=1000)] = 20

    @field_validator("bins")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"bins must be even, so that 0.5 is a bin edge (got {value!r})")
        return value


class FairnessSection(_Frozen):
    """Groups whose outcomes are compared, and the gaps tolerated between them.

    ``attributes`` are schema features (numeric ones need ``bands``: the edges, e.g. ``head_age =
    [40, 65]`` gives <40, 40-65, >=65); a missing value is its own group. Rates are taken at
    ``threshold``; a gap is judged only between groups with at least ``min_group_size`` rows in the
    metric's denominator. ``max_tpr_gap`` bounds the gap in coverage of the eligible (one minus the
    miss rate); ``None`` leaves a gap reported but unjudged. ``noise_multiplier > 0`` adds Gaussian
    noise to the released counts and records the release in the agency's ledger (it is then part of
    the job's epsilon); ``noise_multiplier = 0`` releases nothing (exact counts never leave an agency).
    ``mitigation = "group-thresholds"`` chooses per-group thresholds on
    ``mitigation_attribute`` (default: the first attribute) that equalise coverage (off by default).
    """

    attributes: Annotated[list[Annotated[str, Field(pattern=_NAME)]], Field(min_length=1)]
    bands: dict[str, Annotated[list[float], Field(min_length=1)]] = Field(default_factory=dict)
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    max_tpr_gap: Annotated[float, Field(ge=0.0, le=1.0)] | None = 0.1
    max_fpr_gap: Annotated[float, Field(ge=0.0, le=1.0)] | None = 0.1
    max_selection_gap: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    min_group_size: Annotated[int, Field(ge=1)] = 30
    noise_multiplier: Annotated[float, Field(ge=0.0, le=1000.0, allow_inf_nan=False)] = 5.0
    mitigation: Literal["none", "group-thresholds"] = "none"
    mitigation_attribute: Annotated[str, Field(pattern=_NAME)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FairnessSection:
        dupes = sorted({a for a in self.attributes if self.attributes.count(a) > 1})
        if dupes:
            raise ValueError(f"attributes repeat {dupes!r}")
        for name, edges in self.bands.items():
            if name not in self.attributes:
                raise ValueError(f"bands given for {name!r}, which is not among the attributes")
            if edges != sorted(set(edges)):
                raise ValueError(f"bands of {name!r} must increase strictly (got {edges!r})")
        if self.mitigation_attribute is not None and self.mitigation_attribute not in self.attributes:
            raise ValueError(f"mitigation_attribute {self.mitigation_attribute!r} is not among the attributes")
        if self.mitigation == "group-thresholds" and self.mitigation_attribute is None:
            return self.model_copy(update={"mitigation_attribute": self.attributes[0]})
        return self


class AgencySection(_Frozen):
    """One agency; ``data`` is a path on that agency's side (relative paths: to the spec file)."""

    name: Annotated[str, Field(pattern=_NAME)]
    data: str


class VerticalAgencySection(AgencySection):
    """One agency of a vertical federation and the columns it holds.

    ``features`` names the schema features in its file (disjoint from every other agency's; together
    the agencies hold every feature exactly once). ``label = true`` marks the one agency that holds the
    schema's label; in the eligibility use it is civil affairs, which also holds the household register.
    """

    features: Annotated[list[Annotated[str, Field(pattern=_NAME)]], Field(min_length=1)]
    label: bool = False

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
    Alignment outputs and blinding keys are kept ``retention_days`` days, then deleted. ``batch_size``
    ids travel per message (default 65536).
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


class RosterSection(_Frozen):
    """A benefit roster for the duplicate check: who receives ``programme``, as ``owner`` records it.

    ``owner`` is the office that holds the roster (a district office or a programme office; not
    necessarily a training agency); ``data`` is a path on its side (relative paths: to the spec file);
    ``id_column`` holds the resident identity number of each recipient household's head.
    """

    name: Annotated[str, Field(pattern=_NAME)]
    owner: Annotated[str, Field(pattern=_NAME)]
    programme: Annotated[str, Field(pattern=_NAME)]
    data: str
    id_column: Annotated[str, Field(pattern=_NAME)] = "head_id"


class DuplicatesSection(_Frozen):
    """Which enrolments the duplicate check reports.

    A household in two rosters of the same programme is always a duplicate. ``exclusive`` lists pairs
    of programmes a household may not receive together, e.g. ``[["minimum-living-allowance",
    "special-hardship"]]``; both programmes must have a roster.
    """

    exclusive: list[tuple[Annotated[str, Field(pattern=_NAME)], Annotated[str, Field(pattern=_NAME)]]] = Field(
        default_factory=list
    )

    @field_validator("exclusive")
    @classmethod
    def _pairs(cls, value: list[tuple[str, str]]) -> list[tuple[str, str]]:
        seen: set[frozenset[str]] = set()
        for a, b in value:
            if a == b:
                raise ValueError(
                    f"a programme cannot exclude itself (got {[a, b]!r}); two rosters of one programme "
                    "are always checked"
                )
            if frozenset((a, b)) in seen:
                raise ValueError(f"the pair {[a, b]!r} is listed twice")
            seen.add(frozenset((a, b)))
        return value


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


def _resolve(spec_path: Path, raw: str) -> Path:
    path = Path(raw)
    return path if path.is_absolute() else (spec_path.parent / path).resolve()


class LoadedSpec(BaseModel):
    """A validated spec with where it came from and the hash that model cards cite."""

    model_config = ConfigDict(frozen=True)

    spec: FederationSpec
    path: Path
    text: str
    sha256: str

    def data_path(self, agency: str) -> Path:
        """Absolute path of an agency's data file (relative paths are taken from the spec's folder)."""
        return _resolve(self.path, self.spec.agency(agency).data)

    def roster_path(self, name: str) -> Path:
        """Absolute path of a roster's file (relative paths are taken from the spec's folder)."""
        return _resolve(self.path, self.spec.roster(name).data)


class LoadedVerticalSpec(BaseModel):
    """A validated vertical spec with where it came from and the hash of its text."""

    model_config = ConfigDict(frozen=True)

    spec: VerticalFederationSpec
    path: Path
    text: str
    sha256: str

    def data_path(self, agency: str) -> Path:
        """Absolute path of an agency's data file (relative paths are taken from the spec's folder)."""
        return _resolve(self.path, self.spec.agency(agency).data)

    def roster_path(self, name: str) -> Path:
        """Absolute path of a roster's file (relative paths are taken from the spec's folder)."""
        return _resolve(self.path, self.spec.roster(name).data)


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
