"""Audit jobs, verdicts, voiding, bans, the audit window and credit.

Validators (in-process, or `coderepair-coordinator validator` processes, several per
database) claim jobs with `claim_audit_jobs`. On PostgreSQL the claim selects with
`FOR UPDATE SKIP LOCKED`: a job row another claimer has locked is skipped rather than
waited on, and the claimer marks its rows CLAIMED before committing, so no job is ever
handed to two claimers while each claimer still gets work at once. On SQLite the claim
runs under BEGIN IMMEDIATE (one writer), which gives the same exclusivity. A claim has
an expiry: a job held by a validator that died is claimable again after it, and a
verdict from the old holder is then refused (`JobNotClaimedError`).

Reputation (BOINC): a failed audit voids the batch (and the key's unaudited batches
sent before it, still in their window), resets the worker's streak and counts against
it; `max_failed_audits` failures ban the key. A batch whose audit window closed and that
a passed audit vouches for (its own, or for a batch the sampler skipped, one of a later
batch of the same key) becomes ACCEPTED, its credit moves from pending to granted and
the worker's streak grows by one. The sampling *rate* (1/streak) is the
validation pipeline's decision, not stored here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy import ColumnElement, Table, and_, bindparam, exists, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from coderepair.coordinator.storage.db import Database, Dialect
from coderepair.coordinator.storage.errors import JobNotClaimedError, NotFoundError
from coderepair.coordinator.storage.models import (
    AuditJob,
    AuditKind,
    AuditState,
    Batch,
    BatchState,
    CreditEntry,
    CreditKind,
    Lease,
    LeaseState,
    Rollout,
    Worker,
    WorkerState,
)
from coderepair.coordinator.storage.repo import canonical_json, new_id

__all__ = [
    "STRIKE_REASONS",
    "AuditOutcome",
    "audit_metrics",
    "ban_worker",
    "claim_audit_jobs",
    "close_audit_windows",
    "finish_audit_job",
    "list_audit_jobs",
    "strike",
    "unban_worker",
    "void_batch",
]

_FAILED_REASON = {
    AuditKind.PROOF: "AUDIT_PROOF",
    AuditKind.SAMPLING: "AUDIT_SAMPLING",
    AuditKind.REWARD: "AUDIT_REWARD",
}


def _skip_locked(db: Database) -> bool:
    return db.dialect is Dialect.POSTGRESQL


def claim_audit_jobs(
    db: Database,
    validator_id: str,
    *,
    now_ms: int,
    limit: int,
    claim_ttl_ms: int,
    kinds: Sequence[AuditKind] | None = None,
    max_attempts: int = 3,
) -> list[AuditJob]:
    """Claim up to `limit` audit jobs for `validator_id`, oldest first.

    Claimable: PENDING; CLAIMED with an expired claim; ERROR with fewer than
    `max_attempts` attempts. Only jobs of batches still in their audit window.
    """
    claimable = or_(
        AuditJob.state == AuditState.PENDING,
        and_(AuditJob.state == AuditState.CLAIMED, AuditJob.claim_expires_unix_ms < now_ms),
        and_(AuditJob.state == AuditState.ERROR, AuditJob.attempts < max_attempts),
    )
    query = (
        select(AuditJob.job_id)
        .join(Batch, Batch.batch_id == AuditJob.batch_id)
        .where(claimable, Batch.state == BatchState.PENDING_AUDIT)
        .order_by(AuditJob.created_unix_ms, AuditJob.job_id)
        .limit(limit)
    )
    if kinds is not None:
        query = query.where(AuditJob.kind.in_(list(kinds)))
    if _skip_locked(db):
        query = query.with_for_update(of=AuditJob, skip_locked=True)
    with db.write() as session:
        ids = list(session.scalars(query))
        if not ids:
            return []
        session.execute(
            update(AuditJob)
            .where(AuditJob.job_id.in_(ids))
            .values(
                state=AuditState.CLAIMED,
                claimed_by=validator_id,
                claimed_unix_ms=now_ms,
                claim_expires_unix_ms=now_ms + claim_ttl_ms,
                attempts=AuditJob.attempts + 1,
            )
        )
        jobs = session.scalars(
            select(AuditJob).where(AuditJob.job_id.in_(ids)).order_by(AuditJob.created_unix_ms)
        )
        return list(jobs)


@dataclass(frozen=True)
class AuditOutcome:
    """What a verdict changed."""

    job: AuditJob
    batch_voided: bool
    worker_banned: bool


def finish_audit_job(
    db: Database,
    job_id: str,
    validator_id: str,
    *,
    verdict: AuditState,
    detail: str,
    metrics: Mapping[str, float],
    now_ms: int,
    max_failed_audits: int,
) -> AuditOutcome:
    """Record a verdict (PASSED, FAILED or ERROR) for a job this validator holds.

    FAILED voids the batch and updates the worker's reputation in the same transaction,
    banning the key at `max_failed_audits` failures. ERROR (the audit itself broke) is
    never held against the worker: the job becomes claimable again.
    """
    if verdict not in (AuditState.PASSED, AuditState.FAILED, AuditState.ERROR):
        raise JobNotClaimedError(f"a verdict is passed, failed or error, not {verdict.value}")
    with db.write() as session:
        finished = session.execute(
            update(AuditJob)
            .where(
                AuditJob.job_id == job_id,
                AuditJob.state == AuditState.CLAIMED,
                AuditJob.claimed_by == validator_id,
            )
            .values(
                state=verdict,
                detail=detail,
                metrics_json=canonical_json(dict(metrics)),
                finished_unix_ms=now_ms,
            )
        )
        job = session.get(AuditJob, job_id)
        if job is None:
            raise NotFoundError(f"no audit job {job_id!r}")
        if finished.rowcount != 1:  # type: ignore[attr-defined]
            raise JobNotClaimedError(
                f"audit job {job_id} is {job.state.value}, held by {job.claimed_by!r}, not by "
                f"{validator_id!r}: its claim expired or it was finished; drop the result"
            )
        session.refresh(job)
        voided = banned = False
        if verdict is AuditState.FAILED:
            # Lock order: job (above), then worker, then batch (see repo.py).
            _lock_worker(session, job.worker_id)
            voided = _void(
                session,
                job.batch_id,
                _FAILED_REASON[job.kind],
                f"{job.kind.value} audit failed: {detail}",
                now_ms,
            )
            _void_unvouched(session, job, now_ms)
            banned = _count_failure(session, job.worker_id, max_failed_audits, now_ms)
        return AuditOutcome(job=job, batch_voided=voided, worker_banned=banned)


def _void_unvouched(session: Session, job: AuditJob, now_ms: int) -> int:
    """After a failed audit: void the key's batches the sampler skipped that were sent
    no later than the failed one and are still in their window. No passed audit vouches
    for them (`close_audit_windows`), and the key just proved it sends cheating batches;
    an honest key loses little (credit, rows not yet streamed), a cheater that built a
    streak loses the batches it sent unaudited."""
    failed_ms = select(Batch.created_unix_ms).where(Batch.batch_id == job.batch_id)
    skipped = session.scalars(
        select(Batch.batch_id).where(
            Batch.worker_id == job.worker_id,
            Batch.state == BatchState.PENDING_AUDIT,
            ~Batch.audit_pending,
            Batch.created_unix_ms <= failed_ms.scalar_subquery(),
        )
    ).all()
    reason = _FAILED_REASON[job.kind]
    message = f"sent unaudited before batch {job.batch_id}, whose {job.kind.value} audit failed"
    return sum(_void(session, batch_id, reason, message, now_ms) for batch_id in skipped)


def _lock_worker(session: Session, worker_id: str) -> Worker:
    worker = session.get(Worker, worker_id, with_for_update=True)
    if worker is None:
        raise NotFoundError(f"no worker {worker_id!r}")
    return worker


def _void(session: Session, batch_id: str, reason: str, message: str, now_ms: int) -> bool:
    # The caller holds the batch's worker lock.
    batch = session.get(Batch, batch_id, with_for_update=True)
    if batch is None:
        raise NotFoundError(f"no batch {batch_id!r}")
    if batch.state is not BatchState.PENDING_AUDIT:
        # ACCEPTED batches are past their window; REJECTED/VOIDED have nothing to void.
        return False
    batch.state = BatchState.VOIDED
    batch.rejection_reason = reason
    batch.rejection_message = message
    batch.decided_unix_ms = now_ms
    session.execute(update(Rollout).where(Rollout.batch_id == batch_id).values(voided=True))
    session.execute(
        update(Worker)
        .where(Worker.worker_id == batch.worker_id)
        .values(
            credit_pending=Worker.credit_pending - batch.n_tokens,
            batches_voided=Worker.batches_voided + 1,
        )
    )
    session.add(
        CreditEntry(
            worker_id=batch.worker_id,
            batch_id=batch_id,
            kind=CreditKind.VOID,
            pending_delta=-batch.n_tokens,
            granted_delta=0,
            created_unix_ms=now_ms,
        )
    )
    return True


def void_batch(db: Database, batch_id: str, reason: str, message: str, now_ms: int) -> bool:
    """Void a batch still in its audit window; False when it was not (nothing changed).
    Its rows not yet streamed are skipped by the trainer stream from now on."""
    with db.write() as session:
        worker_id = session.scalar(select(Batch.worker_id).where(Batch.batch_id == batch_id))
        if worker_id is None:
            raise NotFoundError(f"no batch {batch_id!r}")
        _lock_worker(session, worker_id)
        return _void(session, batch_id, reason, message, now_ms)


def _count_failure(session: Session, worker_id: str, max_failed: int, now_ms: int) -> bool:
    worker = _lock_worker(session, worker_id)
    worker.valid_streak = 0
    worker.audits_failed += 1
    if worker.state is WorkerState.ACTIVE and worker.audits_failed >= max_failed:
        reason = f"{worker.audits_failed} failed audits (limit {max_failed})"
        _ban(session, worker, reason, None, now_ms)
        # A key proven to cheat gets no credit for what it sent unaudited either: a worker
        # that built a streak and then cheated has most of its batches in that state.
        _void_pending(session, worker_id, reason, now_ms)
        return True
    return False


def _void_pending(session: Session, worker_id: str, reason: str, now_ms: int) -> int:
    """Void the worker's batches still in their audit window; returns how many."""
    pending = session.scalars(
        select(Batch.batch_id).where(
            Batch.worker_id == worker_id, Batch.state == BatchState.PENDING_AUDIT
        )
    ).all()
    return sum(
        _void(session, batch_id, "BANNED", f"worker banned: {reason}", now_ms)
        for batch_id in pending
    )


