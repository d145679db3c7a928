"""The coordinator's tables (SQLAlchemy 2 declarative), shared by SQLite and PostgreSQL.

Conventions:
- Times are milliseconds since the Unix epoch in BIGINT columns named `*_unix_ms`, as in
  the gRPC contract, so no time zone or driver conversion stands between a row and a
  message.
- Public keys are raw 32-byte Ed25519 keys; `workers.worker_id` is the key's fingerprint
  (`coderepair.protocol.identity.fingerprint`), the id the contract shows.
- Enumerations are stored as short strings with a CHECK constraint (not native enums),
  so adding a state is a constraint change rather than an `ALTER TYPE` and the two
  engines hold identical values.
- JSON documents are TEXT (`*_json`) that the repository encodes canonically; the
  database never has to query inside them.
- Constraint and index names follow `NAMING_CONVENTION`, so migrations can address them
  by name on both engines.

The rollout payloads themselves are Parquet files in the object store
(`coderepair.protocol.rollout`); `rollouts` holds one index row per accepted sample: the
cursor the trainer reads by, where the sample lies (batch object + row), and the few
columns that duplicate detection and the dashboard query.
"""

from __future__ import annotations

import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "NAMING_CONVENTION",
    "AuditJob",
    "AuditKind",
    "AuditState",
    "Base",
    "Batch",
    "BatchState",
    "CreditEntry",
    "CreditKind",
    "Lease",
    "LeaseState",
    "PolicyKind",
    "PolicyVersion",
    "Rollout",
    "Run",
    "SeenNonce",
    "TrainerAck",
    "Worker",
    "WorkerState",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base whose metadata carries the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class WorkerState(enum.StrEnum):
    """Lifecycle of a worker key (common.proto `WorkerState`)."""

    ACTIVE = "active"
    BANNED = "banned"


class LeaseState(enum.StrEnum):
    """Lifecycle of a lease. Only OPEN leases hold tasks; every other state is final."""

    OPEN = "open"
    SUBMITTED = "submitted"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"


class BatchState(enum.StrEnum):
    """Verdict on a stored batch (common.proto `BatchState`)."""

    PENDING_AUDIT = "pending_audit"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    VOIDED = "voided"


class PolicyKind(enum.StrEnum):
    """How a policy version's weights are shipped (manifest `kind`)."""

    FULL = "full"
    DELTA = "delta"


class AuditKind(enum.StrEnum):
    """What an audit re-checks (admin.proto `AuditKind`)."""

    PROOF = "proof"
    SAMPLING = "sampling"
    REWARD = "reward"


class AuditState(enum.StrEnum):
    """Lifecycle of an audit job; PASSED and FAILED are final, ERROR is retried."""

    PENDING = "pending"
    CLAIMED = "claimed"
    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"


class CreditKind(enum.StrEnum):
    """Why a credit ledger entry moved credit."""

    PENDING = "pending"  # batch accepted: credit waits for the audit window
    GRANT = "grant"  # audit window closed: pending credit becomes granted
    VOID = "void"  # failed audit or ban: pending credit is withdrawn


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    # Stored by value ("pending_audit"), checked by a named CHECK constraint.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


class Run(Base):
    """A training run. Its row is also the run's cursor counter (`head_cursor`)."""

    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    trainer_public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    base_model_id: Mapped[str] = mapped_column(String(256))
    tokenizer_sha256: Mapped[str] = mapped_column(String(64))
    reward_spec_json: Mapped[str] = mapped_column(Text)
    reward_spec_hash: Mapped[str] = mapped_column(String(64))
    sampling_json: Mapped[str] = mapped_column(Text)
    group_size: Mapped[int] = mapped_column(Integer)
    max_policy_lag: Mapped[int] = mapped_column(Integer)
    accepting_work: Mapped[bool] = mapped_column(Boolean, default=True)
    latest_policy_version: Mapped[int] = mapped_column(BigInteger, default=0)
    # Last cursor handed out. Acceptors lock this row (UPDATE ... RETURNING) to take the
    # next range, which serialises them per run: see repo.py, "Cursor assignment".
    head_cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    created_unix_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("group_size >= 1", name="group_size_positive"),
        CheckConstraint("max_policy_lag >= 0", name="max_policy_lag_non_negative"),
        CheckConstraint("head_cursor >= 0", name="head_cursor_non_negative"),
    )


