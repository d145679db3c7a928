"""Repository operations on runs, policy versions, workers, leases and nonces.

Every public function is one transaction on a `Database` and takes the coordinator's
clock as `now_ms` (never reads a clock itself, so tests and replicas agree on time).
Rows come back as detached ORM objects: read their attributes, do not modify them.
Batches and the trainer stream are in `batches.py`, audits and credit in `audits.py`.

Concurrency rules shared by all storage modules:
- a write transaction changes a row only through a conditional UPDATE (`WHERE state =
  'open'` and the like) or after locking it (`FOR UPDATE`), so two replicas can never
  both move a row out of the same state;
- row locks are taken in one order everywhere — worker, lease, run, batch — and an
  audit job is locked before its worker, so transactions wait on each other but never
  deadlock (a submission locks its worker first: it must see a ban, and a ban revokes
  the worker's leases);
- on SQLite, write transactions start with BEGIN IMMEDIATE (one writer at a time), so
  FOR UPDATE / SKIP LOCKED are unnecessary there and SQLAlchemy leaves them out.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from coderepair.coordinator.storage.db import Database, Dialect
from coderepair.coordinator.storage.errors import (
    ConflictError,
    NotFoundError,
    WorkerBannedError,
)
from coderepair.coordinator.storage.models import (
    Lease,
    LeaseState,
    PolicyKind,
    PolicyVersion,
    Run,
    SeenNonce,
    Worker,
    WorkerState,
)
from coderepair.protocol.identity import PUBLIC_KEY_BYTES, fingerprint

__all__ = [
    "LeaseTask",
    "PolicyDraft",
    "RunSpec",
    "create_lease",
    "ensure_run",
    "expire_leases",
    "get_lease",
    "get_policy",
    "get_run",
    "get_worker",
    "lease_tasks",
    "list_runs",
    "new_id",
    "open_lease_count",
    "prune_nonces",
    "publish_policy",
    "release_lease",
    "remember_nonce",
    "touch_worker",
    "upsert_worker",
]


def new_id() -> str:
    """A fresh opaque id (32 hex digits, 122 random bits) for leases, batches, jobs."""
    return uuid.uuid4().hex


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces, so equal documents are equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def insert_ignoring_conflicts(session: Session, table: Table, values: Mapping[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row was inserted.

    On PostgreSQL a conflicting row that another transaction inserted but has not yet
    committed makes this wait for that transaction: the answer is never a guess.
    """
    dialect = Dialect(session.get_bind().dialect.name)
    statement = _INSERT_IGNORING.get((dialect, table))
    if statement is None:
        module: Any = postgresql if dialect is Dialect.POSTGRESQL else sqlite
        # RETURNING, not rowcount: psycopg reports rowcount -1 for this statement.
        statement = (
            module.insert(table).on_conflict_do_nothing().returning(*table.primary_key.columns)
        )
        _INSERT_IGNORING[(dialect, table)] = statement
    # The values as parameters of one statement object, not baked into a new one: the
    # nonce of every signed request comes through here, and a fresh statement costs
    # SQLAlchemy a cache-key walk over its values each time.
    return session.execute(statement, dict(values)).first() is not None


# One statement per (dialect, table); a cache of immutable SQL constructs, filled once.
_INSERT_IGNORING: dict[tuple[Dialect, Table], Any] = {}


def _for_update(db: Database) -> dict[str, Any]:
    # Row locks where the engine has them; SQLite's IMMEDIATE transaction already
    # excludes every other writer.
    return {"skip_locked": True} if db.dialect is Dialect.POSTGRESQL else {}


# ---------------------------------------------------------------- runs and policies


@dataclass(frozen=True)
class RunSpec:
    """The immutable facts of a run, from the operator's config."""

    run_id: str
    trainer_public_key: bytes
    base_model_id: str
    tokenizer_sha256: str
    reward_spec_json: str
    reward_spec_hash: str
    sampling: Mapping[str, Any]
    group_size: int
    max_policy_lag: int


_IMMUTABLE_RUN_FIELDS = (
    "trainer_public_key",
    "base_model_id",
    "tokenizer_sha256",
    "reward_spec_hash",
    "group_size",
)


