"""Read-only figures for operators: one typed snapshot of the coordinator's database.

`collect_stats` runs a fixed set of aggregate queries in one read transaction and
returns a `StatsSnapshot` (frozen dataclasses, `to_json()` for /api/stats). The web page,
the JSON API and the Prometheus collector all render the same snapshot.

Scope. Worker-side figures (workers, batches and their outcomes, leases, audits, bans)
cover the whole coordinator: a batch refused before its lease was resolved has no run.
Run-side figures (rollouts/s, reward over time and per policy version, the policy
table) belong to one run: the one asked for, else the newest.

Cost. Every query is meant to read an index range, not a table, so a refresh costs the
same on a day-old and a year-old database (indexes named as in models.py):
- rollouts over time: `ix_rollouts_run_id_accepted_unix_ms`, a range of the history;
- batches over time: `ix_batches_state_created_unix_ms`. The query lists every state
  in an IN (...) so both engines can walk that index once per state (SQLite and
  PostgreSQL both descend a btree per IN value); without it the leading `state` column
  would make the index unusable for a time range;
- audit backlog, open leases, online workers: the (state, time) and last-seen indexes;
- reward per policy version: bounded below by the publication time of the oldest
  version shown (a rollout of version v was accepted after v was published) through
  the same (run, accepted) index. While the run has fewer versions than the table
  shows, this is a scan of the run's rollouts: see `_reward_by_version`.
The workers table is counted whole (registered and banned keys): it holds one row per
key, thousands, not millions.

Bucketing. Time buckets are aligned to multiples of the bucket width since the epoch
(not to "now"), so between two refreshes a bucket keeps its bounds and counts only grow;
the last bucket is partial and its rate is divided by the time elapsed in it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import BigInteger, case, func, literal, select
from sqlalchemy.orm import Session

from coderepair.coordinator.dashboard.config import StatsWindow
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
from coderepair.protocol.errors import ProtocolError

__all__ = [
    "ACCEPTED",
    "AuditBacklog",
    "BannedWorker",
    "BatchBucket",
    "DashboardError",
    "LeaseStats",
    "OnlineWorker",
    "PolicyRow",
    "RolloutBucket",
    "RunSummary",
    "StatsSnapshot",
    "UnknownRunError",
    "WorkerStats",
    "collect_stats",
]

ACCEPTED = "ACCEPTED"
"""Outcome key of batches that were accepted (in their audit window or past it); every
other outcome key is a rejection reason (`RejectionReason` name without prefix)."""

# A batch refused or voided without a recorded reason (should not happen; shown, not hidden).
_UNKNOWN_REASON = "UNKNOWN"
# Replicas' clocks differ a little: a rollout accepted by one replica may carry a time
# slightly before the publication time another replica wrote for its policy version.
_CLOCK_SLACK_MS = 60_000
# Audit job states that still need a validator (ERROR jobs are retried).
_BACKLOG_STATES = (AuditState.PENDING, AuditState.CLAIMED, AuditState.ERROR)


class DashboardError(ProtocolError):
    """A dashboard request cannot be answered as asked."""


class UnknownRunError(DashboardError):
    """The run asked for does not exist."""


# ---------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class RunSummary:
    """A run with its progress: how far acceptance and the trainer got."""

    run_id: str
    created_unix_ms: int
    latest_policy_version: int
    head_cursor: int
    """Last cursor handed out: rollouts accepted in the run's lifetime."""
    acked_cursor: int
    """Cursor the trainer checkpointed (back-pressure counts from the consumed one, which
    may be further: rows it dropped or holds while it waits)."""
    accepting_work: bool


@dataclass(frozen=True)
class OnlineWorker:
    """A worker seen within the online window, with its record."""

    worker_id: str
    display_name: str
    client_version: str
    last_seen_unix_ms: int
    valid_streak: int
    batches_accepted: int
    batches_rejected: int
    batches_voided: int
    credit_granted: int
    credit_pending: int


@dataclass(frozen=True)
class BannedWorker:
    """A key under a ban that is still in force."""

    worker_id: str
    display_name: str
    reason: str
    banned_until_unix_ms: int | None
    """None: banned until an operator lifts it."""
    audits_failed: int