class PolicyVersion(Base):
    """A published policy version of a run with its trainer-signed manifest."""

    __tablename__ = "policy_versions"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    parent_version: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[PolicyKind] = mapped_column(_enum(PolicyKind, "policy_kind"))
    # Exact bytes of SignedManifest.to_bytes(): workers verify them, so never re-encode.
    manifest_json: Mapped[bytes] = mapped_column(LargeBinary)
    shards_json: Mapped[str] = mapped_column(Text)
    trained_through_cursor: Mapped[int] = mapped_column(BigInteger)
    trainer_step: Mapped[int] = mapped_column(BigInteger)
    metrics_json: Mapped[str] = mapped_column(Text)
    published_unix_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("version >= 1", name="version_positive"),
        CheckConstraint(
            "parent_version IS NULL OR parent_version < version", name="parent_before_child"
        ),
    )


class Worker(Base):
    """A worker key with its reputation (BOINC streak) and credit counters."""

    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    display_name: Mapped[str] = mapped_column(String(64), default="")
    client_version: Mapped[str] = mapped_column(String(64), default="")
    capabilities_json: Mapped[str] = mapped_column(Text, default="{}")
    registered_unix_ms: Mapped[int] = mapped_column(BigInteger)
    last_seen_unix_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    state: Mapped[WorkerState] = mapped_column(
        _enum(WorkerState, "worker_state"), default=WorkerState.ACTIVE
    )
    ban_reason: Mapped[str | None] = mapped_column(Text)
    banned_until_unix_ms: Mapped[int | None] = mapped_column(BigInteger)
    valid_streak: Mapped[int] = mapped_column(Integer, default=0)
    audits_failed: Mapped[int] = mapped_column(Integer, default=0)
    batches_accepted: Mapped[int] = mapped_column(BigInteger, default=0)
    batches_rejected: Mapped[int] = mapped_column(BigInteger, default=0)
    batches_voided: Mapped[int] = mapped_column(BigInteger, default=0)
    credit_granted: Mapped[int] = mapped_column(BigInteger, default=0)
    credit_pending: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        CheckConstraint("credit_pending >= 0", name="credit_pending_non_negative"),
        CheckConstraint("valid_streak >= 0", name="valid_streak_non_negative"),
    )


class Lease(Base):
    """Work handed to one worker: tasks with the coordinator's seeds, until a deadline."""

    __tablename__ = "leases"

    lease_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"))
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.worker_id"))
    policy_version: Mapped[int] = mapped_column(BigInteger)
    # [{"task_id": ..., "seeds": [...]}, ...] in lease order.
    tasks_json: Mapped[str] = mapped_column(Text)
    n_tasks: Mapped[int] = mapped_column(Integer)
    issued_unix_ms: Mapped[int] = mapped_column(BigInteger)
    deadline_unix_ms: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[LeaseState] = mapped_column(
        _enum(LeaseState, "lease_state"), default=LeaseState.OPEN
    )
    closed_unix_ms: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        # The expiry sweep: open leases past their deadline.
        Index(None, "state", "deadline_unix_ms"),
        # Heartbeat (revoked leases of a worker) and "open leases" per run.
        Index(None, "worker_id", "state"),
        Index(None, "run_id", "state"),
        CheckConstraint("n_tasks >= 1", name="n_tasks_positive"),
    )


class Batch(Base):
    """A submitted batch and its verdict; stored once per (worker, idempotency key).

    Rejected batches are stored too (without rollouts), so a retry with the same key is
    answered with the same verdict. `run_id`/`lease_id` may be NULL only for a batch
    refused before its lease could be resolved (unknown lease).
    """

    __tablename__ = "batches"

    batch_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.worker_id"))
    idempotency_key: Mapped[str] = mapped_column(String(64))
    # sha256 of the SubmitPayload bytes: the same key with other content is a conflict.
    payload_sha256: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.run_id"))
    lease_id: Mapped[str | None] = mapped_column(ForeignKey("leases.lease_id"))
    policy_version: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[BatchState] = mapped_column(_enum(BatchState, "batch_state"))
    # RejectionReason name without prefix ("DUPLICATE", "AUDIT_PROOF"); set when
    # REJECTED or VOIDED.
    rejection_reason: Mapped[str | None] = mapped_column(String(32))
    rejection_message: Mapped[str | None] = mapped_column(Text)
    audit_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    object_key: Mapped[str | None] = mapped_column(String(512))
    n_samples: Mapped[int] = mapped_column(Integer, default=0)
    # Credit unit: completion tokens of the batch's samples.
    n_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    created_unix_ms: Mapped[int] = mapped_column(BigInteger)
    decided_unix_ms: Mapped[int] = mapped_column(BigInteger)
    first_cursor: Mapped[int | None] = mapped_column(BigInteger)
    last_cursor: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        UniqueConstraint("worker_id", "idempotency_key"),
        # Audit-window sweep and per-run stats.
        Index(None, "state", "created_unix_ms"),
        Index(None, "run_id", "state"),
        Index(None, "worker_id", "created_unix_ms"),
        Index(None, "lease_id"),
        # Cursors are set later in the accepting transaction (after the run lock), so
        # they cannot be part of this check.
        CheckConstraint(
            "state = 'rejected' OR (run_id IS NOT NULL AND lease_id IS NOT NULL)",
            name="accepted_has_lease",
        ),
    )


