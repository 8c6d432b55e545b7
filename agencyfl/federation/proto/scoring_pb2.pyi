from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HEParameters(_message.Message):
    __slots__ = ("poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale_bits")
    POLY_MODULUS_DEGREE_FIELD_NUMBER: _ClassVar[int]
    COEFF_MOD_BIT_SIZES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    poly_modulus_degree: int
    coeff_mod_bit_sizes: _containers.RepeatedScalarFieldContainer[int]
    global_scale_bits: int
    def __init__(self, poly_modulus_degree: _Optional[int] = ..., coeff_mod_bit_sizes: _Optional[_Iterable[int]] = ..., global_scale_bits: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "purpose", "kind", "inputs", "parameter_sets", "max_batch", "contributions", "schema_json", "decision_json")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SETS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    DECISION_JSON_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    purpose: str
    kind: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    parameter_sets: _containers.RepeatedCompositeFieldContainer[HEParameters]
    max_batch: int
    contributions: bool
    schema_json: str
    decision_json: str
    def __init__(self, model_version: _Optional[str] = ..., purpose: _Optional[str] = ..., kind: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., parameter_sets: _Optional[_Iterable[_Union[HEParameters, _Mapping]]] = ..., max_batch: _Optional[int] = ..., contributions: _Optional[bool] = ..., schema_json: _Optional[str] = ..., decision_json: _Optional[str] = ...) -> None: ...

class RegisterContextRequest(_message.Message):
    __slots__ = ("public_context",)
    PUBLIC_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    public_context: bytes
    def __init__(self, public_context: _Optional[bytes] = ...) -> None: ...

class RegisterContextReply(_message.Message):
    __slots__ = ("key_fingerprint",)
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    key_fingerprint: str
    def __init__(self, key_fingerprint: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("purpose", "key_fingerprint", "count", "feature_columns", "want_contributions", "row_packed")
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    WANT_CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    ROW_PACKED_FIELD_NUMBER: _ClassVar[int]
    purpose: str
    key_fingerprint: str
    count: int
    feature_columns: _containers.RepeatedScalarFieldContainer[bytes]
    want_contributions: bool
    row_packed: bool
    def __init__(self, purpose: _Optional[str] = ..., key_fingerprint: _Optional[str] = ..., count: _Optional[int] = ..., feature_columns: _Optional[_Iterable[bytes]] = ..., want_contributions: _Optional[bool] = ..., row_packed: _Optional[bool] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("logits", "count", "model_version", "contributions")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    logits: bytes
    count: int
    model_version: str
    contributions: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, logits: _Optional[bytes] = ..., count: _Optional[int] = ..., model_version: _Optional[str] = ..., contributions: _Optional[_Iterable[bytes]] = ...) -> None: ...
