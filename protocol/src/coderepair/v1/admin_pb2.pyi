from coderepair.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_KIND_UNSPECIFIED: _ClassVar[AuditKind]
    AUDIT_KIND_PROOF: _ClassVar[AuditKind]
    AUDIT_KIND_SAMPLING: _ClassVar[AuditKind]
    AUDIT_KIND_REWARD: _ClassVar[AuditKind]

class AuditVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_VERDICT_UNSPECIFIED: _ClassVar[AuditVerdict]
    AUDIT_VERDICT_PENDING: _ClassVar[AuditVerdict]
    AUDIT_VERDICT_PASSED: _ClassVar[AuditVerdict]
    AUDIT_VERDICT_FAILED: _ClassVar[AuditVerdict]
    AUDIT_VERDICT_ERROR: _ClassVar[AuditVerdict]
AUDIT_KIND_UNSPECIFIED: AuditKind
AUDIT_KIND_PROOF: AuditKind
AUDIT_KIND_SAMPLING: AuditKind
AUDIT_KIND_REWARD: AuditKind
AUDIT_VERDICT_UNSPECIFIED: AuditVerdict
AUDIT_VERDICT_PENDING: AuditVerdict
AUDIT_VERDICT_PASSED: AuditVerdict
AUDIT_VERDICT_FAILED: AuditVerdict
AUDIT_VERDICT_ERROR: AuditVerdict

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "public_key", "display_name", "state", "online", "registered_unix_ms", "last_seen_unix_ms", "capabilities", "client_version", "valid_streak", "audits_failed", "batches_accepted", "batches_rejected", "batches_voided", "credit_granted", "credit_pending", "ban_reason", "banned_until_unix_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VALID_STREAK_FIELD_NUMBER: _ClassVar[int]
    AUDITS_FAILED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_VOIDED_FIELD_NUMBER: _ClassVar[int]
    CREDIT_GRANTED_FIELD_NUMBER: _ClassVar[int]
    CREDIT_PENDING_FIELD_NUMBER: _ClassVar[int]
    BAN_REASON_FIELD_NUMBER: _ClassVar[int]
    BANNED_UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    public_key: bytes
    display_name: str
    state: _common_pb2.WorkerState
    online: bool
    registered_unix_ms: int
    last_seen_unix_ms: int
    capabilities: _common_pb2.WorkerCapabilities
    client_version: str
    valid_streak: int
    audits_failed: int
    batches_accepted: int
    batches_rejected: int
    batches_voided: int
    credit_granted: int
    credit_pending: int
    ban_reason: str
    banned_until_unix_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., display_name: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.WorkerState, str]] = ..., online: _Optional[bool] = ..., registered_unix_ms: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ..., capabilities: _Optional[_Union[_common_pb2.WorkerCapabilities, _Mapping]] = ..., client_version: _Optional[str] = ..., valid_streak: _Optional[int] = ..., audits_failed: _Optional[int] = ..., batches_accepted: _Optional[int] = ..., batches_rejected: _Optional[int] = ..., batches_voided: _Optional[int] = ..., credit_granted: _Optional[int] = ..., credit_pending: _Optional[int] = ..., ban_reason: _Optional[str] = ..., banned_until_unix_ms: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class ListWorkersPayload(_message.Message):
    __slots__ = ("state", "online_only", "page")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ONLINE_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.WorkerState
    online_only: bool
    page: _common_pb2.PageRequest
    def __init__(self, state: _Optional[_Union[_common_pb2.WorkerState, str]] = ..., online_only: _Optional[bool] = ..., page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "next_page_token")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    next_page_token: str
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class BanWorkerRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class BanPayload(_message.Message):
    __slots__ = ("worker_id", "reason", "until_unix_ms", "void_pending")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    VOID_PENDING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reason: str
    until_unix_ms: int
    void_pending: bool
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ..., until_unix_ms: _Optional[int] = ..., void_pending: _Optional[bool] = ...) -> None: ...

class BanWorkerResponse(_message.Message):
    __slots__ = ("worker", "batches_voided")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    BATCHES_VOIDED_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    batches_voided: int
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ..., batches_voided: _Optional[int] = ...) -> None: ...

class UnbanWorkerRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class UnbanPayload(_message.Message):
    __slots__ = ("worker_id", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UnbanWorkerResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class ListRunsPayload(_message.Message):
    __slots__ = ("page",)
    PAGE_FIELD_NUMBER: _ClassVar[int]
    page: _common_pb2.PageRequest
    def __init__(self, page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("summary", "created_unix_ms", "head_cursor", "acked_cursor", "trainer_step", "open_leases")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEAD_CURSOR_FIELD_NUMBER: _ClassVar[int]
    ACKED_CURSOR_FIELD_NUMBER: _ClassVar[int]
    TRAINER_STEP_FIELD_NUMBER: _ClassVar[int]
    OPEN_LEASES_FIELD_NUMBER: _ClassVar[int]
    summary: _common_pb2.RunSummary
    created_unix_ms: int
    head_cursor: int
    acked_cursor: int
    trainer_step: int
    open_leases: int
    def __init__(self, summary: _Optional[_Union[_common_pb2.RunSummary, _Mapping]] = ..., created_unix_ms: _Optional[int] = ..., head_cursor: _Optional[int] = ..., acked_cursor: _Optional[int] = ..., trainer_step: _Optional[int] = ..., open_leases: _Optional[int] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunInfo]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[RunInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListAuditsRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class ListAuditsPayload(_message.Message):
    __slots__ = ("worker_id", "verdict", "batch_id", "page")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    verdict: AuditVerdict
    batch_id: str
    page: _common_pb2.PageRequest
    def __init__(self, worker_id: _Optional[str] = ..., verdict: _Optional[_Union[AuditVerdict, str]] = ..., batch_id: _Optional[str] = ..., page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class AuditInfo(_message.Message):
    __slots__ = ("audit_id", "batch_id", "worker_id", "kind", "verdict", "detail", "metrics", "created_unix_ms", "finished_unix_ms")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AUDIT_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    audit_id: str
    batch_id: str
    worker_id: str
    kind: AuditKind
    verdict: AuditVerdict
    detail: str
    metrics: _containers.ScalarMap[str, float]
    created_unix_ms: int
    finished_unix_ms: int
    def __init__(self, audit_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., kind: _Optional[_Union[AuditKind, str]] = ..., verdict: _Optional[_Union[AuditVerdict, str]] = ..., detail: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., created_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ...) -> None: ...

class ListAuditsResponse(_message.Message):
    __slots__ = ("audits", "next_page_token")
    AUDITS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    audits: _containers.RepeatedCompositeFieldContainer[AuditInfo]
    next_page_token: str
    def __init__(self, audits: _Optional[_Iterable[_Union[AuditInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    def __init__(self, envelope: _Optional[bytes] = ...) -> None: ...

class GetStatsPayload(_message.Message):
    __slots__ = ("run_id", "window_ms")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    window_ms: int
    def __init__(self, run_id: _Optional[str] = ..., window_ms: _Optional[int] = ...) -> None: ...

class ReasonCount(_message.Message):
    __slots__ = ("reason", "count")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    reason: _common_pb2.RejectionReason
    count: int
    def __init__(self, reason: _Optional[_Union[_common_pb2.RejectionReason, str]] = ..., count: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("window_ms", "workers_online", "workers_banned", "leases_open", "audits_pending", "rollouts_per_second", "batches_accepted", "rejections", "reward_mean", "latest_policy_version", "head_cursor", "acked_cursor")
    WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_BANNED_FIELD_NUMBER: _ClassVar[int]
    LEASES_OPEN_FIELD_NUMBER: _ClassVar[int]
    AUDITS_PENDING_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BATCHES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    LATEST_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEAD_CURSOR_FIELD_NUMBER: _ClassVar[int]
    ACKED_CURSOR_FIELD_NUMBER: _ClassVar[int]
    window_ms: int
    workers_online: int
    workers_banned: int
    leases_open: int
    audits_pending: int
    rollouts_per_second: float
    batches_accepted: int
    rejections: _containers.RepeatedCompositeFieldContainer[ReasonCount]
    reward_mean: float
    latest_policy_version: int
    head_cursor: int
    acked_cursor: int
    def __init__(self, window_ms: _Optional[int] = ..., workers_online: _Optional[int] = ..., workers_banned: _Optional[int] = ..., leases_open: _Optional[int] = ..., audits_pending: _Optional[int] = ..., rollouts_per_second: _Optional[float] = ..., batches_accepted: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[ReasonCount, _Mapping]]] = ..., reward_mean: _Optional[float] = ..., latest_policy_version: _Optional[int] = ..., head_cursor: _Optional[int] = ..., acked_cursor: _Optional[int] = ...) -> None: ...
