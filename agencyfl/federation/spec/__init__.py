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

from agencyfl.federation.spec.loading import (
    LoadedSpec,
    LoadedVerticalSpec,
    load_any_spec,
    load_spec,
    parse_any_spec,
    parse_spec,
)
from agencyfl.federation.spec.sections import (
    AgencySection,
    BooleanFeature,
    CategoricalFeature,
    DuplicatesSection,
    EvaluationSection,
    FairnessSection,
    Feature,
    FederationSection,
    ModelSection,
    NumericFeature,
    PrivacySection,
    RosterSection,
    SchemaSection,
    SecureAggregationSection,
    TrainingSection,
)
from agencyfl.federation.spec.topologies import (
    AlignmentSection,
    AnyFederationSpec,
    FederationSpec,
    VerticalAgencySection,
    VerticalFederationSpec,
)

__all__ = [
    "AgencySection",
    "AlignmentSection",
    "AnyFederationSpec",
    "BooleanFeature",
    "CategoricalFeature",
    "DuplicatesSection",
    "EvaluationSection",
    "FairnessSection",
    "Feature",
    "FederationSection",
    "FederationSpec",
    "LoadedSpec",
    "LoadedVerticalSpec",
    "ModelSection",
    "NumericFeature",
    "PrivacySection",
    "RosterSection",
    "SchemaSection",
    "SecureAggregationSection",
    "TrainingSection",
    "VerticalAgencySection",
    "VerticalFederationSpec",
    "load_any_spec",
    "load_spec",
    "parse_any_spec",
    "parse_spec",
]
