"""The contract all parties share: the federation spec, feature encoding, the model and messages."""

from federation.encoding import FeatureEncoder
from federation.errors import (
    AgencyflError,
    DataFileError,
    FederationError,
    LedgerError,
    ModelError,
    SpecError,
)
from federation.model import build_model, model_from_arrays, model_to_arrays
from federation.spec import FederationSpec, LoadedSpec, load_spec, parse_spec

__all__ = [
    "AgencyflError",
    "DataFileError",
    "FeatureEncoder",
    "FederationError",
    "FederationSpec",
    "LedgerError",
    "LoadedSpec",
    "ModelError",
    "SpecError",
    "build_model",
    "load_spec",
    "model_from_arrays",
    "model_to_arrays",
    "parse_spec",
]