# Refusals of a signed batch that the worker program never earns, so only the key's
# holder can have sent them on purpose: malformed batches, batches for another key's
# lease, a second batch (under a new idempotency key) for a lease already submitted.
# Expired leases, stale versions and duplicates happen to honest workers too.
STRIKE_REASONS = frozenset({"STRUCTURAL", "NOT_LEASE_OWNER", "REPLAY"})


def strike(session: Session, worker_id: str, *, limit: int, window: int, now_ms: int) -> bool:
    """After a refusal in `STRIKE_REASONS`: ban the key (voiding its batches still in
    their audit window) when ``limit`` of its last ``window`` batches were such refusals.
    True when this call banned it. Runs in the transaction that stored the refusal."""
    if limit <= 0:
        return False
    recent = session.scalars(
        select(Batch.rejection_reason)
        .where(Batch.worker_id == worker_id)
        .order_by(Batch.created_unix_ms.desc())
        .limit(window)
    ).all()
    strikes = sum(reason in STRIKE_REASONS for reason in recent)
    if strikes < limit:
        return False
    worker = _lock_worker(session, worker_id)
    if worker.state is not WorkerState.ACTIVE:
        return False
    reason = (
        f"{strikes} of its last {len(recent)} batches were malformed, for another key's "
        f"lease or replayed (limit {limit})"
    )
    _ban(session, worker, reason, None, now_ms)
    _void_pending(session, worker_id, reason, now_ms)
    return True


