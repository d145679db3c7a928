from coderepair.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamRolloutsRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class StreamPayload(_message.Message):
    __slots__ = ("run_id", "after_cursor", "min_policy_version", "follow")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    MIN_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_cursor: int
    min_policy_version: int
    follow: bool
    def __init__(self, run_id: _Optional[str] = ..., after_cursor: _Optional[int] = ..., min_policy_version: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class RolloutRow(_message.Message):
    __slots__ = ("cursor", "run_id", "batch_id", "lease_id", "worker_id", "policy_version", "group_size", "sample", "accepted_unix_ms", "audit_pending")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_PENDING_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    run_id: str
    batch_id: str
    lease_id: str
    worker_id: str
    policy_version: int
    group_size: int
    sample: _common_pb2.RolloutSample
    accepted_unix_ms: int
    audit_pending: bool
    def __init__(self, cursor: _Optional[int] = ..., run_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., group_size: _Optional[int] = ..., sample: _Optional[_Union[_common_pb2.RolloutSample, _Mapping]] = ..., accepted_unix_ms: _Optional[int] = ..., audit_pending: _Optional[bool] = ...) -> None: ...

class AckCursorRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class AckPayload(_message.Message):
    __slots__ = ("run_id", "cursor", "trainer_step", "consumed_cursor")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    TRAINER_STEP_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_CURSOR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    cursor: int
    trainer_step: int
    consumed_cursor: int
    def __init__(self, run_id: _Optional[str] = ..., cursor: _Optional[int] = ..., trainer_step: _Optional[int] = ..., consumed_cursor: _Optional[int] = ...) -> None: ...

class AckCursorResponse(_message.Message):
    __slots__ = ("acked_cursor", "head_cursor", "consumed_cursor")
    ACKED_CURSOR_FIELD_NUMBER: _ClassVar[int]
    HEAD_CURSOR_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_CURSOR_FIELD_NUMBER: _ClassVar[int]
    acked_cursor: int
    head_cursor: int
    consumed_cursor: int
    def __init__(self, acked_cursor: _Optional[int] = ..., head_cursor: _Optional[int] = ..., consumed_cursor: _Optional[int] = ...) -> None: ...

class PublishPolicyRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class PublishPayload(_message.Message):
    __slots__ = ("run_id", "version", "manifest_json", "shards", "trained_through_cursor", "trainer_step", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_THROUGH_CURSOR_FIELD_NUMBER: _ClassVar[int]
    TRAINER_STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    version: int
    manifest_json: bytes
    shards: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShardLocation]
    trained_through_cursor: int
    trainer_step: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, run_id: _Optional[str] = ..., version: _Optional[int] = ..., manifest_json: _Optional[bytes] = ..., shards: _Optional[_Iterable[_Union[_common_pb2.ShardLocation, _Mapping]]] = ..., trained_through_cursor: _Optional[int] = ..., trainer_step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PublishPolicyResponse(_message.Message):
    __slots__ = ("accepted", "rejection", "latest_version")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    rejection: _common_pb2.Rejection
    latest_version: int
    def __init__(self, accepted: _Optional[bool] = ..., rejection: _Optional[_Union[_common_pb2.Rejection, _Mapping]] = ..., latest_version: _Optional[int] = ...) -> None: ...
