from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RejectionReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECTION_REASON_UNSPECIFIED: _ClassVar[RejectionReason]
    REJECTION_REASON_STRUCTURAL: _ClassVar[RejectionReason]
    REJECTION_REASON_SIGNATURE: _ClassVar[RejectionReason]
    REJECTION_REASON_REPLAY: _ClassVar[RejectionReason]
    REJECTION_REASON_CLOCK_SKEW: _ClassVar[RejectionReason]
    REJECTION_REASON_DUPLICATE: _ClassVar[RejectionReason]
    REJECTION_REASON_AUDIT_PROOF: _ClassVar[RejectionReason]
    REJECTION_REASON_AUDIT_SAMPLING: _ClassVar[RejectionReason]
    REJECTION_REASON_AUDIT_REWARD: _ClassVar[RejectionReason]
    REJECTION_REASON_STALE_POLICY: _ClassVar[RejectionReason]
    REJECTION_REASON_LEASE_EXPIRED: _ClassVar[RejectionReason]
    REJECTION_REASON_UNKNOWN_LEASE: _ClassVar[RejectionReason]
    REJECTION_REASON_NOT_LEASE_OWNER: _ClassVar[RejectionReason]
    REJECTION_REASON_BANNED: _ClassVar[RejectionReason]
    REJECTION_REASON_NOT_REGISTERED: _ClassVar[RejectionReason]
    REJECTION_REASON_NOT_AUTHORIZED: _ClassVar[RejectionReason]
    REJECTION_REASON_RATE_LIMITED: _ClassVar[RejectionReason]
    REJECTION_REASON_TOO_LARGE: _ClassVar[RejectionReason]
    REJECTION_REASON_CONFLICT: _ClassVar[RejectionReason]
    REJECTION_REASON_INTERNAL: _ClassVar[RejectionReason]

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_GUMBEL_MAX_V1: _ClassVar[Sampler]

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_ACTIVE: _ClassVar[WorkerState]
    WORKER_STATE_BANNED: _ClassVar[WorkerState]

class SandboxKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SANDBOX_KIND_UNSPECIFIED: _ClassVar[SandboxKind]
    SANDBOX_KIND_DOCKER: _ClassVar[SandboxKind]
    SANDBOX_KIND_BWRAP: _ClassVar[SandboxKind]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]

class BatchState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_STATE_UNSPECIFIED: _ClassVar[BatchState]
    BATCH_STATE_PENDING_AUDIT: _ClassVar[BatchState]
    BATCH_STATE_ACCEPTED: _ClassVar[BatchState]
    BATCH_STATE_REJECTED: _ClassVar[BatchState]
    BATCH_STATE_VOIDED: _ClassVar[BatchState]
REJECTION_REASON_UNSPECIFIED: RejectionReason
REJECTION_REASON_STRUCTURAL: RejectionReason
REJECTION_REASON_SIGNATURE: RejectionReason
REJECTION_REASON_REPLAY: RejectionReason
REJECTION_REASON_CLOCK_SKEW: RejectionReason
REJECTION_REASON_DUPLICATE: RejectionReason
REJECTION_REASON_AUDIT_PROOF: RejectionReason
REJECTION_REASON_AUDIT_SAMPLING: RejectionReason
REJECTION_REASON_AUDIT_REWARD: RejectionReason
REJECTION_REASON_STALE_POLICY: RejectionReason
REJECTION_REASON_LEASE_EXPIRED: RejectionReason
REJECTION_REASON_UNKNOWN_LEASE: RejectionReason
REJECTION_REASON_NOT_LEASE_OWNER: RejectionReason
REJECTION_REASON_BANNED: RejectionReason
REJECTION_REASON_NOT_REGISTERED: RejectionReason
REJECTION_REASON_NOT_AUTHORIZED: RejectionReason
REJECTION_REASON_RATE_LIMITED: RejectionReason
REJECTION_REASON_TOO_LARGE: RejectionReason
REJECTION_REASON_CONFLICT: RejectionReason
REJECTION_REASON_INTERNAL: RejectionReason
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_GUMBEL_MAX_V1: Sampler
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_ACTIVE: WorkerState
WORKER_STATE_BANNED: WorkerState
SANDBOX_KIND_UNSPECIFIED: SandboxKind
SANDBOX_KIND_DOCKER: SandboxKind
SANDBOX_KIND_BWRAP: SandboxKind
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
BATCH_STATE_UNSPECIFIED: BatchState
BATCH_STATE_PENDING_AUDIT: BatchState
BATCH_STATE_ACCEPTED: BatchState
BATCH_STATE_REJECTED: BatchState
BATCH_STATE_VOIDED: BatchState

