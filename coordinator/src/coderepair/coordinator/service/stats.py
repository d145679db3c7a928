"""Read-only queries over the store: network figures and the lists operators look at.

`collect_stats` is the one function the admin service, the admin CLI and the web
dashboard / Prometheus exporter share: workers online, rollouts accepted and rejected
by reason, validator backlog, policy versions and cursors. It takes a `Database` and
the coordinator's clock, so it runs in any process that can reach the database.
Each function here is one read transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.models import (
    AuditJob,
    AuditState,
    Batch,
    BatchState,
    Lease,
    LeaseState,
    PolicyVersion,
    Rollout,
    Run,
    TrainerAck,
    Worker,
    WorkerState,
)

__all__ = [
    "NetworkStats",
    "RunProgress",
    "collect_stats",
    "lease_states",
    "list_workers",
    "online_cutoff_ms",
    "open_lease_tasks",
    "run_progress",
    "worker_and_batches",
    "workers_online",
]

DEFAULT_WINDOW_MS = 5 * 60 * 1000


def online_cutoff_ms(now_ms: int, heartbeat_interval_ms: int) -> int:
    """Workers seen after this instant are online (heartbeat within 3 intervals)."""
    return now_ms - 3 * heartbeat_interval_ms


@dataclass(frozen=True)
class RunProgress:
    """One run's cursors, policy and open leases."""

    run_id: str
    latest_policy_version: int
    head_cursor: int
    acked_cursor: int
    trainer_step: int
    open_leases: int
    created_unix_ms: int


@dataclass(frozen=True)
class NetworkStats:
    """Network-wide figures over a window (the admin service's GetStats)."""

    window_ms: int
    workers_online: int
    workers_banned: int
    workers_total: int
    leases_open: int
    audits_pending: int
    """Audit jobs not finished (pending, claimed, or errored and retried): the backlog."""
    batches_pending_audit: int
    """Batches with an audit not yet finished."""
    batches_accepted: int
    """Batches accepted (pending audit or final) within the window."""
    samples_accepted: int
    rollouts_per_second: float
    reward_mean: float
    rejections: dict[str, int] = field(default_factory=dict)
    """Batches rejected or voided within the window, by reason name (e.g. "DUPLICATE")."""
    runs: tuple[RunProgress, ...] = ()
    policy_versions: dict[str, list[int]] = field(default_factory=dict)
    """Published policy versions per run, oldest first."""


def _progress(session: Session, runs: Sequence[Run]) -> list[RunProgress]:
    acks = {a.run_id: a for a in session.scalars(select(TrainerAck))}
    open_counts = dict(
        session.execute(
            select(Lease.run_id, func.count())
            .where(Lease.state == LeaseState.OPEN)
            .group_by(Lease.run_id)
        ).all()
    )
    out = []
    for run in runs:
        ack = acks.get(run.run_id)
        out.append(
            RunProgress(
                run_id=run.run_id,
                latest_policy_version=run.latest_policy_version,
                head_cursor=run.head_cursor,
                acked_cursor=ack.acked_cursor if ack else 0,
                trainer_step=ack.trainer_step if ack else 0,
                open_leases=int(open_counts.get(run.run_id, 0)),
                created_unix_ms=run.created_unix_ms,
            )
        )
    return out


def run_progress(db: Database) -> list[RunProgress]:
    """Every run's progress, oldest run first."""
    with db.read() as session:
        runs = list(session.scalars(select(Run).order_by(Run.created_unix_ms, Run.run_id)))
        return _progress(session, runs)


def collect_stats(
    db: Database,
    *,
    now_ms: int,
    heartbeat_interval_ms: int,
    window_ms: int = DEFAULT_WINDOW_MS,
    run_id: str = "",
) -> NetworkStats:
    """The figures of the last `window_ms` (all runs, or only `run_id`)."""
    since = now_ms - window_ms
    with db.read() as session:

        def count(query: Any) -> int:
            return int(session.scalar(query) or 0)

        workers = dict(
            session.execute(select(Worker.state, func.count()).group_by(Worker.state)).all()
        )
        online = count(
            select(func.count())
            .select_from(Worker)
            .where(
                Worker.last_seen_unix_ms >= online_cutoff_ms(now_ms, heartbeat_interval_ms),
                Worker.state == WorkerState.ACTIVE,
            )
        )
        batch_filter = [Batch.decided_unix_ms >= since]
        rollout_filter = [Rollout.accepted_unix_ms >= since, Rollout.voided.is_(False)]
        lease_filter = [Lease.state == LeaseState.OPEN]
        if run_id:
            batch_filter.append(Batch.run_id == run_id)
            rollout_filter.append(Rollout.run_id == run_id)
            lease_filter.append(Lease.run_id == run_id)
        rejections = {
            str(reason): int(n)
            for reason, n in session.execute(
                select(Batch.rejection_reason, func.count())
                .where(
                    *batch_filter,
                    Batch.state.in_([BatchState.REJECTED, BatchState.VOIDED]),
                )
                .group_by(Batch.rejection_reason)
            ).all()
        }
        accepted = count(
            select(func.count())
            .select_from(Batch)
            .where(
                Batch.created_unix_ms >= since,
                Batch.state != BatchState.REJECTED,
                *batch_filter[1:],
            )
        )
        samples, reward_mean = session.execute(
            select(func.count(), func.avg(Rollout.reward)).where(*rollout_filter)
        ).one()
        unfinished = [
            AuditJob.state.in_([AuditState.PENDING, AuditState.CLAIMED, AuditState.ERROR]),
            Batch.state == BatchState.PENDING_AUDIT,
        ]
        audits_pending = count(
            select(func.count())
            .select_from(AuditJob)
            .join(Batch, Batch.batch_id == AuditJob.batch_id)
            .where(*unfinished)
        )
        pending_batches = count(
            select(func.count(func.distinct(AuditJob.batch_id)))
            .select_from(AuditJob)
            .join(Batch, Batch.batch_id == AuditJob.batch_id)
            .where(*unfinished)
        )
        leases_open = count(select(func.count()).select_from(Lease).where(*lease_filter))
        run_query = select(Run).order_by(Run.created_unix_ms, Run.run_id)
        if run_id:
            run_query = run_query.where(Run.run_id == run_id)
        runs = list(session.scalars(run_query))
        versions: dict[str, list[int]] = {r.run_id: [] for r in runs}
        for rid, version in session.execute(
            select(PolicyVersion.run_id, PolicyVersion.version).order_by(
                PolicyVersion.run_id, PolicyVersion.version
            )
        ):
            if rid in versions:
                versions[rid].append(int(version))
        return NetworkStats(
            window_ms=window_ms,
            workers_online=online,
            workers_banned=int(workers.get(WorkerState.BANNED, 0)),
            workers_total=int(sum(workers.values())),
            leases_open=leases_open,
            audits_pending=audits_pending,
            batches_pending_audit=pending_batches,
            batches_accepted=accepted,
            samples_accepted=int(samples or 0),
            rollouts_per_second=float(samples or 0) / (window_ms / 1000.0),
            reward_mean=float(reward_mean or 0.0),
            rejections=rejections,
            runs=tuple(_progress(session, runs)),
            policy_versions=versions,
        )


