"""Stored rows to contract messages (one function per message, no logic beyond mapping)."""

from __future__ import annotations

import json
from typing import Any

from coderepair.coordinator.service.gate import Refusal, reason_value
from coderepair.coordinator.storage.audits import audit_metrics
from coderepair.coordinator.storage.models import (
    AuditJob,
    AuditKind,
    AuditState,
    Batch,
    BatchState,
    PolicyVersion,
    Run,
    Worker,
    WorkerState,
)
from coderepair.v1 import admin_pb2, common_pb2, worker_pb2

__all__ = [
    "audit_info",
    "batch_status",
    "capabilities_dict",
    "policy_info",
    "run_summary",
    "submit_response",
    "worker_info",
    "worker_state",
    "worker_status",
]

_WORKER_STATE = {
    WorkerState.ACTIVE: common_pb2.WORKER_STATE_ACTIVE,
    WorkerState.BANNED: common_pb2.WORKER_STATE_BANNED,
}
_BATCH_STATE = {
    BatchState.PENDING_AUDIT: common_pb2.BATCH_STATE_PENDING_AUDIT,
    BatchState.ACCEPTED: common_pb2.BATCH_STATE_ACCEPTED,
    BatchState.REJECTED: common_pb2.BATCH_STATE_REJECTED,
    BatchState.VOIDED: common_pb2.BATCH_STATE_VOIDED,
}
_AUDIT_KIND = {
    AuditKind.PROOF: admin_pb2.AUDIT_KIND_PROOF,
    AuditKind.SAMPLING: admin_pb2.AUDIT_KIND_SAMPLING,
    AuditKind.REWARD: admin_pb2.AUDIT_KIND_REWARD,
}
_AUDIT_VERDICT = {
    AuditState.PENDING: admin_pb2.AUDIT_VERDICT_PENDING,
    AuditState.CLAIMED: admin_pb2.AUDIT_VERDICT_PENDING,
    AuditState.PASSED: admin_pb2.AUDIT_VERDICT_PASSED,
    AuditState.FAILED: admin_pb2.AUDIT_VERDICT_FAILED,
    AuditState.ERROR: admin_pb2.AUDIT_VERDICT_ERROR,
}
#: Contract verdict -> stored states, for the ListAudits filter.
AUDIT_STATES_FOR_VERDICT = {
    admin_pb2.AUDIT_VERDICT_PENDING: (AuditState.PENDING, AuditState.CLAIMED),
    admin_pb2.AUDIT_VERDICT_PASSED: (AuditState.PASSED,),
    admin_pb2.AUDIT_VERDICT_FAILED: (AuditState.FAILED,),
    admin_pb2.AUDIT_VERDICT_ERROR: (AuditState.ERROR,),
}
WORKER_STATE_FROM_PROTO = {v: k for k, v in _WORKER_STATE.items()}


def worker_state(state: WorkerState) -> Any:
    return _WORKER_STATE[state]


def run_summary(run: Run) -> common_pb2.RunSummary:
    return common_pb2.RunSummary(
        run_id=run.run_id,
        trainer_public_key=run.trainer_public_key,
        base_model_id=run.base_model_id,
        tokenizer_sha256=run.tokenizer_sha256,
        latest_policy_version=run.latest_policy_version,
        group_size=run.group_size,
        reward_spec_hash=run.reward_spec_hash,
        max_policy_lag=run.max_policy_lag,
    )


def capabilities_dict(caps: common_pb2.WorkerCapabilities) -> dict[str, Any]:
    return {
        "engine": caps.engine,
        "engine_version": caps.engine_version,
        "device": caps.device,
        "accelerator_memory_bytes": caps.accelerator_memory_bytes,
        "max_model_len": caps.max_model_len,
        "max_concurrent_samples": caps.max_concurrent_samples,
        "sandbox": int(caps.sandbox),
    }


def _capabilities(worker: Worker) -> common_pb2.WorkerCapabilities:
    try:
        data = json.loads(worker.capabilities_json)
        return common_pb2.WorkerCapabilities(**data)
    except (ValueError, TypeError):
        # Rows written by an older coordinator may carry other keys: show none then.
        return common_pb2.WorkerCapabilities()


