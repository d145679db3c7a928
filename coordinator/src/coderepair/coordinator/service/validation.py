"""Structural validation of a submitted batch, and the BOINC audit rate.

`check_batch` is the first stage of the pipeline (DESIGN.md, "Trust and validation"):
pure checks of a `SubmitPayload` against the lease it answers, the run and its task
pool, with no I/O. It returns the batch as `RolloutRecord`s (which validate themselves
again) or raises `Refusal` naming the stage, and the task and sample it is about.
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

from coderepair.coordinator.config import AuditConfig
from coderepair.coordinator.service.gate import Refusal
from coderepair.coordinator.storage.models import Lease, LeaseState
from coderepair.coordinator.storage.repo import LeaseTask
from coderepair.protocol.proofs import proof_size
from coderepair.protocol.reward import RewardSpec
from coderepair.protocol.rollout import RolloutRecord, RolloutSchemaError
from coderepair.v1 import common_pb2, worker_pb2

__all__ = [
    "IDEMPOTENCY_KEY_RE",
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


def check_envelope_fields(payload: worker_pb2.SubmitPayload) -> None:
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


def _check_sample(
    sample: common_pb2.RolloutSample, seeds: Sequence[int], prompt: list[int], max_new: int
) -> tuple[list[int], list[float]]:
    """Checks of one sample's own fields; returns its completion ids and logprobs as
    lists (the record holds them: each repeated field is converted once, and the checks
    run over the lists, where max() and sum() are C loops over plain objects; over the
    protobuf containers the same checks cost twice as much)."""
    # `prompt` is a list: a protobuf repeated field compares equal to a list, not a tuple.
    task_id, index = sample.task_id, sample.sample_index

    def fail(message: str) -> Refusal:
        return _structural(
            f"task {task_id} sample {index}: {message}", task_id=task_id, index=index
        )

    if sample.seed != seeds[index]:
        raise fail("seed differs from the lease's: use seeds[sample_index] of the lease")
    if sample.prompt_token_ids != prompt:
        raise fail("prompt_token_ids differ from the lease's: feed the engine the lease's ids")
    completion = list(sample.completion_token_ids)
    n = len(completion)
    if not 1 <= n <= max_new:
        raise fail(f"has {n} completion tokens; the lease allows 1 to {max_new}")
    if max(completion) > MAX_TOKEN_ID:
        raise fail(f"completion_token_ids hold an id above {MAX_TOKEN_ID}: not a token id")
    if not _HEX64.fullmatch(sample.test_log_sha256):
        raise fail("test_log_sha256 must be 64 lowercase hex digits (the log's sha256)")
    logprobs = list(sample.behaviour_logprobs)  # doubles: floats
    if len(logprobs) != n:
        raise fail(f"has {len(logprobs)} behaviour logprobs for {n} tokens: one each")
    # C loops: this runs for every token the coordinator ingests. A NaN or an infinity
    # makes the (double) sum non-finite, and float32 values cannot overflow it; the exact
    # scan runs only to name the bad value.
    if not (math.isfinite(sum(logprobs)) and max(logprobs) <= _LOGPROB_SLACK):
        bad = next(lp for lp in logprobs if not math.isfinite(lp) or lp > _LOGPROB_SLACK)
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
    return completion, logprobs


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
    total = min(spec.pass_reward, max(spec.malformed_reward, math.fsum(components.values())))
    if abs(total - reward) > _REWARD_TOLERANCE * max(1.0, abs(reward)):
        raise _structural(
            f"task {task_id} sample {index}: reward {reward} is not the clamped sum of its "
            f"components ({total}): report the reward compute_reward returned",
            task_id=task_id,
            index=index,
        )


def check_batch(
    payload: worker_pb2.SubmitPayload,
    view: LeaseView,
    *,
    run_id: str,
    worker_key_hex: str,
    group_size: int,
    max_new_tokens: int,
    reward_spec: RewardSpec,
    reward_spec_hash: str,
    now_ms: int,
) -> list[RolloutRecord]:
    """The batch as rollout records, or `Refusal`. Exactly group_size samples per task
    of the lease, indices 0..G-1 each, seeds and prompts as leased, sizes in limits."""
    lease = view.lease
    if payload.policy_version != lease.policy_version:
        raise Refusal(
            R.REJECTION_REASON_STALE_POLICY,
            f"the batch says policy version {payload.policy_version} but lease "
            f"{lease.lease_id} is for version {lease.policy_version}: generate with the "
            "lease's version",
        )
    seeds = {t.task_id: t.seeds for t in view.tasks}
    expected = len(seeds) * group_size
    if len(payload.samples) != expected:
        raise _structural(
            f"the batch has {len(payload.samples)} samples; lease {lease.lease_id} has "
            f"{len(seeds)} task(s) x group size {group_size} = {expected}"
        )
    # One list per task, shared by its G records: compared to each sample's ids as is.
    prompts = {task_id: list(view.prompts[task_id]) for task_id in seeds}
    seen: set[tuple[str, int]] = set()
    records = []
    for sample in payload.samples:
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
        completion, logprobs = _check_sample(
            sample, seeds[task_id], prompts[task_id], max_new_tokens
        )
        _check_reward(sample, reward_spec)
        timings = sample.timings
        try:
            # Every field checked above, or the lease's, the run's or the signer's.
            records.append(
                RolloutRecord.prechecked(
                    task_id=task_id,
                    lease_id=lease.lease_id,
                    run_id=run_id,
                    worker_key=worker_key_hex,
                    policy_version=int(payload.policy_version),
                    sample_index=int(index),
                    seed=int(sample.seed),
                    prompt_ids=prompts[task_id],
                    completion_ids=completion,
                    behaviour_logprobs=logprobs,
                    completion_text=sample.completion_text,
                    patch=sample.patch,
                    reward=float(sample.reward),
                    reward_components=dict(sample.reward_components),
                    reward_spec_hash=reward_spec_hash,
                    test_log_sha256=sample.test_log_sha256,
                    proof=bytes(sample.proof),
                    timings={
                        "generate": timings.generate_ms / 1000.0,
                        "reward": timings.reward_ms / 1000.0,
                        "proof": timings.proof_ms / 1000.0,
                    },
                    created_at_ms=now_ms,
                )
            )
        except RolloutSchemaError as exc:
            raise _structural(
                f"task {task_id} sample {index}: {exc}", task_id=task_id, index=index
            ) from exc
    return records


def audit_probability(streak: int, config: AuditConfig) -> float:
    """BOINC: 1 below `always_below_streak` valid batches, then max(1/streak, min_rate)."""
    if streak < config.always_below_streak or streak <= 0:
        return 1.0
    return max(1.0 / streak, config.min_rate)


def should_audit(streak: int, config: AuditConfig, rng: random.Random) -> bool:
    """Draw the audit decision for one batch."""
    return rng.random() < audit_probability(streak, config)