def ensure_run(db: Database, spec: RunSpec, now_ms: int) -> Run:
    """Create the run, or return it when it exists with the same identity.

    A run's trainer key, base model, tokenizer, reward spec and group size are fixed at
    creation: rollouts already accepted were produced under them. A config that changes
    one raises `ConflictError`; `max_policy_lag` and sampling may change between starts.
    """
    if len(spec.trainer_public_key) != PUBLIC_KEY_BYTES:
        raise ConflictError(
            f"run {spec.run_id!r}: trainer_public_key has {len(spec.trainer_public_key)} "
            f"bytes, an Ed25519 public key has {PUBLIC_KEY_BYTES}"
        )
    with db.write() as session:
        run = session.get(Run, spec.run_id)
        if run is None:
            run = Run(
                run_id=spec.run_id,
                trainer_public_key=spec.trainer_public_key,
                base_model_id=spec.base_model_id,
                tokenizer_sha256=spec.tokenizer_sha256,
                reward_spec_json=spec.reward_spec_json,
                reward_spec_hash=spec.reward_spec_hash,
                sampling_json=canonical_json(dict(spec.sampling)),
                group_size=spec.group_size,
                max_policy_lag=spec.max_policy_lag,
                accepting_work=True,
                latest_policy_version=0,
                head_cursor=0,
                created_unix_ms=now_ms,
            )
            session.add(run)
            return run
        changed = [f for f in _IMMUTABLE_RUN_FIELDS if getattr(run, f) != getattr(spec, f)]
        if changed:
            raise ConflictError(
                f"run {spec.run_id!r} exists with different {', '.join(changed)}: these are "
                "fixed when a run is created; start a new run id to change them"
            )
        run.max_policy_lag = spec.max_policy_lag
        run.sampling_json = canonical_json(dict(spec.sampling))
        return run


def get_run(db: Database, run_id: str) -> Run | None:
    """The run, or None."""
    with db.read() as session:
        return session.get(Run, run_id)


def list_runs(db: Database) -> list[Run]:
    """All runs, oldest first."""
    with db.read() as session:
        return list(session.scalars(select(Run).order_by(Run.created_unix_ms, Run.run_id)))


@dataclass(frozen=True)
class PolicyDraft:
    """A policy version the trainer announced (its manifest already verified)."""

    run_id: str
    version: int
    parent_version: int | None
    kind: PolicyKind
    manifest_json: bytes
    shards: Sequence[Mapping[str, Any]]
    trained_through_cursor: int
    trainer_step: int
    metrics: Mapping[str, float]