class Rejection(_message.Message):
    __slots__ = ("reason", "message", "task_id", "sample_index", "retry_after_ms")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    reason: RejectionReason
    message: str
    task_id: str
    sample_index: int
    retry_after_ms: int
    def __init__(self, reason: _Optional[_Union[RejectionReason, str]] = ..., message: _Optional[str] = ..., task_id: _Optional[str] = ..., sample_index: _Optional[int] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("sampler", "temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "stop_strings")
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    sampler: Sampler
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop_strings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sampler: _Optional[_Union[Sampler, str]] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop_strings: _Optional[_Iterable[str]] = ...) -> None: ...

class WorkerCapabilities(_message.Message):
    __slots__ = ("engine", "engine_version", "device", "accelerator_memory_bytes", "max_model_len", "max_concurrent_samples", "sandbox")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_FIELD_NUMBER: _ClassVar[int]
    engine: str
    engine_version: str
    device: str
    accelerator_memory_bytes: int
    max_model_len: int
    max_concurrent_samples: int
    sandbox: SandboxKind
    def __init__(self, engine: _Optional[str] = ..., engine_version: _Optional[str] = ..., device: _Optional[str] = ..., accelerator_memory_bytes: _Optional[int] = ..., max_model_len: _Optional[int] = ..., max_concurrent_samples: _Optional[int] = ..., sandbox: _Optional[_Union[SandboxKind, str]] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run_id", "trainer_public_key", "base_model_id", "tokenizer_sha256", "latest_policy_version", "group_size", "reward_spec_hash", "max_policy_lag")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    LATEST_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    REWARD_SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    MAX_POLICY_LAG_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    trainer_public_key: bytes
    base_model_id: str
    tokenizer_sha256: str
    latest_policy_version: int
    group_size: int
    reward_spec_hash: str
    max_policy_lag: int
    def __init__(self, run_id: _Optional[str] = ..., trainer_public_key: _Optional[bytes] = ..., base_model_id: _Optional[str] = ..., tokenizer_sha256: _Optional[str] = ..., latest_policy_version: _Optional[int] = ..., group_size: _Optional[int] = ..., reward_spec_hash: _Optional[str] = ..., max_policy_lag: _Optional[int] = ...) -> None: ...

class ShardLocation(_message.Message):
    __slots__ = ("name", "urls", "size_bytes", "sha256", "urls_expire_unix_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URLS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    URLS_EXPIRE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    urls: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    sha256: str
    urls_expire_unix_ms: int
    def __init__(self, name: _Optional[str] = ..., urls: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., urls_expire_unix_ms: _Optional[int] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("run_id", "version", "manifest_json", "shards", "peer_bootstrap")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    PEER_BOOTSTRAP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    version: int
    manifest_json: bytes
    shards: _containers.RepeatedCompositeFieldContainer[ShardLocation]
    peer_bootstrap: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., version: _Optional[int] = ..., manifest_json: _Optional[bytes] = ..., shards: _Optional[_Iterable[_Union[ShardLocation, _Mapping]]] = ..., peer_bootstrap: _Optional[_Iterable[str]] = ...) -> None: ...

class LeasedTask(_message.Message):
    __slots__ = ("task_id", "prompt_text", "prompt_token_ids", "chat_template_sha256", "seeds", "task_json")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    TASK_JSON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    prompt_text: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    chat_template_sha256: str
    seeds: _containers.RepeatedScalarFieldContainer[int]
    task_json: bytes
    def __init__(self, task_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., chat_template_sha256: _Optional[str] = ..., seeds: _Optional[_Iterable[int]] = ..., task_json: _Optional[bytes] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "run_id", "policy_version", "reward_spec_hash", "reward_spec_json", "group_size", "sampling", "issued_unix_ms", "deadline_unix_ms", "tasks")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REWARD_SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    REWARD_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ISSUED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    run_id: str
    policy_version: int
    reward_spec_hash: str
    reward_spec_json: bytes
    group_size: int
    sampling: SamplingParams
    issued_unix_ms: int
    deadline_unix_ms: int
    tasks: _containers.RepeatedCompositeFieldContainer[LeasedTask]
    def __init__(self, lease_id: _Optional[str] = ..., run_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., reward_spec_hash: _Optional[str] = ..., reward_spec_json: _Optional[bytes] = ..., group_size: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., issued_unix_ms: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., tasks: _Optional[_Iterable[_Union[LeasedTask, _Mapping]]] = ...) -> None: ...

class SampleTimings(_message.Message):
    __slots__ = ("generate_ms", "reward_ms", "proof_ms")
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    REWARD_MS_FIELD_NUMBER: _ClassVar[int]
    PROOF_MS_FIELD_NUMBER: _ClassVar[int]
    generate_ms: int
    reward_ms: int
    proof_ms: int
    def __init__(self, generate_ms: _Optional[int] = ..., reward_ms: _Optional[int] = ..., proof_ms: _Optional[int] = ...) -> None: ...

class RolloutSample(_message.Message):
    __slots__ = ("task_id", "sample_index", "seed", "prompt_token_ids", "completion_token_ids", "behaviour_logprobs", "completion_text", "patch", "reward", "reward_components", "tests_passed", "tests_total", "test_log_sha256", "proof", "finish_reason", "timings")
    class RewardComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TEXT_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    REWARD_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    TESTS_PASSED_FIELD_NUMBER: _ClassVar[int]
    TESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TEST_LOG_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    sample_index: int
    seed: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    completion_token_ids: _containers.RepeatedScalarFieldContainer[int]
    behaviour_logprobs: _containers.RepeatedScalarFieldContainer[float]
    completion_text: str
    patch: str
    reward: float
    reward_components: _containers.ScalarMap[str, float]
    tests_passed: int
    tests_total: int
    test_log_sha256: str
    proof: bytes
    finish_reason: FinishReason
    timings: SampleTimings
    def __init__(self, task_id: _Optional[str] = ..., sample_index: _Optional[int] = ..., seed: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., completion_token_ids: _Optional[_Iterable[int]] = ..., behaviour_logprobs: _Optional[_Iterable[float]] = ..., completion_text: _Optional[str] = ..., patch: _Optional[str] = ..., reward: _Optional[float] = ..., reward_components: _Optional[_Mapping[str, float]] = ..., tests_passed: _Optional[int] = ..., tests_total: _Optional[int] = ..., test_log_sha256: _Optional[str] = ..., proof: _Optional[bytes] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., timings: _Optional[_Union[SampleTimings, _Mapping]] = ...) -> None: ...

class PageRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...