def workers_online(db: Database, *, now_ms: int, heartbeat_interval_ms: int) -> int:
    """Active workers with a heartbeat within 3 intervals."""
    with db.read() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Worker)
                .where(
                    Worker.last_seen_unix_ms >= online_cutoff_ms(now_ms, heartbeat_interval_ms),
                    Worker.state == WorkerState.ACTIVE,
                )
            )
            or 0
        )


def list_workers(
    db: Database,
    *,
    state: WorkerState | None,
    online_since_ms: int | None,
    offset: int,
    limit: int,
) -> list[Worker]:
    """Workers, newest activity first (one page)."""
    query = select(Worker).order_by(Worker.last_seen_unix_ms.desc(), Worker.worker_id)
    if state is not None:
        query = query.where(Worker.state == state)
    if online_since_ms is not None:
        query = query.where(Worker.last_seen_unix_ms >= online_since_ms)
    with db.read() as session:
        return list(session.scalars(query.offset(offset).limit(limit)))


def open_lease_tasks(
    db: Database, known: Mapping[str, Sequence[str]] | None = None
) -> dict[str, dict[str, list[str]]]:
    """Open leases by run: run_id -> lease_id -> task ids (for the task pools).

    ``known``: lease_id -> task ids the caller already has (the leases its pools bound);
    only the other open leases' task lists are read and parsed. A lease's tasks never
    change, and the sweep calls this every second: parsing every open lease's JSON (its
    seeds) each time cost a busy coordinator bursts of a few hundred milliseconds.
    """
    known = known or {}
    out: dict[str, dict[str, list[str]]] = {}
    with db.read() as session:
        unknown: list[str] = []
        for lease_id, run_id in session.execute(
            select(Lease.lease_id, Lease.run_id).where(Lease.state == LeaseState.OPEN)
        ):
            tasks = known.get(lease_id)
            if tasks is None:
                unknown.append(lease_id)
            out.setdefault(run_id, {})[lease_id] = list(tasks or ())
        for start in range(0, len(unknown), 500):
            for lease_id, run_id, tasks_json in session.execute(
                select(Lease.lease_id, Lease.run_id, Lease.tasks_json).where(
                    Lease.lease_id.in_(unknown[start : start + 500])
                )
            ):
                out[run_id][lease_id] = [t["task_id"] for t in json.loads(tasks_json)]
    return out


def lease_states(db: Database, lease_ids: Sequence[str]) -> dict[str, tuple[str, LeaseState]]:
    """lease_id -> (worker_id, state) for the leases that exist."""
    if not lease_ids:
        return {}
    with db.read() as session:
        return {
            lease_id: (worker_id, state)
            for lease_id, worker_id, state in session.execute(
                select(Lease.lease_id, Lease.worker_id, Lease.state).where(
                    Lease.lease_id.in_(list(lease_ids))
                )
            )
        }


def worker_and_batches(
    db: Database, worker_id: str, batch_ids: Sequence[str]
) -> tuple[Worker | None, dict[str, Batch]]:
    """The worker and those of `batch_ids` that are its, read in one transaction.

    A verdict voids a batch and updates (perhaps bans) its worker in one commit; two
    separate reads could show the batch voided beside the worker from before it. The
    batches are read first, so even under READ COMMITTED (PostgreSQL's default, where
    each statement has its own snapshot) the worker is never older than its batches.
    """
    with db.read() as session:
        found = (
            {
                b.batch_id: b
                for b in session.scalars(select(Batch).where(Batch.batch_id.in_(list(batch_ids))))
            }
            if batch_ids
            else {}
        )
        worker = session.get(Worker, worker_id)
        return worker, {b: batch for b, batch in found.items() if batch.worker_id == worker_id}
