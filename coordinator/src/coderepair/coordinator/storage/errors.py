"""Typed errors of the storage layer; the service maps each to a gRPC status or rejection.

All derive from `StorageError` (a `ProtocolError`), so a caller can tell "the request
conflicts with stored state" apart from a database failure (SQLAlchemy's own errors,
which mean: retry, nothing was written).
"""

from __future__ import annotations

from dataclasses import dataclass

from coderepair.protocol.errors import ProtocolError

__all__ = [
    "ConflictError",
    "CursorBeyondHeadError",
    "DuplicateCompletionError",
    "DuplicateMatch",
    "IdempotencyConflictError",
    "JobNotClaimedError",
    "LeaseNotOpenError",
    "NotFoundError",
    "StorageError",
    "WorkerBannedError",
]


class StorageError(ProtocolError):
    """A request conflicts with the stored state; nothing was written."""


class NotFoundError(StorageError):
    """A run, worker, lease, batch or job named by the request does not exist."""


class ConflictError(StorageError):
    """The request contradicts stored state (e.g. a policy version that is not next)."""


class IdempotencyConflictError(ConflictError):
    """An idempotency key was reused for a different payload."""


class WorkerBannedError(StorageError):
    """The worker is banned, so it may not take leases or submit."""


class LeaseNotOpenError(StorageError):
    """A batch answers a lease that is unknown, not the signer's, expired or closed.

    `reason` is the `RejectionReason` name the service should answer with
    (UNKNOWN_LEASE, NOT_LEASE_OWNER, LEASE_EXPIRED, STALE_POLICY or CONFLICT).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DuplicateMatch:
    """A stored accepted sample whose completion digest equals a submitted one."""

    completion_sha256: str
    run_id: str
    cursor: int
    batch_id: str
    worker_id: str


class DuplicateCompletionError(StorageError):
    """A submitted completion repeats one another worker already had accepted."""

    def __init__(self, matches: list[DuplicateMatch]) -> None:
        first = matches[0]
        super().__init__(
            f"{len(matches)} completion(s) repeat samples already accepted from other "
            f"workers (e.g. {first.completion_sha256[:16]}... in batch {first.batch_id}): "
            "submit only completions your own engine generated for this lease"
        )
        self.matches = matches


class CursorBeyondHeadError(StorageError):
    """An ack names a cursor that was never handed out."""


class JobNotClaimedError(StorageError):
    """A verdict for an audit job this validator does not hold (finished, or its claim
    expired and another validator took it)."""