@dataclass(frozen=True)
class WorkerStats:
    """Counts over all keys, and the listed online and banned ones."""

    registered: int
    online: int
    banned: int
    online_workers: tuple[OnlineWorker, ...]
    """Most recently seen first, at most `max_listed_workers`."""
    banned_workers: tuple[BannedWorker, ...]


@dataclass(frozen=True)
class LeaseStats:
    """Leases held right now."""

    open: int
    overdue: int
    """Open but past their deadline: the expiry sweep has not closed them yet."""


@dataclass(frozen=True)
class AuditBacklog:
    """Work waiting for validators."""

    pending: int
    claimed: int
    retrying: int
    """Jobs whose audit broke (ERROR) and that will be claimed again."""
    by_kind: Mapping[str, Mapping[str, int]]
    """kind ("proof", ...) -> state ("pending", "claimed", "error") -> jobs."""
    oldest_pending_unix_ms: int | None
    batches_in_audit_window: int
    """Accepted batches whose credit and final verdict wait for the audit window."""


@dataclass(frozen=True)
class RolloutBucket:
    """Rollouts of the run accepted in [start, start + bucket)."""

    start_unix_ms: int
    rollouts: int
    """Ingested rows, including those voided since."""
    voided: int
    tokens: int
    """Completion tokens of the rows not voided."""
    reward_mean: float | None
    """Mean reward of the rows not voided; None when there are none."""
    rate_per_s: float
    """rollouts / seconds of the bucket (elapsed seconds for the current bucket)."""


@dataclass(frozen=True)
class BatchBucket:
    """Batches (all runs) submitted in [start, start + bucket), by outcome."""

    start_unix_ms: int
    outcomes: Mapping[str, int]
    """`ACCEPTED` or a rejection reason -> batches; zero counts are left out."""


@dataclass(frozen=True)
class PolicyRow:
    """A published policy version and how its rollouts were rewarded."""

    version: int
    parent_version: int | None
    kind: str
    trainer_step: int
    trained_through_cursor: int
    published_unix_ms: int | None
    """None for version 0, the base model, which is never published."""
    rollouts: int
    """Rollouts of this version not voided."""
    reward_mean: float | None
    metrics: Mapping[str, float]
    """The trainer's metrics at publication (loss, ...), finite numbers only."""


