"""Submitted batches, cursor assignment and the trainer's rollout stream.

Idempotency. A batch is stored once per (worker, idempotency key): a UNIQUE constraint
makes a second row impossible, and `record_batch` answers a known key with the stored
batch (`created=False`), whatever the interleaving of the retries: it locks the
worker's row before looking the key up, so a concurrent retry waits for the first
transaction and then finds its row. The same key with a different payload digest is an
`IdempotencyConflictError`.

Cursor assignment. The run row holds `head_cursor`, the last cursor handed out. An
accepting transaction does `UPDATE runs SET head_cursor = head_cursor + n ... RETURNING`,
which row-locks the run until commit, and numbers its n rows head-n+1 .. head. Hence:
- gap-free: a range is taken only by a transaction that then commits it (a rollback
  undoes the counter too). A SEQUENCE would leave holes on every rollback;
- visibility follows cursor order: the next acceptor of the run blocks on the lock until
  this one has committed, so no reader can ever see cursor c+1 before cursor c. With a
  sequence, a transaction holding 1..8 could commit after one holding 9..16; a trainer
  reading in between would ack 16 and skip 1..8 for ever. That is the property the
  trainer's resume depends on;
- the price is that acceptors of one run commit one at a time. The lock is taken after
  everything that needs no cursor (batch row, audit jobs, credit), so it is held for the
  duplicate check, the row inserts and the commit only.
SQLite has one writer at a time (BEGIN IMMEDIATE), which gives the same guarantees.

Duplicate completions are checked inside the same transaction after the run lock, so
two workers submitting the same completion to one run at once cannot both pass: the
later one is refused or, where the draft says so (`BatchDraft.duplicate_audit_kinds`),
accepted with audits queued. One query, in the write: no read ahead of it per batch.

Group commit. A commit costs an fsync (milliseconds), and SQLite has a single writer:
one transaction per submission caps ingest at a few hundred batches/s and makes
concurrent submitters queue on the write lock. `GroupCommitter` runs the write
operations of concurrent requests (`record_in`, `remember_nonce_in`) in one shared
transaction, each inside its own SAVEPOINT: an operation that fails rolls back to its
savepoint and gets its exception, the others go on; the group commits once, and only
then does each caller get its result. So an acknowledgement still means "committed",
and every operation keeps its own all-or-nothing behaviour. A group of one needs no
savepoint (its failure rolls the transaction back) and gets none. A group of several
locks its operations' workers first, in id order, so that it keeps the lock order of
`storage.repo` (worker, lease, run, batch) as a whole and cannot deadlock with the
sweep or another replica's group.

One call on PostgreSQL. There, an acceptance runs as one call of a server-side function
(migration 0003, `_record_accepted_pg`): the same checks and writes under the same
locks, taken in the same order, without a round trip between them. (The batch row goes
in after the run lock, with its cursors: with no round trip to keep out of the lock,
the separate update of its cursors is not worth a second write.) Sent one by one from the single
group-commit thread, each was a wait on another process, and on a loaded machine a
chance to lose the CPU (bench/coordinator.py: 9 ms per batch in that thread, and the
queue in front of it held the slowest submits). SQLite runs in-process and keeps the
statements here (`_accept`); tests/integration/test_storage_postgres_accept.py plays
one scenario on both and compares every outcome and row.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar, cast

from sqlalchemy import Connection, Select, Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from coderepair.coordinator.storage import audits
from coderepair.coordinator.storage.db import Database, Dialect, is_transient
from coderepair.coordinator.storage.errors import (
    ConflictError,
    CursorBeyondHeadError,
    DuplicateCompletionError,
    DuplicateMatch,
    IdempotencyConflictError,
    LeaseNotOpenError,
    NotFoundError,
    WorkerBannedError,
)
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
    Run,
    SeenNonce,
    TrainerAck,
    Worker,
    WorkerState,
)
from coderepair.coordinator.storage.repo import insert_ignoring_conflicts, new_id

__all__ = [
    "AckResult",
    "BatchDraft",
    "GroupCommitter",
    "RecordedBatch",
    "Rejection",
    "SampleIndex",
    "StreamRow",
    "SubmissionView",
    "ack_cursor",
    "completion_digest",
    "find_duplicate_completions",
    "get_batch",
    "head_cursor",
    "is_transient",
    "packed_completion_digest",
    "read_stream",
    "record_batch",
    "record_in",
    "remember_nonce_in",
    "rollouts_ahead",
    "submission_view",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_DIGEST_PREFIX = b"coderepair/completion/v1\x00"


def completion_digest(task_id: str, completion_ids: Sequence[int]) -> str:
    """sha256 naming one completion of one task, for duplicate detection.

    The task id is part of it: the same short answer to two different tasks is no copy.
    """
    return packed_completion_digest(
        task_id, struct.pack(f"<{len(completion_ids)}I", *completion_ids)
    )


def packed_completion_digest(task_id: str, ids_u32le: bytes) -> str:
    """`completion_digest` of ids given as little-endian uint32 bytes (numpy's form)."""
    task = task_id.encode()
    return hashlib.sha256(
        _DIGEST_PREFIX + struct.pack("<I", len(task)) + task + ids_u32le
    ).hexdigest()


class SampleIndex(NamedTuple):
    """The index entry of one accepted sample (its full record is in the Parquet file).

    A named tuple, not a dataclass: the servicer builds one per sample of every batch
    it accepts on the event loop, and `SampleIndex._make` over zipped columns costs a
    fifth of a frozen dataclass's keyword constructor (64 samples: 17 us against 93).
    """

    row_index: int
    """Position of the sample's row in the batch's Parquet object."""
    task_id: str
    sample_index: int
    completion_sha256: str
    n_completion_tokens: int
    reward: float


@dataclass(frozen=True)
class Rejection:
    """Why a batch was refused: a `RejectionReason` name without prefix, and a message."""

    reason: str
    message: str
    ban_after: int = 0
    """Ban the key when this many of its last `ban_window` batches were refused for
    `audits.STRIKE_REASONS` (0: never)."""
    ban_window: int = 20


@dataclass(frozen=True)
class BatchDraft:
    """A batch to store: accepted (samples + object key) or refused (`rejection`)."""

    worker_id: str
    idempotency_key: str
    payload_sha256: str
    run_id: str | None
    lease_id: str | None
    policy_version: int
    object_key: str | None = None
    samples: Sequence[SampleIndex] = ()
    audit_kinds: Sequence[AuditKind] = ()
    """Audits to queue (empty: not sampled for audit)."""
    rejection: Rejection | None = None
    duplicate_audit_kinds: Sequence[AuditKind] | None = None
    """What to do with a batch holding a completion another worker already had accepted:
    None refuses it (`DuplicateCompletionError`); a sequence accepts it and queues these
    audits (with `audit_kinds`), so that a replay of the lease's seeds tells a copy
    from a policy that has learnt one answer."""


@dataclass(frozen=True)
class RecordedBatch:
    """The stored batch, and whether this call stored it (False: a known key)."""

    batch: Batch
    created: bool
    banned: bool = False
    """This refusal got the key banned (see `Rejection.ban_after`)."""


# The submission path runs these Core statements, built once with bind parameters: the
# ORM's per-call statement construction and identity-map work cost more CPU than the
# database itself (measured: about 3x fewer batches/s through the ORM on this machine).
_batches = cast(Table, Batch.__table__)
_rollouts = cast(Table, Rollout.__table__)
_workers = cast(Table, Worker.__table__)
_leases = cast(Table, Lease.__table__)
_runs = cast(Table, Run.__table__)
_INSERT_BATCH = insert(_batches)
# A batch's index rows go in as one multi-row INSERT per `_ROWS_PER_INSERT` rows, not as
# the driver's executemany: sqlite3 releases the GIL around every statement step, so
# executemany costs one GIL hand-off per row, and beside a busy thread (the event loop
# under load) each hand-off can wait a whole switch interval (5 ms). bench/coordinator.py
# measures the commit of 64 rows beside one CPU-bound thread: 104-155 ms by executemany,
# 22 ms as one statement, on an otherwise idle machine (about 1 ms either way alone).
# The statement is the driver's own SQL with positional parameters: SQLAlchemy's
# multi-row form ("insertmanyvalues") builds and processes a parameter dict per row
# (record_batch of a 64-row batch alone: 4.1-5.0 ms of CPU this way, 4.6-5.6 that way).
_ROLLOUT_COLUMNS = (
    "run_id",
    "cursor",
    "batch_id",
    "row_index",
    "task_id",
    "sample_index",
    "worker_id",
    "policy_version",
    "completion_sha256",
    "n_completion_tokens",
    "reward",
    "accepted_unix_ms",
    "voided",
)
# SQLite takes at most 32766 parameters in one statement.
_ROWS_PER_INSERT = 1000
# Migration 0003's function (`_record_accepted_pg`). The arrays go in binary (``%b``):
# psycopg's text form of a list is built in Python, about twice the client CPU.
_PG_ACCEPT_BATCH = (
    "SELECT status, detail, head, dup_digests, dup_run_ids, dup_cursors, dup_batch_ids, "
    "dup_worker_ids FROM coderepair_accept_batch(%s::text, %s::text, %s::text, %s::text, "
    "%s::text, %s::text, %s::bigint, %s::text, %s::bigint, %s::bigint, %b::text[], "
    "%b::text[], %s::boolean, %b::text[], %b::text[], %b::integer[], %b::text[], "
    "%b::integer[], %b::text[], %b::integer[], %b::double precision[])"
)
_INSERT_JOBS = insert(cast(Table, AuditJob.__table__))
_INSERT_CREDIT = insert(cast(Table, CreditEntry.__table__))
_LOCK_WORKER = (
    select(_workers.c.state, _workers.c.ban_reason)
    .where(_workers.c.worker_id == bindparam("worker_id"))
    .with_for_update()
)
# ORDER BY before FOR UPDATE: PostgreSQL locks the rows as the sort returns them.
_LOCK_WORKERS = (
    select(_workers.c.worker_id)
    .where(_workers.c.worker_id.in_(bindparam("worker_ids", expanding=True)))
    .order_by(_workers.c.worker_id)
    .with_for_update()
)
_FIND_KEY = select(_batches).where(
    _batches.c.worker_id == bindparam("worker_id"),
    _batches.c.idempotency_key == bindparam("idempotency_key"),
)
_CLOSE_LEASE = (
    update(_leases)
    .where(
        _leases.c.lease_id == bindparam("b_lease_id"),
        _leases.c.worker_id == bindparam("b_worker_id"),
        _leases.c.run_id == bindparam("b_run_id"),
        _leases.c.policy_version == bindparam("b_policy_version"),
        _leases.c.state == LeaseState.OPEN,
        _leases.c.deadline_unix_ms >= bindparam("now_ms"),
    )
    .values(state=LeaseState.SUBMITTED, closed_unix_ms=bindparam("now_ms"))
)
_TAKE_CURSORS = (
    update(_runs)
    .where(_runs.c.run_id == bindparam("b_run_id"))
    .values(head_cursor=_runs.c.head_cursor + bindparam("n"))
    .returning(_runs.c.head_cursor)
)
_DUPLICATES = (
    select(
        _rollouts.c.completion_sha256,
        _rollouts.c.run_id,
        _rollouts.c.cursor,
        _rollouts.c.batch_id,
        _rollouts.c.worker_id,
    )
    .where(
        _rollouts.c.completion_sha256.in_(bindparam("digests", expanding=True)),
        _rollouts.c.worker_id != bindparam("worker_id"),
    )
    .limit(100)
)
# The same on PostgreSQL, as one index probe per digest. Its planner costs `IN (64
# values)` from the column's statistics, and rows inserted since the last ANALYZE have
# none: it then guesses a fixed share of the table per value (for 64 values, 5,515 of
# 64,064 rows in one measurement) and scans the whole table. On a fresh deployment,
# which ingests faster than autovacuum analyses, that took 15 ms per batch at 64k rows
# and grew with the table; a probe per digest under LIMIT is the cheapest plan whatever
# the statistics say (0.3 ms in the server).
_PG_DUPLICATES = (
    "SELECT r.completion_sha256, r.run_id, r.cursor, r.batch_id, r.worker_id "
    "FROM unnest(%(digests)s::text[]) AS d(digest) CROSS JOIN LATERAL ("
    "SELECT completion_sha256, run_id, cursor, batch_id, worker_id FROM rollouts "
    "WHERE completion_sha256 = d.digest AND worker_id <> %(worker_id)s LIMIT 100) AS r "
    "LIMIT 100"
)
_CREDIT_PENDING = (
    update(_workers)
    .where(_workers.c.worker_id == bindparam("b_worker_id"))
    .values(
        batches_accepted=_workers.c.batches_accepted + 1,
        credit_pending=_workers.c.credit_pending + bindparam("n_tokens"),
    )
)
_SET_CURSORS = (
    update(_batches)
    .where(_batches.c.batch_id == bindparam("b_batch_id"))
    .values(first_cursor=bindparam("first"), last_cursor=bindparam("last"))
)
_MARK_AUDITED = (
    update(_batches)
    .where(_batches.c.batch_id == bindparam("b_batch_id"))
    .values(audit_pending=True)
)
# One statement for the three rows (three `Session.get`s cost three round trips), in
# Core: the ORM's loading of three entities cost more than the query (a tenth of the
# coordinator's CPU per batch); the rows become plain, session-less model objects.
_SUBMISSION_VIEW = (
    select(_workers, _leases, _runs)
    .select_from(_workers)
    .outerjoin(_leases, _leases.c.lease_id == bindparam("lease_id"))
    .outerjoin(_runs, _runs.c.run_id == _leases.c.run_id)
    .where(_workers.c.worker_id == bindparam("worker_id"))
)
_VIEW_PARTS = (
    (Worker, tuple(c.key for c in _workers.columns)),
    (Lease, tuple(c.key for c in _leases.columns)),
    (Run, tuple(c.key for c in _runs.columns)),
)
_COUNT_REJECTED = (
    update(_workers)
    .where(_workers.c.worker_id == bindparam("b_worker_id"))
    .values(batches_rejected=_workers.c.batches_rejected + 1)
)


def _existing(connection: Connection, draft: BatchDraft) -> Batch | None:
    row = connection.execute(
        _FIND_KEY, {"worker_id": draft.worker_id, "idempotency_key": draft.idempotency_key}
    ).first()
    if row is None:
        return None
    if row.payload_sha256 != draft.payload_sha256:
        raise IdempotencyConflictError(
            f"idempotency key {draft.idempotency_key!r} of worker {draft.worker_id} was used "
            f"for batch {row.batch_id} with other content: use a fresh key per batch and "
            "the same key only to retry the very same payload"
        )
    return Batch(**row._asdict())


def record_batch(db: Database, draft: BatchDraft, now_ms: int) -> RecordedBatch:
    """Store a batch once per (worker, idempotency key); accept it when it has no rejection.

    The worker's row is locked first, so submissions of one worker (and so every retry
    of one key) are serialised; the stored batch is then looked up by key. Accepting, in
    the same transaction: the worker must not be banned (`WorkerBannedError`); close
    the lease (open, the worker's, within its deadline, of the batch's run and policy
    version, else `LeaseNotOpenError`); take a cursor range from the run (module
    docstring); refuse duplicates (`DuplicateCompletionError`); insert the batch, its
    index rows and audit jobs; add the tokens to the worker's pending credit. Any error
    leaves nothing written. The returned batch is a detached copy of the stored row.
    """
    with db.write() as session:
        return record_in(session, draft, now_ms)


def record_in(session: Session, draft: BatchDraft, now_ms: int) -> RecordedBatch:
    """`record_batch` inside the caller's transaction (a `GroupCommitter` operation)."""
    connection = session.connection()
    if draft.rejection is None:
        _check_accepted(draft)
        if connection.dialect.name == Dialect.POSTGRESQL:
            return _record_accepted_pg(session, draft, now_ms)
    worker = connection.execute(_LOCK_WORKER, {"worker_id": draft.worker_id}).first()
    if worker is None:
        raise NotFoundError(f"worker {draft.worker_id} is not registered: call Register")
    existing = _existing(connection, draft)
    if existing is not None:
        return RecordedBatch(existing, created=False)
    if draft.rejection is not None:
        rejected = _insert_rejected(connection, draft, now_ms)
        refusal = draft.rejection
        banned = refusal.reason in audits.STRIKE_REASONS and audits.strike(
            session,
            draft.worker_id,
            limit=refusal.ban_after,
            window=refusal.ban_window,
            now_ms=now_ms,
        )
        return RecordedBatch(rejected, created=True, banned=banned)
    if worker.state == WorkerState.BANNED:
        raise WorkerBannedError(f"worker {draft.worker_id} is banned: {worker.ban_reason}")
    batch = _accept(connection, draft, now_ms)
    if batch is None:
        raise _diagnose_lease(session, draft, now_ms)
    return RecordedBatch(batch, created=True)


def _check_accepted(draft: BatchDraft) -> None:
    if not draft.samples:
        raise ConflictError("an accepted batch needs at least one sample")
    if draft.run_id is None or draft.lease_id is None or not draft.object_key:
        raise ConflictError("an accepted batch needs its run, lease and Parquet object key")
    rows = [s.row_index for s in draft.samples]
    if sorted(rows) != list(range(len(rows))):
        raise ConflictError(
            "sample row_index values must be 0..n-1, one per Parquet row of the batch"
        )


def _batch_values(draft: BatchDraft, now_ms: int) -> dict[str, Any]:
    # Every column, so the returned Batch object is complete without a read-back.
    return {
        "batch_id": new_id(),
        "worker_id": draft.worker_id,
        "idempotency_key": draft.idempotency_key,
        "payload_sha256": draft.payload_sha256,
        "run_id": draft.run_id,
        "lease_id": draft.lease_id,
        "policy_version": draft.policy_version,
        "state": BatchState.REJECTED,
        "rejection_reason": None,
        "rejection_message": None,
        "audit_pending": False,
        "object_key": None,
        "n_samples": len(draft.samples),
        "n_tokens": 0,
        "created_unix_ms": now_ms,
        "decided_unix_ms": now_ms,
        "first_cursor": None,
        "last_cursor": None,
    }


def _insert_rejected(connection: Connection, draft: BatchDraft, now_ms: int) -> Batch:
    assert draft.rejection is not None
    values = _batch_values(draft, now_ms)
    values["rejection_reason"] = draft.rejection.reason
    values["rejection_message"] = draft.rejection.message
    # The worker lock serialises every writer of this (worker, key): a UNIQUE violation
    # here would be a broken lock discipline, and it fails the transaction loudly.
    connection.execute(_INSERT_BATCH, values)
    connection.execute(_COUNT_REJECTED, {"b_worker_id": draft.worker_id})
    return Batch(**values)


def _accept(connection: Connection, draft: BatchDraft, now_ms: int) -> Batch | None:
    # SQLite's path; PostgreSQL runs the same steps in `_record_accepted_pg`'s function.
    closed = connection.execute(
        _CLOSE_LEASE,
        {
            "b_lease_id": draft.lease_id,
            "b_worker_id": draft.worker_id,
            "b_run_id": draft.run_id,
            "b_policy_version": draft.policy_version,
            "now_ms": now_ms,
        },
    )
    if closed.rowcount != 1:
        return None
    samples = _group_order(draft.samples)
    n = len(samples)
    values = _batch_values(draft, now_ms)
    batch_id = values["batch_id"]
    n_tokens = sum(s.n_completion_tokens for s in samples)
    values.update(
        state=BatchState.PENDING_AUDIT,
        audit_pending=bool(draft.audit_kinds),
        object_key=draft.object_key,
        n_tokens=n_tokens,
    )
    # Everything that does not need cursors comes first: the run lock below is held
    # until commit, and every acceptor of the run waits for it.
    connection.execute(_INSERT_BATCH, values)
    kinds = list(dict.fromkeys(draft.audit_kinds))
    if kinds:
        connection.execute(_INSERT_JOBS, _job_rows(batch_id, draft.worker_id, kinds, now_ms))
    connection.execute(_CREDIT_PENDING, {"b_worker_id": draft.worker_id, "n_tokens": n_tokens})
    connection.execute(
        _INSERT_CREDIT,
        {
            "worker_id": draft.worker_id,
            "batch_id": batch_id,
            "kind": CreditKind.PENDING,
            "pending_delta": n_tokens,
            "granted_delta": 0,
            "created_unix_ms": now_ms,
        },
    )
    head = connection.execute(_TAKE_CURSORS, {"b_run_id": draft.run_id, "n": n}).scalar_one()
    first = head - n + 1
    # After the run lock: two acceptors of one completion cannot both miss each other.
    matches = _duplicates(connection, [s.completion_sha256 for s in samples], draft.worker_id)
    if matches:
        if draft.duplicate_audit_kinds is None:
            raise DuplicateCompletionError(matches)
        extra = [k for k in dict.fromkeys(draft.duplicate_audit_kinds) if k not in kinds]
        if extra:
            connection.execute(_INSERT_JOBS, _job_rows(batch_id, draft.worker_id, extra, now_ms))
            connection.execute(_MARK_AUDITED, {"b_batch_id": batch_id})
            values["audit_pending"] = True
            log.info(
                "batch %s repeats %d completion(s) other workers had accepted: audited (%s)",
                batch_id,
                len(matches),
                ", ".join(k.value for k in extra),
            )
    _insert_rollouts(
        connection,
        [
            (
                draft.run_id,
                first + i,
                batch_id,
                s.row_index,
                s.task_id,
                s.sample_index,
                draft.worker_id,
                draft.policy_version,
                s.completion_sha256,
                s.n_completion_tokens,
                s.reward,
                now_ms,
                False,
            )
            for i, s in enumerate(samples)
        ],
    )
    connection.execute(_SET_CURSORS, {"b_batch_id": batch_id, "first": first, "last": head})
    values.update(first_cursor=first, last_cursor=head)
    return Batch(**values)


def _record_accepted_pg(session: Session, draft: BatchDraft, now_ms: int) -> RecordedBatch:
    """`record_in` of a draft to accept, on PostgreSQL: the checks and writes of the
    SQLite path (`_accept` and what precedes it), under the same locks taken in the same
    order, as one call of the server-side function that migration 0003 creates. Each of them sent on
    its own is a round trip, and the group-commit thread waited a dozen times per batch
    (bench/coordinator.py). Refusals raise here, which rolls back what the call wrote."""
    connection = session.connection()
    samples = _group_order(draft.samples)
    kinds = list(dict.fromkeys(draft.audit_kinds))
    extra = [k for k in dict.fromkeys(draft.duplicate_audit_kinds or ()) if k not in kinds]
    values = _batch_values(draft, now_ms)
    n_tokens = sum(s.n_completion_tokens for s in samples)
    row = connection.exec_driver_sql(
        _PG_ACCEPT_BATCH,
        (
            draft.worker_id,
            draft.idempotency_key,
            draft.payload_sha256,
            values["batch_id"],
            draft.run_id,
            draft.lease_id,
            draft.policy_version,
            draft.object_key,
            n_tokens,
            now_ms,
            [new_id() for _ in kinds],
            [str(k) for k in kinds],
            draft.duplicate_audit_kinds is None,
            [new_id() for _ in extra],
            [str(k) for k in extra],
            [s.row_index for s in samples],
            [s.task_id for s in samples],
            [s.sample_index for s in samples],
            [s.completion_sha256 for s in samples],
            [s.n_completion_tokens for s in samples],
            [s.reward for s in samples],
        ),
    ).one()
    status = row.status
    if status == "no_worker":
        raise NotFoundError(f"worker {draft.worker_id} is not registered: call Register")
    if status == "existing":
        existing = _existing(connection, draft)
        assert existing is not None  # found under the worker's lock, which we hold
        return RecordedBatch(existing, created=False)
    if status == "banned":
        raise WorkerBannedError(f"worker {draft.worker_id} is banned: {row.detail}")
    if status == "lease":
        raise _diagnose_lease(session, draft, now_ms)
    matches = [
        DuplicateMatch(*match)
        for match in zip(
            row.dup_digests or (),
            row.dup_run_ids or (),
            row.dup_cursors or (),
            row.dup_batch_ids or (),
            row.dup_worker_ids or (),
            strict=True,
        )
    ]
    if status == "duplicate":
        raise DuplicateCompletionError(matches)
    if status != "accepted":
        raise ConflictError(f"coderepair_accept_batch answered an unknown status {status!r}")
    if matches and extra:
        log.info(
            "batch %s repeats %d completion(s) other workers had accepted: audited (%s)",
            values["batch_id"],
            len(matches),
            ", ".join(k.value for k in extra),
        )
    head = int(row.head)
    values.update(
        state=BatchState.PENDING_AUDIT,
        audit_pending=bool(kinds) or bool(matches and extra),
        object_key=draft.object_key,
        n_tokens=n_tokens,
        first_cursor=head - len(samples) + 1,
        last_cursor=head,
    )
    return RecordedBatch(Batch(**values), created=True)


def _insert_rollouts(connection: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert index rows, given as tuples in `_ROLLOUT_COLUMNS` order (module comment
    above `_ROLLOUT_COLUMNS`)."""
    dialect = connection.dialect
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    quote = dialect.identifier_preparer.quote
    head = (
        f"INSERT INTO {quote(_rollouts.name)} "
        f"({', '.join(quote(c) for c in _ROLLOUT_COLUMNS)}) VALUES "
    )
    one = "(" + ", ".join([mark] * len(_ROLLOUT_COLUMNS)) + ")"
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        connection.exec_driver_sql(
            head + ", ".join([one] * len(chunk)), tuple(v for row in chunk for v in row)
        )


def _job_rows(
    batch_id: str, worker_id: str, kinds: Sequence[AuditKind], now_ms: int
) -> list[dict[str, Any]]:
    return [
        {
            "job_id": new_id(),
            "batch_id": batch_id,
            "worker_id": worker_id,
            "kind": kind,
            "state": AuditState.PENDING,
            "attempts": 0,
            "detail": "",
            "metrics_json": "{}",
            "created_unix_ms": now_ms,
            "claimed_by": None,
            "claimed_unix_ms": None,
            "claim_expires_unix_ms": None,
            "finished_unix_ms": None,
        }
        for kind in kinds
    ]


def _group_order(samples: Sequence[SampleIndex]) -> list[SampleIndex]:
    # The G samples of a task get consecutive cursors (RolloutRow.group_size contract):
    # tasks in order of first appearance, samples by index within a task.
    first_seen: dict[str, int] = {}
    for s in samples:
        first_seen.setdefault(s.task_id, len(first_seen))
    return sorted(samples, key=lambda s: (first_seen[s.task_id], s.sample_index, s.row_index))


def _diagnose_lease(session: Session, draft: BatchDraft, now_ms: int) -> LeaseNotOpenError:
    lease = session.get(Lease, draft.lease_id) if draft.lease_id else None
    if lease is None:
        return LeaseNotOpenError("UNKNOWN_LEASE", f"no lease {draft.lease_id!r} exists")
    if lease.worker_id != draft.worker_id:
        return LeaseNotOpenError(
            "NOT_LEASE_OWNER", f"lease {lease.lease_id} was issued to another worker"
        )
    if lease.state is LeaseState.EXPIRED or (
        lease.state is LeaseState.OPEN and lease.deadline_unix_ms < now_ms
    ):
        return LeaseNotOpenError(
            "LEASE_EXPIRED",
            f"lease {lease.lease_id} passed its deadline ({lease.deadline_unix_ms}); its "
            "tasks went back to the pool: ask for a new lease",
        )
    if lease.state is not LeaseState.OPEN:
        return LeaseNotOpenError(
            "UNKNOWN_LEASE",
            f"lease {lease.lease_id} is {lease.state.value}: it takes no more submissions",
        )
    if lease.run_id != draft.run_id or lease.policy_version != draft.policy_version:
        return LeaseNotOpenError(
            "STALE_POLICY",
            f"lease {lease.lease_id} is for run {lease.run_id!r} at policy version "
            f"{lease.policy_version}, the batch says {draft.run_id!r} at "
            f"{draft.policy_version}: submit the samples generated for this lease",
        )
    return LeaseNotOpenError("CONFLICT", f"lease {lease.lease_id} changed concurrently; retry")


def remember_nonce_in(
    session: Session, signer: bytes, nonce: bytes, *, expires_ms: int, now_ms: int
) -> bool:
    """`repo.remember_nonce` inside the caller's transaction: False for a replay."""
    if insert_ignoring_conflicts(
        session,
        SeenNonce.__table__,  # type: ignore[arg-type]
        {"signer": signer, "nonce": nonce, "expires_unix_ms": expires_ms},
    ):
        return True
    # An expired entry is reusable (its envelope fails the clock check by then anyway).
    refreshed = session.execute(
        update(SeenNonce)
        .where(
            SeenNonce.signer == signer,
            SeenNonce.nonce == nonce,
            SeenNonce.expires_unix_ms < now_ms,
        )
        .values(expires_unix_ms=expires_ms)
    )
    return bool(refreshed.rowcount == 1)  # type: ignore[attr-defined]


_TRANSIENT_RETRIES = 5


@dataclass
class _Op(Generic[_T]):
    run: Callable[[Session], _T]
    future: Future[_T]
    worker_id: str | None = None


class GroupCommitter:
    """One writer thread that commits the operations of concurrent callers together
    (module docstring, "Group commit").

    `submit(op)` queues ``op(session)`` and returns a future that resolves after the
    commit of the group it ran in. The thread takes whatever is queued when it becomes
    free (up to `max_group` operations): under load, groups grow by themselves while
    the previous commit's fsync runs; alone, an operation commits at once. The thread
    exits after `idle_exit_s` without work and restarts on the next `submit`, so an
    owner needs no shutdown step.
    """

    def __init__(self, db: Database, *, max_group: int = 128, idle_exit_s: float = 2.0) -> None:
        if max_group < 1:
            raise ValueError(f"max_group must be >= 1, got {max_group}")
        self._db = db
        self._max_group = max_group
        self._idle_exit_s = idle_exit_s
        self._queue: queue.SimpleQueue[_Op[Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, run: Callable[[Session], _T], *, worker_id: str | None = None) -> Future[_T]:
        """Queue ``run(session)``; its future holds the result or exception after commit.

        ``worker_id``: the worker row ``run`` locks (`record_in` does, first thing). A
        group locks the rows of all its operations up front, in id order, as every
        other transaction that locks several workers does (module docstring of
        `storage.repo`): taken one operation at a time, in arrival order and after the
        previous operation's lease and run, they could deadlock with a sweep or another
        replica's group, and the loser's whole group would be rolled back and rerun.
        """
        op: _Op[_T] = _Op(run, Future(), worker_id)
        self._queue.put(op)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="coordinator-group-commit", daemon=True
                )
                self._thread.start()
        return op.future

    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._idle_exit_s)
            except queue.Empty:
                with self._lock:
                    # Re-check under the lock: a submit may have queued meanwhile.
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            group = [first]
            while len(group) < self._max_group:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(group)

    def _commit(self, group: list[_Op[Any]]) -> None:
        # A caller that gave up (its RPC was cancelled, the server is stopping) cancelled
        # its future: its operation is dropped, never half-answered. Marking the others
        # running makes them uncancellable, so setting their results below cannot raise
        # (an InvalidStateError here once killed this thread and hung every later submit).
        group = [op for op in group if op.future.set_running_or_notify_cancel()]
        if not group:
            return
        for attempt in range(_TRANSIENT_RETRIES + 1):
            outcomes: list[tuple[bool, Any]] = []
            try:
                if len(group) == 1:
                    outcomes.append(self._run_alone(group[0]))
                else:
                    self._run_together(group, outcomes)
            except Exception as exc:
                # Nothing of the group was written.
                if is_transient(exc) and attempt < _TRANSIENT_RETRIES:
                    log.info("group commit of %d operations retried: %s", len(group), exc)
                    time.sleep(0.01 * 2**attempt)
                    continue
                log.warning("group commit of %d operations failed: %s", len(group), exc)
                for op in group:
                    op.future.set_exception(exc)
                return
            break
        for op, (ok, value) in zip(group, outcomes, strict=True):
            if ok:
                op.future.set_result(value)
            else:
                op.future.set_exception(value)

    def _run_together(self, group: list[_Op[Any]], outcomes: list[tuple[bool, Any]]) -> None:
        """Each operation in a savepoint of one transaction: a failed one is rolled
        back alone, the others commit. The group's workers are locked first, in order
        (`submit`); a single-writer SQLite has no row locks to order."""
        with self._db.write() as session:
            workers = sorted({op.worker_id for op in group if op.worker_id is not None})
            if len(workers) > 1 and self._db.dialect is not Dialect.SQLITE:
                session.connection().execute(_LOCK_WORKERS, {"worker_ids": workers}).all()
            for op in group:
                try:
                    with session.begin_nested():
                        outcomes.append((True, op.run(session)))
                except Exception as exc:  # rolled back to its savepoint only
                    if is_transient(exc):
                        # Retried in this transaction it would meet the same lock cycle
                        # (the group still holds the other rows): roll the whole group
                        # back and run it again.
                        raise
                    outcomes.append((False, exc))

    def _run_alone(self, op: _Op[Any]) -> tuple[bool, Any]:
        """A group of one, without the savepoint: its failure rolls the transaction
        back, which is all the savepoint would do. Under a steady load most groups hold
        one operation, and each statement here hands the interpreter lock over
        (sqlite3 and psycopg release it around every call), so the SAVEPOINT and
        RELEASE it saves are two hand-offs per batch. A failed commit, or a lock
        conflict, is raised to `_commit` like a group's."""
        ran = False
        try:
            with self._db.write() as session:
                value = op.run(session)
                ran = True
        except Exception as exc:
            if ran or is_transient(exc):
                raise
            return (False, exc)
        return (True, value)


def _duplicates(
    connection: Connection, digests: Sequence[str], worker_id: str | None
) -> list[DuplicateMatch]:
    # worker_id None matches every worker ("" is never a worker id).
    params = {"digests": sorted(set(digests)), "worker_id": worker_id or ""}
    if connection.dialect.name == Dialect.POSTGRESQL:
        rows = connection.exec_driver_sql(_PG_DUPLICATES, params)
    else:
        rows = connection.execute(_DUPLICATES, params)
    return [DuplicateMatch(*row) for row in rows]


def find_duplicate_completions(
    db: Database, digests: Sequence[str], exclude_worker_id: str | None = None
) -> list[DuplicateMatch]:
    """Accepted samples (any run, voided included) with one of these completion digests,
    optionally leaving out one worker's own; at most 100."""
    if not digests:
        return []
    with db.read() as session:
        return _duplicates(session.connection(), digests, exclude_worker_id)


@dataclass(frozen=True)
class SubmissionView:
    """What a submission is checked against, read in one transaction: the signer's
    worker row, the lease it names and that lease's run (None where there is none)."""

    worker: Worker | None
    lease: Lease | None
    run: Run | None


def submission_view(db: Database, worker_id: str, lease_id: str | None) -> SubmissionView:
    """One read for the three rows a submission needs (three reads cost three
    transactions and thread hops per batch). `record_batch` re-checks what matters
    under its locks."""
    with db.read() as session:
        row = (
            session.connection()
            .execute(_SUBMISSION_VIEW, {"worker_id": worker_id, "lease_id": lease_id})
            .first()
        )
    if row is None:
        return SubmissionView(None, None, None)
    parts: list[Any] = []
    start = 0
    for model, keys in _VIEW_PARTS:
        values = row[start : start + len(keys)]
        start += len(keys)
        # An outer join that found nothing gives NULLs, primary key included.
        parts.append(None if values[0] is None else model(**dict(zip(keys, values, strict=True))))
    return SubmissionView(parts[0], parts[1], parts[2])


def get_batch(db: Database, batch_id: str) -> Batch | None:
    """The batch, or None."""
    with db.read() as session:
        return session.get(Batch, batch_id)


# ---------------------------------------------------------------- trainer stream


@dataclass(frozen=True)
class StreamRow:
    """One accepted, non-voided sample in cursor order, with where its record lies."""

    cursor: int
    run_id: str
    batch_id: str
    lease_id: str
    worker_id: str
    policy_version: int
    task_id: str
    sample_index: int
    row_index: int
    object_key: str
    accepted_unix_ms: int
    audit_pending: bool
    reward: float


def _stream_query(
    run_id: str, after_cursor: int, min_policy_version: int
) -> Select[*tuple[Any, ...]]:
    return (
        select(
            Rollout.cursor,
            Rollout.run_id,
            Rollout.batch_id,
            Batch.lease_id,
            Rollout.worker_id,
            Rollout.policy_version,
            Rollout.task_id,
            Rollout.sample_index,
            Rollout.row_index,
            Batch.object_key,
            Rollout.accepted_unix_ms,
            Batch.state == BatchState.PENDING_AUDIT,
            Rollout.reward,
        )
        .join(Batch, Batch.batch_id == Rollout.batch_id)
        .where(
            Rollout.run_id == run_id,
            Rollout.cursor > after_cursor,
            Rollout.voided.is_(False),
            Rollout.policy_version >= min_policy_version,
        )
        .order_by(Rollout.cursor)
    )


def read_stream(
    db: Database, run_id: str, after_cursor: int, limit: int, min_policy_version: int = 0
) -> list[StreamRow]:
    """Up to about `limit` rows with cursor > `after_cursor`, in cursor order.

    Never ends inside a GRPO group: when the limit falls within the rows of one
    (batch, task), the rest of that group is included, so a reader may get a few more
    than `limit` rows.
    """
    if limit < 1:
        raise ConflictError(f"limit must be >= 1, got {limit}")
    with db.read() as session:
        rows = [
            StreamRow(*r)
            for r in session.execute(
                _stream_query(run_id, after_cursor, min_policy_version).limit(limit)
            )
        ]
        if len(rows) == limit:
            last = rows[-1]
            rest = session.execute(
                _stream_query(run_id, last.cursor, min_policy_version).where(
                    Rollout.batch_id == last.batch_id, Rollout.task_id == last.task_id
                )
            )
            rows.extend(StreamRow(*r) for r in rest)
        return rows


def head_cursor(db: Database, run_id: str) -> int:
    """The last cursor handed out in the run (0 before the first acceptance)."""
    with db.read() as session:
        head = session.scalar(select(Run.head_cursor).where(Run.run_id == run_id))
        if head is None:
            raise NotFoundError(f"run {run_id!r} does not exist")
        return int(head)


def rollouts_ahead(db: Database, run_id: str) -> int:
    """Accepted rollouts the trainer has not consumed yet: head minus consumed cursor.

    Consumed, not checkpointed: a trainer that drops the rows it reads (stale, or groups
    whose rewards are all equal) checkpoints nothing until it has a step's worth of
    usable groups, and counting those rows would hold the lease room shut for good."""
    consumed = (
        select(func.coalesce(func.max(TrainerAck.consumed_cursor), 0))
        .where(TrainerAck.run_id == run_id)
        .scalar_subquery()
    )
    with db.read() as session:
        ahead = session.scalar(select(Run.head_cursor - consumed).where(Run.run_id == run_id))
        if ahead is None:
            raise NotFoundError(f"run {run_id!r} does not exist")
        return max(0, int(ahead))


@dataclass(frozen=True)
class AckResult:
    """The run's acknowledged and head cursors after an ack."""

    acked_cursor: int
    head_cursor: int
    consumed_cursor: int


def ack_cursor(
    db: Database,
    run_id: str,
    cursor: int,
    trainer_step: int,
    now_ms: int,
    *,
    consumed: int = 0,
) -> AckResult:
    """Record that the trainer checkpointed every row up to `cursor` and consumed every
    row up to `consumed` (at least `cursor`; 0 means `cursor`). Both only move forward (a
    smaller value is ignored); one beyond the head is `CursorBeyondHeadError`."""
    consumed = max(consumed, cursor)
    with db.write() as session:
        head = session.scalar(select(Run.head_cursor).where(Run.run_id == run_id))
        if head is None:
            raise NotFoundError(f"run {run_id!r} does not exist")
        if consumed > head:
            which = "cursor" if consumed == cursor else "consumed cursor"
            raise CursorBeyondHeadError(
                f"{which} {consumed} is beyond run {run_id!r}'s head {head}: ack only "
                "cursors of rows you received"
            )
        insert_ignoring_conflicts(
            session,
            TrainerAck.__table__,  # type: ignore[arg-type]
            {
                "run_id": run_id,
                "acked_cursor": 0,
                "consumed_cursor": 0,
                "trainer_step": 0,
                "updated_unix_ms": now_ms,
            },
        )
        # Two conditional updates, each atomic on its own: a late ack moves neither back.
        session.execute(
            update(TrainerAck)
            .where(TrainerAck.run_id == run_id, TrainerAck.acked_cursor <= cursor)
            .values(acked_cursor=cursor, trainer_step=trainer_step, updated_unix_ms=now_ms)
        )
        session.execute(
            update(TrainerAck)
            .where(TrainerAck.run_id == run_id, TrainerAck.consumed_cursor < consumed)
            .values(consumed_cursor=consumed, updated_unix_ms=now_ms)
        )
        row = session.execute(
            select(TrainerAck.acked_cursor, TrainerAck.consumed_cursor).where(
                TrainerAck.run_id == run_id
            )
        ).one()
        return AckResult(
            acked_cursor=int(row.acked_cursor),
            head_cursor=int(head),
            consumed_cursor=int(row.consumed_cursor),
        )
