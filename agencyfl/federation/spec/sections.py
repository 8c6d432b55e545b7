"""The sections both topologies share: federation, schema, model, training, privacy, secure aggregation,
evaluation, fairness, agencies, and the duplicate-benefit check's rosters."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from agencyfl.federation.spec._base import _NAME, _Frozen


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

    ``damping`` (vertical specs only): block Newton's kappa, how short a step the directions the Hessian
    release's noise dominates take (``VerticalPlan.damping``; 0.5 when absent, tuned at 60,000 training
    households and more). A small register may prefer 1-2: a higher AUC for a lower coverage at the 0.5
    threshold (docs/benchmarks.md, "The default against its neighbours").
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
    damping: Annotated[float | None, Field(gt=0.0, le=100.0, allow_inf_nan=False)] = None


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