def _ban(session: Session, worker: Worker, reason: str, until_ms: int | None, now_ms: int) -> None:
    worker.state = WorkerState.BANNED
    worker.ban_reason = reason
    worker.banned_until_unix_ms = until_ms
    session.execute(
        update(Lease)
        .where(Lease.worker_id == worker.worker_id, Lease.state == LeaseState.OPEN)
        .values(state=LeaseState.REVOKED, closed_unix_ms=now_ms)
    )


def ban_worker(
    db: Database,
    worker_id: str,
    *,
    reason: str,
    until_ms: int | None,
    void_pending: bool,
    now_ms: int,
) -> tuple[Worker, int]:
    """Ban a key: its open leases are revoked and, with `void_pending`, its batches still
    in their audit window are voided. Returns the worker and how many were voided."""
    with db.write() as session:
        worker = _lock_worker(session, worker_id)
        _ban(session, worker, reason, until_ms, now_ms)
        voided = _void_pending(session, worker_id, reason, now_ms) if void_pending else 0
        session.refresh(worker)
        return worker, voided


def unban_worker(db: Database, worker_id: str, now_ms: int) -> Worker:
    """Lift a ban; the streak restarts at 0, so every batch is audited again."""
    with db.write() as session:
        worker = _lock_worker(session, worker_id)
        worker.state = WorkerState.ACTIVE
        worker.ban_reason = None
        worker.banned_until_unix_ms = None
        worker.valid_streak = 0
        worker.last_seen_unix_ms = max(worker.last_seen_unix_ms, now_ms)
        return worker


