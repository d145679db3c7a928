from coderepair.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerActivity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ACTIVITY_UNSPECIFIED: _ClassVar[WorkerActivity]
    WORKER_ACTIVITY_IDLE: _ClassVar[WorkerActivity]
    WORKER_ACTIVITY_DOWNLOADING: _ClassVar[WorkerActivity]
    WORKER_ACTIVITY_WORKING: _ClassVar[WorkerActivity]
    WORKER_ACTIVITY_DRAINING: _ClassVar[WorkerActivity]
WORKER_ACTIVITY_UNSPECIFIED: WorkerActivity
WORKER_ACTIVITY_IDLE: WorkerActivity
WORKER_ACTIVITY_DOWNLOADING: WorkerActivity
WORKER_ACTIVITY_WORKING: WorkerActivity
WORKER_ACTIVITY_DRAINING: WorkerActivity

class RegisterRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class RegisterPayload(_message.Message):
    __slots__ = ("display_name", "client_version", "capabilities")
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    display_name: str
    client_version: str
    capabilities: _common_pb2.WorkerCapabilities
    def __init__(self, display_name: _Optional[str] = ..., client_version: _Optional[str] = ..., capabilities: _Optional[_Union[_common_pb2.WorkerCapabilities, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_id", "state", "server_time_unix_ms", "max_clock_skew_ms", "heartbeat_interval_ms", "runs", "coordinator_version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CLOCK_SKEW_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    state: _common_pb2.WorkerState
    server_time_unix_ms: int
    max_clock_skew_ms: int
    heartbeat_interval_ms: int
    runs: _containers.RepeatedCompositeFieldContainer[_common_pb2.RunSummary]
    coordinator_version: str
    def __init__(self, worker_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.WorkerState, str]] = ..., server_time_unix_ms: _Optional[int] = ..., max_clock_skew_ms: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., runs: _Optional[_Iterable[_Union[_common_pb2.RunSummary, _Mapping]]] = ..., coordinator_version: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class HeartbeatPayload(_message.Message):
    __slots__ = ("activity", "lease_ids", "loaded_run_id", "loaded_policy_version", "tokens_per_second")
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    LOADED_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    activity: WorkerActivity
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    loaded_run_id: str
    loaded_policy_version: int
    tokens_per_second: float
    def __init__(self, activity: _Optional[_Union[WorkerActivity, str]] = ..., lease_ids: _Optional[_Iterable[str]] = ..., loaded_run_id: _Optional[str] = ..., loaded_policy_version: _Optional[int] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("server_time_unix_ms", "heartbeat_interval_ms", "revoked_lease_ids", "state", "runs", "notice")
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    server_time_unix_ms: int
    heartbeat_interval_ms: int
    revoked_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    state: _common_pb2.WorkerState
    runs: _containers.RepeatedCompositeFieldContainer[_common_pb2.RunSummary]
    notice: str
    def __init__(self, server_time_unix_ms: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., revoked_lease_ids: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[_common_pb2.WorkerState, str]] = ..., runs: _Optional[_Iterable[_Union[_common_pb2.RunSummary, _Mapping]]] = ..., notice: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("run_id", "version", "have_version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    version: int
    have_version: int
    def __init__(self, run_id: _Optional[str] = ..., version: _Optional[int] = ..., have_version: _Optional[int] = ...) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("chain",)
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    chain: _containers.RepeatedCompositeFieldContainer[_common_pb2.PolicyInfo]
    def __init__(self, chain: _Optional[_Iterable[_Union[_common_pb2.PolicyInfo, _Mapping]]] = ...) -> None: ...

class LeaseTasksRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class LeasePayload(_message.Message):
    __slots__ = ("run_id", "max_tasks", "loaded_policy_version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    LOADED_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    max_tasks: int
    loaded_policy_version: int
    def __init__(self, run_id: _Optional[str] = ..., max_tasks: _Optional[int] = ..., loaded_policy_version: _Optional[int] = ...) -> None: ...

class LeaseTasksResponse(_message.Message):
    __slots__ = ("lease", "retry_after_ms")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    lease: _common_pb2.Lease
    retry_after_ms: int
    def __init__(self, lease: _Optional[_Union[_common_pb2.Lease, _Mapping]] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class SubmitRolloutsRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class SubmitPayload(_message.Message):
    __slots__ = ("lease_id", "idempotency_key", "policy_version", "samples")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    idempotency_key: str
    policy_version: int
    samples: _containers.RepeatedCompositeFieldContainer[_common_pb2.RolloutSample]
    def __init__(self, lease_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., policy_version: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[_common_pb2.RolloutSample, _Mapping]]] = ...) -> None: ...

class SubmitRolloutsResponse(_message.Message):
    __slots__ = ("accepted", "batch_id", "rejection", "audit_pending", "replayed_response")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    AUDIT_PENDING_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    batch_id: str
    rejection: _common_pb2.Rejection
    audit_pending: bool
    replayed_response: bool
    def __init__(self, accepted: _Optional[bool] = ..., batch_id: _Optional[str] = ..., rejection: _Optional[_Union[_common_pb2.Rejection, _Mapping]] = ..., audit_pending: _Optional[bool] = ..., replayed_response: _Optional[bool] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("worker_public_key", "batch_ids")
    WORKER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    BATCH_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_public_key: bytes
    batch_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_public_key: _Optional[bytes] = ..., batch_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "state", "valid_streak", "credit_granted", "credit_pending", "batches_accepted", "batches_rejected", "batches_voided")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VALID_STREAK_FIELD_NUMBER: _ClassVar[int]
    CREDIT_GRANTED_FIELD_NUMBER: _ClassVar[int]
    CREDIT_PENDING_FIELD_NUMBER: _ClassVar[int]
    BATCHES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_VOIDED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    state: _common_pb2.WorkerState
    valid_streak: int
    credit_granted: int
    credit_pending: int
    batches_accepted: int
    batches_rejected: int
    batches_voided: int
    def __init__(self, worker_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.WorkerState, str]] = ..., valid_streak: _Optional[int] = ..., credit_granted: _Optional[int] = ..., credit_pending: _Optional[int] = ..., batches_accepted: _Optional[int] = ..., batches_rejected: _Optional[int] = ..., batches_voided: _Optional[int] = ...) -> None: ...

class BatchStatus(_message.Message):
    __slots__ = ("batch_id", "state", "rejection")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    state: _common_pb2.BatchState
    rejection: _common_pb2.Rejection
    def __init__(self, batch_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.BatchState, str]] = ..., rejection: _Optional[_Union[_common_pb2.Rejection, _Mapping]] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("worker", "batches", "workers_online", "runs")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerStatus
    batches: _containers.RepeatedCompositeFieldContainer[BatchStatus]
    workers_online: int
    runs: _containers.RepeatedCompositeFieldContainer[_common_pb2.RunSummary]
    def __init__(self, worker: _Optional[_Union[WorkerStatus, _Mapping]] = ..., batches: _Optional[_Iterable[_Union[BatchStatus, _Mapping]]] = ..., workers_online: _Optional[int] = ..., runs: _Optional[_Iterable[_Union[_common_pb2.RunSummary, _Mapping]]] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class ReleasePayload(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
