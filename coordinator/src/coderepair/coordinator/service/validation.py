"""Structural validation of a submitted batch, and the BOINC audit rate.

`check_batch` is the first stage of the pipeline (DESIGN.md, "Trust and validation"):
pure checks of a `SubmitPayload` against the lease it answers, the run and its task
pool, with no I/O. It reads the payload through `wire.SubmitView` and returns the
batch as columns (`CheckedBatch`, whose token columns are numpy buffers), or raises
`Refusal` naming the stage, and the task and sample it is about.
Lease ownership, expiry and the policy window are checked here for a clear message and
again inside `record_batch`'s transaction, which is what makes them race-free.

`audit_probability` is BOINC's adaptive replication rule: a worker with fewer than
`always_below_streak` consecutive valid batches is always audited; after that with
probability 1/streak, never below `min_rate`.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from coderepair.coordinator.config import AuditConfig
from coderepair.coordinator.service.gate import Refusal
from coderepair.coordinator.service.wire import VarintError, decode_varints, encode_ids
from coderepair.coordinator.storage.batches import packed_completion_digest
from coderepair.coordinator.storage.models import Lease, LeaseState
from coderepair.coordinator.storage.repo import LeaseTask
from coderepair.protocol.proofs import proof_size
from coderepair.protocol.reward import RewardSpec
from coderepair.protocol.rollout import (
    ROLLOUT_SCHEMA,
    RolloutRecord,
    rollout_table,
    shared_prompts,
    table_parquet_bytes,
)
from coderepair.v1 import common_pb2

__all__ = [
    "IDEMPOTENCY_KEY_RE",
    "CheckedBatch",
    "LeaseView",
    "audit_probability",
    "check_batch",
    "check_lease_open",
    "check_policy_window",
    "should_audit",
]

R = common_pb2.RejectionReason
IDEMPOTENCY_KEY_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
MAX_TEXT_CHARS = 1 << 20
MAX_COMPONENTS = 64
_TOKENS_PER_CHUNK = 32
# The worker sums a map whose order protobuf does not keep: allow last-ulp differences.
_REWARD_TOLERANCE = 1e-9
_LOGPROB_SLACK = 1e-3
MAX_TOKEN_ID = (1 << 31) - 1
"""The largest id a rollout record holds (its Parquet column is int32)."""
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LeaseView:
    """What validation needs of a lease: its row, its tasks with seeds, their prompts."""

    lease: Lease
    tasks: Sequence[LeaseTask]
    prompts: Mapping[str, Sequence[int]]


def _structural(message: str, *, task_id: str | None = None, index: int | None = None) -> Refusal:
    return Refusal(R.REJECTION_REASON_STRUCTURAL, message, task_id=task_id, sample_index=index)


def check_envelope_fields(payload: Any) -> None:
    """Checks that need nothing but the payload."""
    if not payload.lease_id or len(payload.lease_id) > 64:
        raise _structural("lease_id must be 1 to 64 characters: copy it from the lease")
    if not IDEMPOTENCY_KEY_RE.fullmatch(payload.idempotency_key):
        raise _structural(
            "idempotency_key must be 16 to 64 characters of [A-Za-z0-9_-]: use a fresh UUID4 "
            "hex per batch and keep it for retries"
        )
    if not payload.samples:
        raise _structural("the batch has no samples: submit group_size samples per task")


def check_lease_open(view: LeaseView, worker_id: str, now_ms: int) -> None:
    """The lease is the signer's, open, and within its deadline."""
    lease = view.lease
    if lease.worker_id != worker_id:
        raise Refusal(
            R.REJECTION_REASON_NOT_LEASE_OWNER,
            f"lease {lease.lease_id} was issued to another key: submit only your own leases",
        )
    if lease.state is LeaseState.EXPIRED or (
        lease.state is LeaseState.OPEN and lease.deadline_unix_ms < now_ms
    ):
        raise Refusal(
            R.REJECTION_REASON_LEASE_EXPIRED,
            f"lease {lease.lease_id} passed its deadline ({lease.deadline_unix_ms} unix ms); "
            "its tasks went back to the pool: lease new work",
        )
    if lease.state is LeaseState.SUBMITTED:
        # A retry under the batch's own idempotency key never gets here (it is answered
        # with the stored verdict): this is a second batch for the same lease.
        raise Refusal(
            R.REJECTION_REASON_REPLAY,
            f"lease {lease.lease_id} already has its accepted batch; a second batch for it "
            "is a replay: retry only under the original idempotency key, and lease new work",
        )
    if lease.state is not LeaseState.OPEN:
        raise Refusal(
            R.REJECTION_REASON_UNKNOWN_LEASE,
            f"lease {lease.lease_id} is {lease.state.value} and takes no submission: lease "
            "new work",
        )