_BATCHES = cast(Table, Batch.__table__)
_CREDIT = cast(Table, CreditEntry.__table__)
_WORKERS = cast(Table, Worker.__table__)
_GRANT = (
    update(_WORKERS)
    .where(_WORKERS.c.worker_id == bindparam("b_worker_id"))
    .values(
        credit_pending=_WORKERS.c.credit_pending - bindparam("n_tokens"),
        credit_granted=_WORKERS.c.credit_granted + bindparam("n_tokens"),
        valid_streak=_WORKERS.c.valid_streak + bindparam("n_batches"),
    )
)


def close_audit_windows(
    db: Database,
    *,
    now_ms: int,
    window_ms: int,
    audit_kinds: Sequence[AuditKind] = (),
    limit: int = 500,
) -> list[Batch]:
    """Accept batches whose audit window closed and that an audit vouches for: their
    pending credit is granted and the worker's streak grows by one. Returns the batches.

    A sampled batch is vouched for by its own audits, once every one passed. A batch
    the sampler skipped is vouched for by a later (or same-time) batch of the same key
    whose audits all passed. Without that, a key that built a long streak (audit rate
    1/streak) and then cheated in every batch kept each cheating batch that left its
    window before the first failed audit; now those wait, and the failed audit voids
    them (`finish_audit_job`). When a skipped batch's window closed and no audit of the
    key is outstanding that could vouch for it, and the key sent nothing for a whole
    window, `audit_kinds` are queued for its newest batch (one audit vouches for all the
    older ones), so a key that went quiet is still settled. (With a zero window that
    audits every batch: the window is also how long a skipped batch may wait.) With no
    `audit_kinds`, such batches are accepted unvouched (the coordinator runs no audits).

    "Vouched" cannot become false while a batch is pending (jobs are created with their
    batch or here, and a finished job stays finished; a failure voids the batch), so
    candidates are picked without locks; the state change is a conditional UPDATE after
    the workers are locked (in id order, so two replicas sweeping at once wait instead
    of deadlocking), and a batch another sweeper or a ban got first is left alone.
    """
    with db.write() as session:
        closed = and_(
            Batch.state == BatchState.PENDING_AUDIT,
            Batch.created_unix_ms <= now_ms - window_ms,
        )
        vouched = _vouched() if audit_kinds else or_(_vouched(), ~Batch.audit_pending)
        candidates = session.execute(
            select(Batch.batch_id, Batch.worker_id)
            .where(closed, vouched)
            .order_by(Batch.created_unix_ms)
            .limit(limit)
        ).all()
        if audit_kinds:
            _queue_vouching_audits(
                session, closed, kinds=audit_kinds, now_ms=now_ms, window_ms=window_ms, limit=limit
            )
        if not candidates:
            return []
        for worker_id in sorted({w for _, w in candidates}):
            _lock_worker(session, worker_id)
        # A few statements for the whole sweep, not a few per batch: the sweep holds the
        # write lock meanwhile, and every batch being submitted waits for it (one
        # statement per batch held it for tens of milliseconds under load).
        connection = session.connection()
        accepted = list(
            connection.execute(
                update(_BATCHES)
                .where(
                    _BATCHES.c.batch_id.in_([batch_id for batch_id, _ in candidates]),
                    _BATCHES.c.state == BatchState.PENDING_AUDIT,
                )
                .values(state=BatchState.ACCEPTED, decided_unix_ms=now_ms)
                .returning(_BATCHES.c.batch_id)
            ).scalars()
        )
        if not accepted:
            return []
        batches = list(
            session.scalars(
                select(Batch)
                .where(Batch.batch_id.in_(accepted))
                .execution_options(populate_existing=True)
            )
        )
        grants: dict[str, list[int]] = {}  # worker_id -> [tokens, batches]
        for batch in batches:
            tally = grants.setdefault(batch.worker_id, [0, 0])
            tally[0] += batch.n_tokens
            tally[1] += 1
        connection.execute(
            _GRANT,
            [{"b_worker_id": w, "n_tokens": n, "n_batches": k} for w, (n, k) in grants.items()],
        )
        connection.execute(
            insert(_CREDIT),
            [
                {
                    "worker_id": batch.worker_id,
                    "batch_id": batch.batch_id,
                    "kind": CreditKind.GRANT,
                    "pending_delta": -batch.n_tokens,
                    "granted_delta": batch.n_tokens,
                    "created_unix_ms": now_ms,
                }
                for batch in batches
            ],
        )
        return batches