@dataclass(frozen=True)
class StatsSnapshot:
    """Everything the operators' view shows, read at `generated_unix_ms`."""

    generated_unix_ms: int
    window: StatsWindow
    runs: tuple[RunSummary, ...]
    run_id: str | None
    """The run whose run-side figures these are; None when there is no run yet."""
    workers: WorkerStats
    leases: LeaseStats
    audits: AuditBacklog
    rollouts_per_s: float
    """Run's rollouts per second over the trailing rate window."""
    reward_mean_recent: float | None
    """Run's mean reward over the trailing rate window (rows not voided)."""
    rollout_series: tuple[RolloutBucket, ...]
    batch_series: tuple[BatchBucket, ...]
    outcome_totals: Mapping[str, int] = field(default_factory=dict)
    """Batches by outcome over the whole history window."""
    policies: tuple[PolicyRow, ...] = ()
    """Newest first, at most `max_policy_versions`, plus version 0 when it has rollouts
    in range."""

    def run(self) -> RunSummary | None:
        """The selected run's summary."""
        return next((r for r in self.runs if r.run_id == self.run_id), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (finite floats or null, string keys)."""
        out = asdict(self)
        out["window"] = self.window.model_dump()
        return out

    def to_json_bytes(self) -> bytes:
        """`to_json()` encoded as UTF-8 JSON."""
        return json.dumps(self.to_json(), allow_nan=False, separators=(",", ":")).encode()


# ---------------------------------------------------------------- queries


def collect_stats(
    db: Database, window: StatsWindow, *, now_ms: int, run_id: str | None = None
) -> StatsSnapshot:
    """Read the snapshot at `now_ms` for `run_id` (None: the newest run).

    `UnknownRunError` when `run_id` names no run.
    """
    bucket_ms = window.bucket_s * 1000
    # The first bucket starts on a multiple of the width; n buckets end with the one
    # holding now_ms.
    start_ms = (now_ms // bucket_ms - window.n_buckets + 1) * bucket_ms
    with db.read() as session:
        runs = _runs(session)
        if run_id is None:
            run_id = runs[-1].run_id if runs else None
        elif all(r.run_id != run_id for r in runs):
            raise UnknownRunError(
                f"no run {run_id!r} in this coordinator's database: pick one of "
                f"{[r.run_id for r in runs]}"
            )
        workers = _workers(session, window, now_ms)
        leases = _leases(session, now_ms)
        audits = _audits(session)
        batch_series, totals = _batch_series(session, start_ms, bucket_ms, window.n_buckets)
        if run_id is None:
            rollout_series: tuple[RolloutBucket, ...] = ()
            rate, recent_reward = 0.0, None
            policies: tuple[PolicyRow, ...] = ()
        else:
            rollout_series = _rollout_series(
                session,
                run_id,
                start_ms=start_ms,
                bucket_ms=bucket_ms,
                n_buckets=window.n_buckets,
                now_ms=now_ms,
            )
            rate, recent_reward = _recent(session, run_id, window, now_ms)
            policies = _policies(session, run_id, window.max_policy_versions)
    return StatsSnapshot(
        generated_unix_ms=now_ms,
        window=window,
        runs=tuple(runs),
        run_id=run_id,
        workers=workers,
        leases=leases,
        audits=audits,
        rollouts_per_s=rate,
        reward_mean_recent=recent_reward,
        rollout_series=rollout_series,
        batch_series=batch_series,
        outcome_totals=totals,
        policies=policies,
    )


def _finite(value: Any) -> float | None:
    # NULL averages, and any non-finite reward a row may hold, become "no value".
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _runs(session: Session) -> list[RunSummary]:
    rows = session.execute(
        select(
            Run.run_id,
            Run.created_unix_ms,
            Run.latest_policy_version,
            Run.head_cursor,
            func.coalesce(TrainerAck.acked_cursor, 0),
            Run.accepting_work,
        )
        .outerjoin(TrainerAck, TrainerAck.run_id == Run.run_id)
        .order_by(Run.created_unix_ms, Run.run_id)
    )
    return [
        RunSummary(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), bool(r[5])) for r in rows
    ]


def _workers(session: Session, window: StatsWindow, now_ms: int) -> WorkerStats:
    cutoff = now_ms - window.online_window_s * 1000
    # A timed ban ends by itself but the row changes only on the worker's next call.
    in_force = (Worker.state == WorkerState.BANNED) & (
        Worker.banned_until_unix_ms.is_(None) | (Worker.banned_until_unix_ms > now_ms)
    )
    registered, banned = session.execute(
        select(func.count(), func.coalesce(func.sum(case((in_force, 1), else_=0)), 0)).select_from(
            Worker
        )
    ).one()
    online = session.scalar(
        select(func.count()).select_from(Worker).where(Worker.last_seen_unix_ms >= cutoff)
    )
    listed = session.execute(
        select(
            Worker.worker_id,
            Worker.display_name,
            Worker.client_version,
            Worker.last_seen_unix_ms,
            Worker.valid_streak,
            Worker.batches_accepted,
            Worker.batches_rejected,
            Worker.batches_voided,
            Worker.credit_granted,
            Worker.credit_pending,
        )
        .where(Worker.last_seen_unix_ms >= cutoff)
        .order_by(Worker.last_seen_unix_ms.desc(), Worker.worker_id)
        .limit(window.max_listed_workers)
    )
    banned_rows = session.execute(
        select(
            Worker.worker_id,
            Worker.display_name,
            Worker.ban_reason,
            Worker.banned_until_unix_ms,
            Worker.audits_failed,
        )
        .where(in_force)
        .order_by(Worker.worker_id)
        .limit(window.max_listed_workers)
    )
    return WorkerStats(
        registered=int(registered),
        online=int(online or 0),
        banned=int(banned),
        online_workers=tuple(
            OnlineWorker(str(r[0]), str(r[1]), str(r[2]), *(int(v) for v in r[3:])) for r in listed
        ),
        banned_workers=tuple(
            BannedWorker(
                str(r[0]),
                str(r[1]),
                str(r[2] or ""),
                None if r[3] is None else int(r[3]),
                int(r[4]),
            )
            for r in banned_rows
        ),
    )


def _leases(session: Session, now_ms: int) -> LeaseStats:
    open_, overdue = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Lease.deadline_unix_ms < now_ms, 1), else_=0)), 0),
        ).where(Lease.state == LeaseState.OPEN)
    ).one()
    return LeaseStats(open=int(open_), overdue=int(overdue))


def _audits(session: Session) -> AuditBacklog:
    by_kind: dict[str, dict[str, int]] = {}
    totals = dict.fromkeys(_BACKLOG_STATES, 0)
    oldest: int | None = None
    rows = session.execute(
        select(AuditJob.kind, AuditJob.state, func.count(), func.min(AuditJob.created_unix_ms))
        .where(AuditJob.state.in_(_BACKLOG_STATES))
        .group_by(AuditJob.kind, AuditJob.state)
    )
    for kind, raw_state, count, first in rows:
        state = AuditState(raw_state)
        by_kind.setdefault(str(kind.value), {})[state.value] = int(count)
        totals[state] += int(count)
        if state is AuditState.PENDING and first is not None:
            oldest = int(first) if oldest is None else min(oldest, int(first))
    in_window = session.scalar(
        select(func.count()).select_from(Batch).where(Batch.state == BatchState.PENDING_AUDIT)
    )
    return AuditBacklog(
        pending=totals[AuditState.PENDING],
        claimed=totals[AuditState.CLAIMED],
        retrying=totals[AuditState.ERROR],
        by_kind=by_kind,
        oldest_pending_unix_ms=oldest,
        batches_in_audit_window=int(in_window or 0),
    )


def _bucket_of(column: Any, start_ms: int, bucket_ms: int) -> Any:
    # Integer division on both engines (the operands are integers and the difference is
    # never negative under the WHERE clause). Labelled, and grouped by the label, so
    # PostgreSQL sees one expression rather than two differently bound copies.
    offset = column - literal(start_ms, BigInteger)
    return (offset // literal(bucket_ms, BigInteger)).label("bucket")


def _batch_series(
    session: Session, start_ms: int, bucket_ms: int, n_buckets: int
) -> tuple[tuple[BatchBucket, ...], dict[str, int]]:
    bucket = _bucket_of(Batch.created_unix_ms, start_ms, bucket_ms)
    rows = session.execute(
        select(bucket, Batch.state, Batch.rejection_reason, func.count())
        # Every state listed: see the module docstring (index use).
        .where(Batch.state.in_(list(BatchState)), Batch.created_unix_ms >= start_ms)
        .group_by("bucket", Batch.state, Batch.rejection_reason)
    )
    counts: list[dict[str, int]] = [{} for _ in range(n_buckets)]
    totals: dict[str, int] = {}
    for index, state, reason, count in rows:
        if not 0 <= int(index) < n_buckets:
            continue  # created in the future by a replica whose clock runs ahead
        if BatchState(state) in (BatchState.PENDING_AUDIT, BatchState.ACCEPTED):
            outcome = ACCEPTED
        else:
            outcome = str(reason or _UNKNOWN_REASON)
        bucket_counts = counts[int(index)]
        bucket_counts[outcome] = bucket_counts.get(outcome, 0) + int(count)
        totals[outcome] = totals.get(outcome, 0) + int(count)
    series = tuple(
        BatchBucket(start_unix_ms=start_ms + i * bucket_ms, outcomes=counts[i])
        for i in range(n_buckets)
    )
    return series, totals


def _rollout_series(
    session: Session, run_id: str, *, start_ms: int, bucket_ms: int, n_buckets: int, now_ms: int
) -> tuple[RolloutBucket, ...]:
    bucket = _bucket_of(Rollout.accepted_unix_ms, start_ms, bucket_ms)
    live = Rollout.voided.is_(False)
    rows = session.execute(
        select(
            bucket,
            func.count(),
            func.sum(case((live, 0), else_=1)),
            func.sum(case((live, Rollout.n_completion_tokens), else_=0)),
            func.avg(case((live, Rollout.reward), else_=None)),
        )
        .where(Rollout.run_id == run_id, Rollout.accepted_unix_ms >= start_ms)
        .group_by("bucket")
    )
    found = {int(r[0]): r for r in rows}
    series = []
    for i in range(n_buckets):
        begin = start_ms + i * bucket_ms
        # The current bucket has only run for part of its width.
        seconds = max(min(bucket_ms, now_ms - begin + 1), 1) / 1000
        row = found.get(i)
        if row is None:
            series.append(RolloutBucket(begin, 0, 0, 0, None, 0.0))
            continue
        n = int(row[1])
        series.append(
            RolloutBucket(
                start_unix_ms=begin,
                rollouts=n,
                voided=int(row[2] or 0),
                tokens=int(row[3] or 0),
                reward_mean=_finite(row[4]),
                rate_per_s=n / seconds,
            )
        )
    return tuple(series)


def _recent(
    session: Session, run_id: str, window: StatsWindow, now_ms: int
) -> tuple[float, float | None]:
    since = now_ms - window.rate_window_s * 1000
    count, reward = session.execute(
        select(
            func.count(),
            func.avg(case((Rollout.voided.is_(False), Rollout.reward), else_=None)),
        ).where(Rollout.run_id == run_id, Rollout.accepted_unix_ms > since)
    ).one()
    return int(count) / window.rate_window_s, _finite(reward)


def _policies(session: Session, run_id: str, limit: int) -> tuple[PolicyRow, ...]:
    # Named columns: the manifest (kilobytes per version) is not needed here.
    published = session.execute(
        select(
            PolicyVersion.version,
            PolicyVersion.parent_version,
            PolicyVersion.kind,
            PolicyVersion.trainer_step,
            PolicyVersion.trained_through_cursor,
            PolicyVersion.published_unix_ms,
            PolicyVersion.metrics_json,
        )
        .where(PolicyVersion.run_id == run_id)
        .order_by(PolicyVersion.version.desc())
        .limit(limit)
    ).all()
    oldest = (int(published[-1][0]), int(published[-1][5])) if len(published) >= limit else None
    rewards = _reward_by_version(session, run_id, oldest)
    rows = []
    for version, parent, kind, step, through, published_ms, metrics_json in published:
        n, mean = rewards.get(int(version), (0, None))
        rows.append(
            PolicyRow(
                version=int(version),
                parent_version=None if parent is None else int(parent),
                kind=str(kind.value),
                trainer_step=int(step),
                trained_through_cursor=int(through),
                published_unix_ms=int(published_ms),
                rollouts=n,
                reward_mean=mean,
                metrics=_metrics(metrics_json),
            )
        )
    # Rollouts of versions without a row: the base model (version 0) before the first
    # publication, shown so the curve starts where training started.
    known = {r.version for r in rows}
    for version in set(rewards) - known:
        n, mean = rewards[version]
        rows.append(PolicyRow(version, None, "base", 0, 0, None, n, mean, {}))
    rows.sort(key=lambda r: r.version, reverse=True)
    return tuple(rows[:limit])


def _reward_by_version(
    session: Session, run_id: str, oldest: tuple[int, int] | None
) -> dict[int, tuple[int, float | None]]:
    """(rollouts, mean reward) per policy version, from version `oldest[0]` (published
    at `oldest[1]`) on; None: every version of the run."""
    query = (
        select(Rollout.policy_version, func.count(), func.avg(Rollout.reward))
        .where(Rollout.run_id == run_id, Rollout.voided.is_(False))
        .group_by(Rollout.policy_version)
    )
    if oldest is not None:
        # Only the newest versions are shown: their rollouts were all accepted after the
        # oldest of them was published, a range of the (run, accepted) index. Otherwise
        # version 0 is shown too, which reaches back to the run's start: a scan of the
        # run's rows (an index on (run_id, policy_version, reward) would make it
        # index-only; per-version counters kept at acceptance would make it free).
        version, published_ms = oldest
        query = query.where(
            Rollout.accepted_unix_ms >= published_ms - _CLOCK_SLACK_MS,
            Rollout.policy_version >= version,
        )
    return {int(v): (int(n), _finite(mean)) for v, n, mean in session.execute(query)}


def _metrics(metrics_json: str) -> dict[str, float]:
    try:
        decoded = json.loads(metrics_json)
    except ValueError:
        return {}
    if not isinstance(decoded, dict):
        return {}
    out: dict[str, float] = {}
    for key, value in decoded.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = _finite(value)
            if number is not None:
                out[str(key)] = number
    return out