def check_policy_window(version: int, latest: int, max_lag: int) -> None:
    """A version inside the run's staleness window [latest - max_lag, latest]."""
    if version > latest:
        raise Refusal(
            R.REJECTION_REASON_STALE_POLICY,
            f"policy version {version} is in the future (the run's latest is {latest}): "
            "generate with the version your lease names",
        )
    if version < latest - max_lag:
        raise Refusal(
            R.REJECTION_REASON_STALE_POLICY,
            f"policy version {version} is older than the staleness window allows (latest "
            f"{latest}, at most {max_lag} behind): download the latest policy and lease again",
        )


def _check_sample(  # noqa: PLR0917  (one sample's checks, in the order they run)
    sample: Any,
    seeds: Sequence[int],
    prompt: bytes,
    prompt_ids: list[int],
    n: int,
    n_logprobs: int,
    max_new: int,
    tokens: _TokenChecks,
    row: int,
) -> None:
    """Checks of one sample's own fields; its token columns were decoded and scanned
    for the whole batch at once (`_TokenChecks`), and are looked up here by `row`."""
    task_id, index = sample.task_id, sample.sample_index

    def fail(message: str) -> Refusal:
        return _structural(
            f"task {task_id} sample {index}: {message}", task_id=task_id, index=index
        )

    if sample.seed != seeds[index]:
        raise fail("seed differs from the lease's: use seeds[sample_index] of the lease")
    # Equal packed bytes are equal ids; unequal bytes can still be equal ids written
    # with longer varints than needed, which only the slow comparison can tell.
    if sample.prompt_token_ids != prompt and not _same_ids(sample.prompt_token_ids, prompt_ids):
        raise fail("prompt_token_ids differ from the lease's: feed the engine the lease's ids")
    if not 1 <= n <= max_new:
        raise fail(f"has {n} completion tokens; the lease allows 1 to {max_new}")
    if tokens.id_too_large[row]:
        raise fail(f"completion_token_ids hold an id above {MAX_TOKEN_ID}: not a token id")
    if not _HEX64.fullmatch(sample.test_log_sha256):
        raise fail("test_log_sha256 must be 64 lowercase hex digits (the log's sha256)")
    if n_logprobs != n:
        raise fail(f"has {n_logprobs} behaviour logprobs for {n} tokens: one each")
    if tokens.bad_logprob[row]:
        bad = tokens.first_bad_logprob(row)
        raise fail(f"behaviour logprob {bad} is not a finite number <= 0")
    if len(sample.completion_text) > MAX_TEXT_CHARS or len(sample.patch) > MAX_TEXT_CHARS:
        raise fail(f"completion_text and patch are limited to {MAX_TEXT_CHARS} characters")
    size = proof_size()
    chunks, rest = divmod(len(sample.proof), size)
    if rest or not 1 <= chunks <= 1 + -(-n // _TOKENS_PER_CHUNK):
        raise fail(
            f"proof is {len(sample.proof)} bytes; {n} tokens need {size}-byte chunks, one for "
            f"the prefill and one per started group of {_TOKENS_PER_CHUNK} tokens"
        )
    if sample.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
        raise fail("finish_reason is unset: say STOP or LENGTH")


def _same_ids(packed: bytes, ids: list[int]) -> bool:
    try:
        values, _ = decode_varints(packed)
    except VarintError:
        return False
    return bool(values.tolist() == ids)


@dataclass(frozen=True)
class _TokenChecks:
    """The batch's completion ids and logprobs, decoded and scanned in one pass each."""

    ids: np.ndarray  # uint64, every sample's ids end to end
    id_offsets: np.ndarray  # sample i's ids are ids[id_offsets[i]:id_offsets[i + 1]]
    logprobs: np.ndarray  # float32, likewise
    logprob_offsets: np.ndarray
    id_too_large: list[bool]
    bad_logprob: list[bool]

    @classmethod
    def scan(cls, samples: Sequence[Any]) -> _TokenChecks:
        id_blobs = [s.completion_token_ids for s in samples]
        lp_blobs = [s.behaviour_logprobs for s in samples]
        for sample, ids, lps in zip(samples, id_blobs, lp_blobs, strict=True):
            # What the real parser refuses outright: a cut-off varint, a partial float.
            if ids and ids[-1] >= 0x80:
                raise _wire(sample, "completion_token_ids ends inside a varint")
            if len(lps) % 4:
                raise _wire(sample, f"behaviour_logprobs is {len(lps)} bytes, not whole floats")
        try:
            ids, last_bytes = decode_varints(b"".join(id_blobs))
        except VarintError as exc:
            bad = next(s for s, blob in zip(samples, id_blobs, strict=True) if _cannot_decode(blob))
            raise _wire(bad, f"completion_token_ids: {exc}") from exc
        byte_offsets = np.zeros(len(samples) + 1, np.int64)
        np.cumsum([len(b) for b in id_blobs], out=byte_offsets[1:])
        id_offsets = np.searchsorted(last_bytes, byte_offsets)
        logprobs = np.frombuffer(b"".join(lp_blobs), "<f4")
        logprob_offsets = np.zeros(len(samples) + 1, np.int64)
        np.cumsum([len(b) // 4 for b in lp_blobs], out=logprob_offsets[1:])
        bad = ~np.isfinite(logprobs) | (logprobs > _LOGPROB_SLACK)
        return cls(
            ids=ids,
            id_offsets=id_offsets,
            logprobs=logprobs,
            logprob_offsets=logprob_offsets,
            id_too_large=_any_per_row(ids > MAX_TOKEN_ID, id_offsets),
            bad_logprob=_any_per_row(bad, logprob_offsets),
        )

    def first_bad_logprob(self, row: int) -> float:
        values = self.logprobs[self.logprob_offsets[row] : self.logprob_offsets[row + 1]]
        bad = ~np.isfinite(values) | (values > _LOGPROB_SLACK)
        return float(values[np.flatnonzero(bad)[0]])


def _any_per_row(flags: np.ndarray, offsets: np.ndarray) -> list[bool]:
    counts = np.zeros(flags.size + 1, np.int64)
    np.cumsum(flags, out=counts[1:])
    hits: list[bool] = (counts[offsets[1:]] > counts[offsets[:-1]]).tolist()
    return hits


def _cannot_decode(blob: bytes) -> bool:
    try:
        decode_varints(blob)
    except VarintError:
        return True
    return False


def _wire(sample: Any, message: str) -> Refusal:
    task_id, index = sample.task_id, sample.sample_index
    return _structural(
        f"task {task_id} sample {index}: {message}: encode the sample with protobuf",
        task_id=task_id,
        index=index,
    )


def _check_reward(sample: common_pb2.RolloutSample, spec: RewardSpec) -> None:
    task_id, index = sample.task_id, sample.sample_index
    components = dict(sample.reward_components)
    if (
        len(components) > MAX_COMPONENTS
        or not all(map(math.isfinite, components.values()))
        or "" in components
    ):
        raise _structural(
            f"task {task_id} sample {index}: reward_components must be at most "
            f"{MAX_COMPONENTS} finite numbers under non-empty names",
            task_id=task_id,
            index=index,
        )
    reward = sample.reward
    if not math.isfinite(reward) or not spec.min_reward <= reward <= spec.max_reward:
        raise _structural(
            f"task {task_id} sample {index}: reward {reward} is outside the spec's range "
            f"[{spec.min_reward}, {spec.max_reward}]",
            task_id=task_id,
            index=index,
        )
    total = spec.clamped_total(components.values())
    if abs(total - reward) > _REWARD_TOLERANCE * max(1.0, abs(reward)):
        raise _structural(
            f"task {task_id} sample {index}: reward {reward} is not the clamped sum of its "
            f"components ({total}): report the reward compute_reward returned",
            task_id=task_id,
            index=index,
        )


def check_batch(
    payload: Any,
    view: LeaseView,
    *,
    run_id: str,
    worker_key_hex: str,
    group_size: int,
    max_new_tokens: int,
    reward_spec: RewardSpec,
    reward_spec_hash: str,
    now_ms: int,
) -> CheckedBatch:
    """The batch, checked, as columns, or `Refusal`. Exactly group_size samples per task
    of the lease, indices 0..G-1 each, seeds and prompts as leased, sizes in limits.

    `payload` is a `wire.SubmitView` (the coordinator parses submissions with it).
    """
    lease = view.lease
    if payload.policy_version != lease.policy_version:
        raise Refusal(
            R.REJECTION_REASON_STALE_POLICY,
            f"the batch says policy version {payload.policy_version} but lease "
            f"{lease.lease_id} is for version {lease.policy_version}: generate with the "
            "lease's version",
        )
    seeds = {t.task_id: t.seeds for t in view.tasks}
    samples = payload.samples
    expected = len(seeds) * group_size
    if len(samples) != expected:
        raise _structural(
            f"the batch has {len(samples)} samples; lease {lease.lease_id} has "
            f"{len(seeds)} task(s) x group size {group_size} = {expected}"
        )
    # One list per task, shared by its G rows (Parquet converts it once).
    prompts = {task_id: list(view.prompts[task_id]) for task_id in seeds}
    packed = {task_id: encode_ids(ids) for task_id, ids in prompts.items()}
    tokens = _TokenChecks.scan(samples)
    n_ids = np.diff(tokens.id_offsets).tolist()
    n_logprobs = np.diff(tokens.logprob_offsets).tolist()
    seen: set[tuple[str, int]] = set()
    rows: dict[str, list[Any]] = {name: [] for name in _ROW_COLUMNS}
    for row, sample in enumerate(samples):
        task_id, index = sample.task_id, sample.sample_index
        if task_id not in seeds:
            raise _structural(
                f"sample for task {task_id[:128]!r}, which lease {lease.lease_id} does not hold",
                task_id=task_id[:128],
            )
        if index >= group_size or (task_id, index) in seen:
            raise _structural(
                f"task {task_id} sample_index {index} is out of range 0..{group_size - 1} or "
                "repeated: send each index exactly once",
                task_id=task_id,
                index=index,
            )
        seen.add((task_id, index))
        _check_sample(
            sample,
            seeds[task_id],
            packed[task_id],
            prompts[task_id],
            n_ids[row],
            n_logprobs[row],
            max_new_tokens,
            tokens,
            row,
        )
        _check_reward(sample, reward_spec)
        timings = sample.timings
        rows["task_id"].append(task_id)
        rows["sample_index"].append(int(index))
        rows["seed"].append(int(sample.seed))
        rows["prompt_ids"].append(prompts[task_id])
        rows["completion_text"].append(sample.completion_text)
        rows["patch"].append(sample.patch)
        rows["reward"].append(float(sample.reward))
        rows["reward_components"].append(dict(sample.reward_components))
        rows["test_log_sha256"].append(sample.test_log_sha256)
        rows["proof"].append(bytes(sample.proof))
        rows["timings"].append(
            {
                "generate": timings.generate_ms / 1000.0,
                "reward": timings.reward_ms / 1000.0,
                "proof": timings.proof_ms / 1000.0,
            }
        )
    # Every column checked above, or the lease's, the run's or the signer's.
    return CheckedBatch(
        common={
            "lease_id": lease.lease_id,
            "run_id": run_id,
            "worker_key": worker_key_hex,
            "policy_version": int(payload.policy_version),
            "reward_spec_hash": reward_spec_hash,
            "created_at_ms": now_ms,
        },
        rows=rows,
        completion_ids=tokens.ids.astype(np.int32),  # every id <= MAX_TOKEN_ID
        behaviour_logprobs=tokens.logprobs,
        offsets=tokens.id_offsets,
    )


_ROW_COLUMNS = (
    "task_id",
    "sample_index",
    "seed",
    "prompt_ids",
    "completion_text",
    "patch",
    "reward",
    "reward_components",
    "test_log_sha256",
    "proof",
    "timings",
)


@dataclass(frozen=True)
class CheckedBatch:
    """A batch that passed `check_batch`, held as columns.

    The token columns stay numpy buffers from the wire to the Parquet file: the
    coordinator never builds a Python object per token. `records()` builds the rows
    as `RolloutRecord`s for whoever wants them one by one.
    """

    common: dict[str, Any]
    """The columns with one value for the whole batch (lease, run, key, version...)."""
    rows: dict[str, list[Any]]
    """One list per per-sample column but the token columns, in sample order."""
    completion_ids: np.ndarray
    """int32, every sample's completion ids end to end."""
    behaviour_logprobs: np.ndarray
    """float32, one per completion id, end to end likewise."""
    offsets: np.ndarray
    """Sample i's tokens are [offsets[i], offsets[i + 1]) of both token columns."""

    def __len__(self) -> int:
        return len(self.rows["task_id"])

    @property
    def n_tokens(self) -> int:
        """Completion tokens in the batch."""
        return int(self.offsets[-1])

    def lengths(self) -> list[int]:
        """Each sample's number of completion tokens."""
        lengths: list[int] = np.diff(self.offsets).tolist()
        return lengths

    def digests(self) -> list[str]:
        """`completion_digest` of each sample."""
        packed = self.completion_ids.astype("<u4").tobytes()
        ends = (4 * self.offsets).tolist()
        return [
            packed_completion_digest(task_id, packed[ends[i] : ends[i + 1]])
            for i, task_id in enumerate(self.rows["task_id"])
        ]

    def table(self) -> pa.Table:
        """The batch as an Arrow table of `ROLLOUT_SCHEMA`."""
        n = len(self)
        columns: dict[str, Any] = {name: [value] * n for name, value in self.common.items()}
        columns.update(self.rows)
        columns["prompt_ids"] = shared_prompts(self.rows["prompt_ids"])
        offsets = pa.array(self.offsets.astype(np.int32))
        for name, values in (
            ("completion_ids", self.completion_ids),
            ("behaviour_logprobs", self.behaviour_logprobs.astype(np.float64)),
        ):
            list_type = ROLLOUT_SCHEMA.field(name).type
            columns[name] = pa.ListArray.from_arrays(
                offsets, pa.array(values, type=list_type.value_type), type=list_type
            )
        return rollout_table(columns)

    def parquet_bytes(self) -> bytes:
        """The batch as the bytes of one Parquet file."""
        return table_parquet_bytes(self.table())

    def records(self) -> list[RolloutRecord]:
        """The batch as rollout records, built without their checks (made above)."""
        ends = self.offsets.tolist()
        logprobs = self.behaviour_logprobs.astype(np.float64)
        out = []
        for i in range(len(self)):
            values = {name: column[i] for name, column in self.rows.items()}
            values["completion_ids"] = self.completion_ids[ends[i] : ends[i + 1]].tolist()
            values["behaviour_logprobs"] = logprobs[ends[i] : ends[i + 1]].tolist()
            out.append(RolloutRecord.prechecked(**self.common, **values))
        return out


def audit_probability(streak: int, config: AuditConfig) -> float:
    """BOINC: 1 below `always_below_streak` valid batches, then max(1/streak, min_rate)."""
    if streak < config.always_below_streak or streak <= 0:
        return 1.0
    return max(1.0 / streak, config.min_rate)


def should_audit(streak: int, config: AuditConfig, rng: random.Random) -> bool:
    """Draw the audit decision for one batch."""
    return rng.random() < audit_probability(streak, config)