def _all_passed(batch: type[Batch]) -> ColumnElement[bool]:
    """`batch` was sampled for audit and every one of its audits passed."""
    return and_(
        batch.audit_pending,
        ~exists().where(AuditJob.batch_id == batch.batch_id, AuditJob.state != AuditState.PASSED),
    )


def _vouched() -> ColumnElement[bool]:
    later = aliased(Batch)
    return or_(
        _all_passed(Batch),
        and_(
            ~Batch.audit_pending,
            exists().where(
                later.worker_id == Batch.worker_id,
                later.created_unix_ms >= Batch.created_unix_ms,
                later.state.in_((BatchState.PENDING_AUDIT, BatchState.ACCEPTED)),
                _all_passed(later),
            ),
        ),
    )


def _queue_vouching_audits(
    session: Session,
    closed: ColumnElement[bool],
    *,
    kinds: Sequence[AuditKind],
    now_ms: int,
    window_ms: int,
    limit: int,
) -> None:
    """Audit the newest pending batch of each key that has a skipped batch past its
    window, no vouch, no audit outstanding that could give one, and sent nothing for a
    whole window (a key still sending will be sampled again, at least at the minimum
    rate; auditing it now would turn the sampling rate into "every window")."""
    later = aliased(Batch)
    outstanding = exists().where(
        later.worker_id == Batch.worker_id,
        later.created_unix_ms >= Batch.created_unix_ms,
        later.state == BatchState.PENDING_AUDIT,
        later.audit_pending,
    )
    stranded = session.scalars(
        select(Batch.worker_id)
        .where(closed, ~Batch.audit_pending, ~_vouched(), ~outstanding)
        .distinct()
        .limit(limit)
    ).all()
    for worker_id in stranded:
        newest = session.scalar(
            select(Batch)
            .where(Batch.worker_id == worker_id, Batch.state == BatchState.PENDING_AUDIT)
            .order_by(Batch.created_unix_ms.desc(), Batch.batch_id.desc())
            .limit(1)
        )
        if newest is None or newest.audit_pending or newest.created_unix_ms > now_ms - window_ms:
            continue
        newest.audit_pending = True
        for kind in dict.fromkeys(kinds):
            session.add(
                AuditJob(
                    job_id=new_id(),
                    batch_id=newest.batch_id,
                    worker_id=worker_id,
                    kind=kind,
                    state=AuditState.PENDING,
                    attempts=0,
                    detail="",
                    metrics_json="{}",
                    created_unix_ms=now_ms,
                )
            )


def list_audit_jobs(
    db: Database,
    *,
    worker_id: str | None = None,
    batch_id: str | None = None,
    state: AuditState | None = None,
    limit: int = 100,
) -> list[AuditJob]:
    """Audit jobs, newest first, optionally filtered."""
    query = select(AuditJob).order_by(AuditJob.created_unix_ms.desc(), AuditJob.job_id)
    if worker_id is not None:
        query = query.where(AuditJob.worker_id == worker_id)
    if batch_id is not None:
        query = query.where(AuditJob.batch_id == batch_id)
    if state is not None:
        query = query.where(AuditJob.state == state)
    with db.read() as session:
        return list(session.scalars(query.limit(limit)))


def audit_metrics(job: AuditJob) -> dict[str, float]:
    """The metrics a verdict recorded."""
    return {str(k): float(v) for k, v in json.loads(job.metrics_json).items()}
