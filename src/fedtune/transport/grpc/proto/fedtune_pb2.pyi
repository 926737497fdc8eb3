# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    IDLE: _ClassVar[Kind]
    SHUTDOWN: _ClassVar[Kind]
    FIT: _ClassVar[Kind]
    EVALUATE: _ClassVar[Kind]
    FIT_RESULT: _ClassVar[Kind]
    EVAL_RESULT: _ClassVar[Kind]
    FAILURE: _ClassVar[Kind]
    SECAGG_ADVERTISE: _ClassVar[Kind]
    SECAGG_SHARE: _ClassVar[Kind]
    SECAGG_MASKED: _ClassVar[Kind]
    SECAGG_UNMASK: _ClassVar[Kind]
    SECAGG_RESULT: _ClassVar[Kind]
    SECAGG_CONSISTENCY: _ClassVar[Kind]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    UINT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]

class Cause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAUSE_ERROR: _ClassVar[Cause]
    CAUSE_STATE_LOST: _ClassVar[Cause]

KIND_UNSPECIFIED: Kind
IDLE: Kind
SHUTDOWN: Kind
FIT: Kind
EVALUATE: Kind
FIT_RESULT: Kind
EVAL_RESULT: Kind
FAILURE: Kind
SECAGG_ADVERTISE: Kind
SECAGG_SHARE: Kind
SECAGG_MASKED: Kind
SECAGG_UNMASK: Kind
SECAGG_RESULT: Kind
SECAGG_CONSISTENCY: Kind
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
UINT16: DType
INT8: DType
UINT8: DType
INT32: DType
INT64: DType
UINT32: DType
FLOAT64: DType
CAUSE_ERROR: Cause
CAUSE_STATE_LOST: Cause

class JoinRequest(_message.Message):
    __slots__ = ("protocol", "software", "declared_examples")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_FIELD_NUMBER: _ClassVar[int]
    DECLARED_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    software: str
    declared_examples: int
    def __init__(
        self, protocol: _Optional[int] = ..., software: _Optional[str] = ..., declared_examples: _Optional[int] = ...
    ) -> None: ...

class JoinReply(_message.Message):
    __slots__ = (
        "session",
        "client_id",
        "config_yaml",
        "heartbeat_s",
        "poll_s",
        "max_payload_bytes",
        "chunk_bytes",
        "codec",
        "codec_params_json",
        "extra_json",
    )
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    POLL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    session: str
    client_id: str
    config_yaml: str
    heartbeat_s: float
    poll_s: float
    max_payload_bytes: int
    chunk_bytes: int
    codec: str
    codec_params_json: str
    extra_json: str
    def __init__(
        self,
        session: _Optional[str] = ...,
        client_id: _Optional[str] = ...,
        config_yaml: _Optional[str] = ...,
        heartbeat_s: _Optional[float] = ...,
        poll_s: _Optional[float] = ...,
        max_payload_bytes: _Optional[int] = ...,
        chunk_bytes: _Optional[int] = ...,
        codec: _Optional[str] = ...,
        codec_params_json: _Optional[str] = ...,
        extra_json: _Optional[str] = ...,
    ) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("session", "reason")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session: str
    reason: str
    def __init__(self, session: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorMeta(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(
        self,
        name: _Optional[str] = ...,
        dtype: _Optional[_Union[DType, str]] = ...,
        shape: _Optional[_Iterable[int]] = ...,
    ) -> None: ...

class Header(_message.Message):
    __slots__ = (
        "protocol",
        "kind",
        "session",
        "task_id",
        "round",
        "spec_digest",
        "scalars_json",
        "tensors",
        "payload_bytes",
        "payload_sha256",
        "codec",
        "codec_params_json",
        "cause",
    )
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SPEC_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SCALARS_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    kind: Kind
    session: str
    task_id: str
    round: int
    spec_digest: str
    scalars_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    payload_bytes: int
    payload_sha256: str
    codec: str
    codec_params_json: str
    cause: Cause
    def __init__(
        self,
        protocol: _Optional[int] = ...,
        kind: _Optional[_Union[Kind, str]] = ...,
        session: _Optional[str] = ...,
        task_id: _Optional[str] = ...,
        round: _Optional[int] = ...,
        spec_digest: _Optional[str] = ...,
        scalars_json: _Optional[str] = ...,
        tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ...,
        payload_bytes: _Optional[int] = ...,
        payload_sha256: _Optional[str] = ...,
        codec: _Optional[str] = ...,
        codec_params_json: _Optional[str] = ...,
        cause: _Optional[_Union[Cause, str]] = ...,
    ) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: Header
    data: bytes
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
