"""Audits: the `Auditor` interface and the in-process loop that runs audit jobs.

A batch sampled for audit (BOINC rate, `validation.audit_probability`) gets one job per
configured kind. The `AuditLoop` claims jobs (`storage.audits.claim_audit_jobs`: SKIP
LOCKED on PostgreSQL, so several coordinators or validator processes share the queue),
loads the batch's Parquet records, runs the auditor in a thread and records the verdict
(`finish_audit_job`): a failure voids the batch, resets the worker's streak and, at
``audit.max_failed_audits``, bans the key. An auditor that raises, or a batch whose
record cannot be read, is an ERROR verdict: retried, never held against the worker.

Auditors:
- `ConsistencyAuditor` (the default): what can be re-derived without a model or a
  sandbox. For REWARD jobs: the reward terms are the ones `compute_reward` can produce
  for the run's spec, the malformed case is exactly the spec's malformed reward, the
  length penalty matches the completion's token count, and the total is their clamped
  sum. PROOF and SAMPLING jobs need the policy's weights: it answers ERROR for them.
- `coderepair.coordinator.service.auditor.ModelAuditor`: the full audit (TOPLOC prefill
  + sampling replay through `coderepair.worker.validator` with the policy version
  loaded, and the reward re-run in the coordinator's sandbox), through the same
  interface; `build_auditor` there picks one from ``audit.auditor``.

Every finished job is counted on the context's `CoordinatorMetrics` (verdicts by kind,
batches voided by reason), which the dashboard's /metrics serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from coderepair.coordinator.service.context import ServiceContext
from coderepair.coordinator.service.scheduler import PooledTask
from coderepair.coordinator.storage import audits, batches
from coderepair.coordinator.storage.errors import JobNotClaimedError
from coderepair.coordinator.storage.models import AuditJob, AuditKind, AuditState
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.reward import RewardSpec
from coderepair.protocol.rollout import RolloutRecord, from_parquet_bytes

__all__ = [
    "AuditLoop",
    "AuditRequest",
    "AuditResult",
    "Auditor",
    "ConsistencyAuditor",
]

log = logging.getLogger(__name__)

Verdict = Literal["passed", "failed", "error"]
_VERDICT_STATE = {
    "passed": AuditState.PASSED,
    "failed": AuditState.FAILED,
    "error": AuditState.ERROR,
}
# Every term `compute_reward` can emit.
_TERMS = frozenset(
    {
        "malformed",
        "pass",
        "not_applied",
        "fail",
        "tests",
        "well_formed",
        "search_found",
        "similarity",
        "length_penalty",
    }
)
_TOLERANCE = 1e-9
# The rejection reason a failed audit voids its batch with (as storage.audits records it).
_VOID_REASON = {
    AuditKind.PROOF: "AUDIT_PROOF",
    AuditKind.SAMPLING: "AUDIT_SAMPLING",
    AuditKind.REWARD: "AUDIT_REWARD",
}


@dataclass(frozen=True)
class AuditRequest:
    """One audit job with everything an auditor may need."""

    job_id: str
    kind: AuditKind
    batch_id: str
    worker_id: str
    run_id: str
    policy_version: int
    reward_spec: RewardSpec
    records: Sequence[RolloutRecord]
    temperature: float = 1.0
    """The run's sampling temperature (every lease of the run uses it)."""
    tasks: Mapping[str, PooledTask] = field(default_factory=dict)
    """The leased tasks of the batch, from the run's pool: the prompt token ids the
    coordinator handed out (not the worker's copy) and the task itself."""


@dataclass(frozen=True)
class AuditResult:
    """An auditor's verdict: ``failed`` voids the batch; ``error`` retries the audit."""

    verdict: Verdict
    detail: str
    metrics: Mapping[str, float] = field(default_factory=dict)


class Auditor(Protocol):
    """Re-checks one batch for one audit kind. Called in a worker thread; may block."""

    def __call__(self, request: AuditRequest) -> AuditResult: ...


class ConsistencyAuditor:
    """The model-free auditor (see the module docstring)."""

    def __call__(self, request: AuditRequest) -> AuditResult:
        if request.kind is not AuditKind.REWARD:
            return AuditResult(
                "error",
                f"{request.kind.value} audits need the policy's weights: run a validator "
                "with the model loaded, or set audit.kinds = ['reward']",
            )
        spec = request.reward_spec
        worst = 0.0
        for record in request.records:
            problem, delta = _reward_problem(record, spec)
            worst = max(worst, delta)
            if problem is not None:
                return AuditResult(
                    "failed",
                    f"task {record.task_id} sample {record.sample_index}: {problem}",
                    {"reward_delta": delta},
                )
        return AuditResult(
            "passed",
            f"{len(request.records)} rewards consistent with the run's spec (no sandbox re-run)",
            {"reward_delta": worst},
        )