class Rollout(Base):
    """One accepted sample in the trainer stream, keyed by (run, cursor)."""

    __tablename__ = "rollouts"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), primary_key=True)
    cursor: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.batch_id"), index=True)
    # Position of the sample in the batch's Parquet file.
    row_index: Mapped[int] = mapped_column(Integer)
    task_id: Mapped[str] = mapped_column(String(128))
    sample_index: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(16))
    policy_version: Mapped[int] = mapped_column(BigInteger)
    completion_sha256: Mapped[str] = mapped_column(String(64), index=True)
    n_completion_tokens: Mapped[int] = mapped_column(Integer)
    reward: Mapped[float] = mapped_column(Float)
    accepted_unix_ms: Mapped[int] = mapped_column(BigInteger)
    # Set when the batch is voided; the stream skips such rows (gaps are allowed).
    voided: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        CheckConstraint("cursor >= 1", name="cursor_positive"),
        # Reward curve and rollouts/s on the dashboard.
        Index(None, "run_id", "accepted_unix_ms"),
    )


class AuditJob(Base):
    """One audit of one batch, claimed by a validator (SKIP LOCKED on PostgreSQL)."""

    __tablename__ = "audit_jobs"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.batch_id"))
    worker_id: Mapped[str] = mapped_column(String(16))
    kind: Mapped[AuditKind] = mapped_column(_enum(AuditKind, "audit_kind"))
    state: Mapped[AuditState] = mapped_column(
        _enum(AuditState, "audit_state"), default=AuditState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_unix_ms: Mapped[int | None] = mapped_column(BigInteger)
    # A claim not finished by then may be taken by another validator (crashed holder).
    claim_expires_unix_ms: Mapped[int | None] = mapped_column(BigInteger)
    detail: Mapped[str] = mapped_column(Text, default="")
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    created_unix_ms: Mapped[int] = mapped_column(BigInteger)
    finished_unix_ms: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        UniqueConstraint("batch_id", "kind"),
        # The claim query: oldest claimable job first.
        Index(None, "state", "created_unix_ms"),
        Index(None, "worker_id", "created_unix_ms"),
    )


class TrainerAck(Base):
    """The cursors a run's trainer has checkpointed and consumed; both move only forward."""

    __tablename__ = "trainer_acks"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), primary_key=True)
    acked_cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    # Rows up to here are trained on, dropped or held by the trainer, checkpointed or not;
    # back-pressure counts from here (migration 0002; never below acked_cursor).
    consumed_cursor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    trainer_step: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_unix_ms: Mapped[int] = mapped_column(BigInteger)


class CreditEntry(Base):
    """Append-only history of credit movements; the worker row holds the totals."""

    __tablename__ = "credit_ledger"

    # INTEGER on SQLite so the column is the rowid alias and autoincrements.
    entry_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.worker_id"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.batch_id"))
    kind: Mapped[CreditKind] = mapped_column(_enum(CreditKind, "credit_kind"))
    # Signed changes to the worker's pending and granted totals.
    pending_delta: Mapped[int] = mapped_column(BigInteger)
    granted_delta: Mapped[int] = mapped_column(BigInteger)
    created_unix_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index(None, "worker_id", "created_unix_ms"),)


class SeenNonce(Base):
    """Envelope nonces seen recently, shared by coordinator replicas (replay defence)."""

    __tablename__ = "seen_nonces"

    signer: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(16), primary_key=True)
    expires_unix_ms: Mapped[int] = mapped_column(BigInteger, index=True)