def publish_policy(db: Database, draft: PolicyDraft, now_ms: int) -> PolicyVersion:
    """Store version `draft.version`, which must be the run's latest + 1.

    The run's `latest_policy_version` moves by a conditional UPDATE, so two trainers (or
    a retried call racing the original) cannot both publish the same version: the loser
    gets `ConflictError` naming the current latest.
    """
    with db.write() as session:
        moved = session.execute(
            update(Run)
            .where(Run.run_id == draft.run_id, Run.latest_policy_version == draft.version - 1)
            .values(latest_policy_version=draft.version)
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            run = session.get(Run, draft.run_id)
            if run is None:
                raise NotFoundError(f"run {draft.run_id!r} does not exist: create it first")
            raise ConflictError(
                f"run {draft.run_id!r} is at policy version {run.latest_policy_version}; "
                f"version {draft.version} is not the next one "
                f"({run.latest_policy_version + 1}): publish versions in order"
            )
        policy = PolicyVersion(
            run_id=draft.run_id,
            version=draft.version,
            parent_version=draft.parent_version,
            kind=draft.kind,
            manifest_json=draft.manifest_json,
            shards_json=canonical_json([dict(s) for s in draft.shards]),
            trained_through_cursor=draft.trained_through_cursor,
            trainer_step=draft.trainer_step,
            metrics_json=canonical_json(dict(draft.metrics)),
            published_unix_ms=now_ms,
        )
        session.add(policy)
        return policy


def get_policy(db: Database, run_id: str, version: int) -> PolicyVersion | None:
    """One policy version, or None."""
    with db.read() as session:
        return session.get(PolicyVersion, (run_id, version))


# ---------------------------------------------------------------- workers


def _lift_expired_ban(session: Session, worker_id: str, now_ms: int) -> None:
    # A timed ban ends by itself; the streak starts again at 0 (always audited).
    session.execute(
        update(Worker)
        .where(
            Worker.worker_id == worker_id,
            Worker.state == WorkerState.BANNED,
            Worker.banned_until_unix_ms.is_not(None),
            Worker.banned_until_unix_ms <= now_ms,
        )
        .values(
            state=WorkerState.ACTIVE,
            ban_reason=None,
            banned_until_unix_ms=None,
            valid_streak=0,
        )
    )


def upsert_worker(
    db: Database,
    public_key: bytes,
    *,
    display_name: str,
    client_version: str,
    capabilities: Mapping[str, Any],
    now_ms: int,
) -> Worker:
    """Register a key, or refresh its name, version and capabilities (Register is
    idempotent). Returns the row, whose state tells whether the key is banned."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ConflictError(
            f"a worker key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}: send the raw "
            "Ed25519 public key"
        )
    worker_id = fingerprint(public_key)
    with db.write() as session:
        inserted = insert_ignoring_conflicts(
            session,
            Worker.__table__,  # type: ignore[arg-type]
            {
                "worker_id": worker_id,
                "public_key": public_key,
                "display_name": display_name,
                "client_version": client_version,
                "capabilities_json": canonical_json(dict(capabilities)),
                "registered_unix_ms": now_ms,
                "last_seen_unix_ms": now_ms,
                "state": WorkerState.ACTIVE,
                "valid_streak": 0,
                "audits_failed": 0,
                "batches_accepted": 0,
                "batches_rejected": 0,
                "batches_voided": 0,
                "credit_granted": 0,
                "credit_pending": 0,
            },
        )
        worker = session.get(Worker, worker_id, with_for_update=not inserted)
        if worker is None:  # pragma: no cover - the row exists after the insert
            raise NotFoundError(f"worker {worker_id} vanished during registration")
        if worker.public_key != public_key:
            # Two keys with one 64-bit fingerprint: astronomically unlikely by chance.
            raise ConflictError(
                f"worker id {worker_id} already belongs to another key: generate a new key"
            )
        if not inserted:
            worker.display_name = display_name
            worker.client_version = client_version
            worker.capabilities_json = canonical_json(dict(capabilities))
            worker.last_seen_unix_ms = now_ms
            _lift_expired_ban(session, worker_id, now_ms)
            session.refresh(worker)
        return worker


def touch_worker(db: Database, worker_id: str, now_ms: int) -> Worker:
    """Record a sign of life (heartbeat, any signed call) and return the worker."""
    with db.write() as session:
        _lift_expired_ban(session, worker_id, now_ms)
        session.execute(
            update(Worker).where(Worker.worker_id == worker_id).values(last_seen_unix_ms=now_ms)
        )
        worker = session.get(Worker, worker_id)
        if worker is None:
            raise NotFoundError(f"worker {worker_id} is not registered: call Register first")
        session.refresh(worker)
        return worker


def get_worker(db: Database, worker_id: str) -> Worker | None:
    """The worker, or None."""
    with db.read() as session:
        return session.get(Worker, worker_id)


# ---------------------------------------------------------------- leases


@dataclass(frozen=True)
class LeaseTask:
    """One task of a lease with the coordinator's per-sample seeds."""

    task_id: str
    seeds: Sequence[int]


def create_lease(
    db: Database,
    *,
    run_id: str,
    worker_id: str,
    policy_version: int,
    tasks: Sequence[LeaseTask],
    issued_ms: int,
    deadline_ms: int,
) -> Lease:
    """Open a lease for an active worker. Each task must carry exactly group_size seeds."""
    if not tasks:
        raise ConflictError("a lease needs at least one task")
    if deadline_ms <= issued_ms:
        raise ConflictError(f"lease deadline {deadline_ms} must be after issue time {issued_ms}")
    with db.write() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise NotFoundError(f"run {run_id!r} does not exist")
        for task in tasks:
            if len(task.seeds) != run.group_size:
                raise ConflictError(
                    f"task {task.task_id!r} has {len(task.seeds)} seeds but run {run_id!r} has "
                    f"group size {run.group_size}: give one seed per sample"
                )
        # Locking the worker orders this lease after a concurrent ban: a ban's commit
        # either precedes it (we see BANNED) or follows it (the ban revokes this lease).
        worker = session.get(Worker, worker_id, with_for_update=True)
        if worker is None:
            raise NotFoundError(f"worker {worker_id} is not registered: call Register first")
        if worker.state is WorkerState.BANNED:
            raise WorkerBannedError(f"worker {worker_id} is banned: {worker.ban_reason}")
        lease = Lease(
            lease_id=new_id(),
            run_id=run_id,
            worker_id=worker_id,
            policy_version=policy_version,
            tasks_json=canonical_json(
                [{"task_id": t.task_id, "seeds": [int(s) for s in t.seeds]} for t in tasks]
            ),
            n_tasks=len(tasks),
            issued_unix_ms=issued_ms,
            deadline_unix_ms=deadline_ms,
            state=LeaseState.OPEN,
        )
        session.add(lease)
        return lease


def lease_tasks(lease: Lease) -> list[LeaseTask]:
    """The tasks (with seeds) stored in a lease row."""
    return [LeaseTask(t["task_id"], list(t["seeds"])) for t in json.loads(lease.tasks_json)]


def get_lease(db: Database, lease_id: str) -> Lease | None:
    """The lease, or None."""
    with db.read() as session:
        return session.get(Lease, lease_id)


def release_lease(db: Database, lease_id: str, worker_id: str, now_ms: int) -> bool:
    """Give an open lease back; False when it was not open (releasing is idempotent).

    `NotFoundError` when the lease does not exist or belongs to another worker.
    """
    with db.write() as session:
        closed = session.execute(
            update(Lease)
            .where(
                Lease.lease_id == lease_id,
                Lease.worker_id == worker_id,
                Lease.state == LeaseState.OPEN,
            )
            .values(state=LeaseState.RELEASED, closed_unix_ms=now_ms)
        )
        if closed.rowcount == 1:  # type: ignore[attr-defined]
            return True
        lease = session.get(Lease, lease_id)
        if lease is None or lease.worker_id != worker_id:
            raise NotFoundError(f"worker {worker_id} holds no lease {lease_id!r}")
        return False


_DUE_LEASE = (
    select(Lease.lease_id)
    .where(Lease.state == LeaseState.OPEN, Lease.deadline_unix_ms < bindparam("now_ms"))
    .limit(1)
)


def expire_leases(db: Database, now_ms: int, limit: int = 500) -> list[Lease]:
    """Close up to `limit` open leases whose deadline passed; return them so their tasks
    go back to the pool. Replicas may sweep at once: on PostgreSQL each lease is taken
    by one sweeper (SKIP LOCKED) and the conditional UPDATE makes it final."""
    # Most sweeps find nothing due: a read says so without taking SQLite's one write
    # lock, which every batch's commit waits for.
    with db.read() as session:
        if session.scalar(_DUE_LEASE, {"now_ms": now_ms}) is None:
            return []
    with db.write() as session:
        due = list(
            session.scalars(
                select(Lease.lease_id)
                .where(Lease.state == LeaseState.OPEN, Lease.deadline_unix_ms < now_ms)
                .order_by(Lease.deadline_unix_ms)
                .limit(limit)
                .with_for_update(**_for_update(db))
            )
        )
        if not due:
            return []
        session.execute(
            update(Lease)
            .where(Lease.lease_id.in_(due), Lease.state == LeaseState.OPEN)
            .values(state=LeaseState.EXPIRED, closed_unix_ms=now_ms)
        )
        return list(session.scalars(select(Lease).where(Lease.lease_id.in_(due))))


def open_lease_count(db: Database, run_id: str) -> int:
    """Leases of the run currently open."""
    with db.read() as session:
        count = session.scalar(
            select(func.count())
            .select_from(Lease)
            .where(Lease.run_id == run_id, Lease.state == LeaseState.OPEN)
        )
        return int(count or 0)


# ---------------------------------------------------------------- replay nonces


def remember_nonce(
    db: Database, signer: bytes, nonce: bytes, *, expires_ms: int, now_ms: int
) -> bool:
    """Record an envelope's (signer, nonce); False when it is still remembered (a replay).

    Shared by all replicas, unlike the in-process cache of `EnvelopeVerifier`.
    """
    with db.write() as session:
        if insert_ignoring_conflicts(
            session,
            SeenNonce.__table__,  # type: ignore[arg-type]
            {"signer": signer, "nonce": nonce, "expires_unix_ms": expires_ms},
        ):
            return True
        # A remembered nonce past its expiry is reusable (its envelope fails the clock
        # check by then anyway); refresh it instead of calling it a replay.
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


_EXPIRED_NONCE = (
    select(SeenNonce.expires_unix_ms)
    .where(SeenNonce.expires_unix_ms < bindparam("now_ms"))
    .limit(1)
)


def prune_nonces(db: Database, now_ms: int) -> int:
    """Forget nonces past their expiry; returns how many."""
    with db.read() as session:  # as in `expire_leases`: no write lock for nothing
        if session.scalar(_EXPIRED_NONCE, {"now_ms": now_ms}) is None:
            return 0
    with db.write() as session:
        result = session.execute(delete(SeenNonce).where(SeenNonce.expires_unix_ms < now_ms))
        return int(result.rowcount)  # type: ignore[attr-defined]