def worker_info(worker: Worker, *, online: bool) -> admin_pb2.WorkerInfo:
    info = admin_pb2.WorkerInfo(
        worker_id=worker.worker_id,
        public_key=worker.public_key,
        display_name=worker.display_name,
        state=worker_state(worker.state),
        online=online,
        registered_unix_ms=worker.registered_unix_ms,
        last_seen_unix_ms=worker.last_seen_unix_ms,
        capabilities=_capabilities(worker),
        client_version=worker.client_version,
        valid_streak=worker.valid_streak,
        audits_failed=worker.audits_failed,
        batches_accepted=worker.batches_accepted,
        batches_rejected=worker.batches_rejected,
        batches_voided=worker.batches_voided,
        credit_granted=worker.credit_granted,
        credit_pending=worker.credit_pending,
        ban_reason=worker.ban_reason or "",
    )
    if worker.banned_until_unix_ms is not None:
        info.banned_until_unix_ms = worker.banned_until_unix_ms
    return info


def worker_status(worker: Worker) -> worker_pb2.WorkerStatus:
    return worker_pb2.WorkerStatus(
        worker_id=worker.worker_id,
        state=worker_state(worker.state),
        valid_streak=worker.valid_streak,
        credit_granted=worker.credit_granted,
        credit_pending=worker.credit_pending,
        batches_accepted=worker.batches_accepted,
        batches_rejected=worker.batches_rejected,
        batches_voided=worker.batches_voided,
    )


def _stored_rejection(batch: Batch) -> common_pb2.Rejection:
    return common_pb2.Rejection(
        reason=reason_value(batch.rejection_reason or ""),
        message=(batch.rejection_message or "")[:1024],
    )


def batch_status(batch: Batch) -> worker_pb2.BatchStatus:
    status = worker_pb2.BatchStatus(batch_id=batch.batch_id, state=_BATCH_STATE[batch.state])
    if batch.state in (BatchState.REJECTED, BatchState.VOIDED):
        status.rejection.CopyFrom(_stored_rejection(batch))
    return status


def submit_response(batch: Batch, *, replayed: bool) -> worker_pb2.SubmitRolloutsResponse:
    """The answer for a stored batch; a retry gets the same verdict as the original
    (a batch voided since is reported as accepted: that was the verdict at submission)."""
    response = worker_pb2.SubmitRolloutsResponse(
        batch_id=batch.batch_id, replayed_response=replayed
    )
    if batch.state is BatchState.REJECTED:
        response.accepted = False
        response.rejection.CopyFrom(_stored_rejection(batch))
    else:
        response.accepted = True
        response.audit_pending = batch.audit_pending
    return response


def refused_response(refusal: Refusal) -> worker_pb2.SubmitRolloutsResponse:
    """The in-band answer for a batch refused without being stored."""
    return worker_pb2.SubmitRolloutsResponse(accepted=False, rejection=refusal.to_proto())


def policy_info(policy: PolicyVersion) -> common_pb2.PolicyInfo:
    shards = [
        common_pb2.ShardLocation(
            name=s["name"],
            urls=list(s["urls"]),
            size_bytes=int(s["size_bytes"]),
            sha256=s["sha256"],
            urls_expire_unix_ms=int(s.get("urls_expire_unix_ms", 0)),
        )
        for s in json.loads(policy.shards_json)
    ]
    return common_pb2.PolicyInfo(
        run_id=policy.run_id,
        version=policy.version,
        manifest_json=policy.manifest_json,
        shards=shards,
    )


def audit_info(job: AuditJob) -> admin_pb2.AuditInfo:
    return admin_pb2.AuditInfo(
        audit_id=job.job_id,
        batch_id=job.batch_id,
        worker_id=job.worker_id,
        kind=_AUDIT_KIND[job.kind],
        verdict=_AUDIT_VERDICT[job.state],
        detail=job.detail,
        metrics=audit_metrics(job),
        created_unix_ms=job.created_unix_ms,
        finished_unix_ms=job.finished_unix_ms or 0,
    )