def _reward_problem(record: RolloutRecord, spec: RewardSpec) -> tuple[str | None, float]:
    components = record.reward_components
    unknown = set(components) - _TERMS
    if unknown:
        return f"reward terms {sorted(unknown)} are not ones the reward spec defines", 0.0
    if "malformed" in components:
        if components != {"malformed": spec.malformed_reward} or record.patch:
            return "a malformed completion has exactly the spec's malformed reward", 0.0
    elif not record.patch:
        return "a completion without a patch is malformed, but was not scored as such", 0.0
    if spec.length_budget_tokens is not None and "malformed" not in components:
        over = max(0, len(record.completion_ids) - spec.length_budget_tokens)
        penalty = min(spec.length_penalty_max, spec.length_penalty_per_token * over)
        expected = -penalty if penalty else 0.0
        if abs(components.get("length_penalty", math.nan) - expected) > _TOLERANCE:
            return (
                f"length_penalty should be {expected} for {len(record.completion_ids)} tokens",
                0.0,
            )
    total = spec.clamped_total(components.values())
    delta = abs(total - record.reward)
    if delta > _TOLERANCE * max(1.0, abs(total)):
        return f"reward {record.reward} differs from its terms' total {total}", delta
    return None, delta


class AuditLoop:
    """Claims audit jobs and runs an `Auditor` on them until stopped."""

    def __init__(
        self, ctx: ServiceContext, auditor: Auditor, validator_id: str, *, claim_limit: int = 8
    ) -> None:
        self._ctx = ctx
        self._auditor = auditor
        self._validator_id = validator_id
        # Jobs claimed at once: a claim held while earlier jobs run is work other
        # validators cannot take, so slow (model) auditors claim few.
        self._claim_limit = claim_limit

    async def run_once(self, limit: int | None = None) -> int:
        """Claim and finish up to ``limit`` jobs (default: the loop's claim limit);
        returns how many were finished."""
        limit = self._claim_limit if limit is None else limit
        ctx = self._ctx
        config = ctx.config.audit
        jobs: list[AuditJob] = await ctx.call(
            audits.claim_audit_jobs,
            ctx.db,
            self._validator_id,
            now_ms=ctx.now_ms(),
            limit=limit,
            claim_ttl_ms=int(config.claim_ttl_s * 1000),
            max_attempts=config.max_attempts,
        )
        for job in jobs:
            result = await self._audit(job)
            try:
                outcome = await ctx.call(
                    audits.finish_audit_job,
                    ctx.db,
                    job.job_id,
                    self._validator_id,
                    verdict=_VERDICT_STATE[result.verdict],
                    detail=result.detail[:4000],
                    metrics={k: float(v) for k, v in result.metrics.items()},
                    now_ms=ctx.now_ms(),
                    max_failed_audits=config.max_failed_audits,
                )
            except JobNotClaimedError:
                log.warning("audit %s: claim lost before the verdict; dropped", job.job_id)
                continue
            ctx.metrics.record_audit(job.kind.value, _VERDICT_STATE[result.verdict].value)
            if outcome.batch_voided:
                ctx.metrics.record_voided(_VOID_REASON[job.kind])
            if outcome.worker_banned:
                log.warning("worker %s banned after failed audits", job.worker_id)
        return len(jobs)

    async def _audit(self, job: AuditJob) -> AuditResult:
        ctx = self._ctx
        try:
            batch = await ctx.call(batches.get_batch, ctx.db, job.batch_id)
            if batch is None or batch.object_key is None or batch.run_id is None:
                return AuditResult("error", f"batch {job.batch_id} has no stored record")
            state = ctx.runs.get(batch.run_id)
            if state is None:
                return AuditResult("error", f"run {batch.run_id} is not served here")
            data = await ctx.call(ctx.objects.get, batch.object_key)
            records = await asyncio.to_thread(from_parquet_bytes, data)
            request = AuditRequest(
                job_id=job.job_id,
                kind=job.kind,
                batch_id=job.batch_id,
                worker_id=job.worker_id,
                run_id=batch.run_id,
                policy_version=batch.policy_version,
                reward_spec=state.reward_spec,
                records=records,
                temperature=state.config.temperature,
                tasks={
                    r.task_id: pooled
                    for r in records
                    if (pooled := state.pool.get(r.task_id)) is not None
                },
            )
            return await asyncio.to_thread(self._auditor, request)
        except ProtocolError as exc:
            return AuditResult("error", f"the batch's record could not be read: {exc}")
        except Exception as exc:
            log.exception("auditor failed on job %s", job.job_id)
            return AuditResult("error", f"the auditor failed: {type(exc).__name__}: {exc}")

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Loop until ``stop`` is set; sleeps ``audit.poll_s`` when the queue is empty."""
        poll = self._ctx.config.audit.poll_s
        while not stop.is_set():
            try:
                done = await self.run_once()
            except Exception:
                log.exception("audit loop iteration failed; retrying")
                done = 0
            if done == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=poll)
