"""Fills a real coordinator database through the storage layer's own functions, for
the dashboard tests: runs, workers, accepted and refused batches, policy versions."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from coderepair.coordinator.storage import batches, repo
from coderepair.coordinator.storage.batches import BatchDraft, Rejection, SampleIndex
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.models import AuditKind, Batch, PolicyKind, Worker

T0 = 1_700_000_000_000
G = 4


@dataclass
class World:
    """A database with one run ("r1", group size G) and a way to add rows to it."""

    db: Database
    run_id: str = "r1"
    _keys: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def worker(self, name: str, key_byte: int, now_ms: int = T0) -> Worker:
        return repo.upsert_worker(
            self.db,
            bytes([key_byte]) * 32,
            display_name=name,
            client_version="0.1.0",
            capabilities={},
            now_ms=now_ms,
        )

    def accept(
        self,
        worker: Worker,
        rewards: Sequence[float],
        now_ms: int,
        *,
        policy_version: int = 0,
        audit_kinds: Sequence[AuditKind] = (),
        tokens: int = 5,
    ) -> Batch:
        """An accepted batch of one task with len(rewards) == G samples at `now_ms`."""
        n = next(self._keys)
        task = f"task-{n}"
        lease = repo.create_lease(
            self.db,
            run_id=self.run_id,
            worker_id=worker.worker_id,
            policy_version=policy_version,
            tasks=[repo.LeaseTask(task, list(range(G)))],
            issued_ms=now_ms - 1,
            deadline_ms=now_ms + 60_000,
        )
        samples = [
            SampleIndex(i, task, i, batches.completion_digest(task, [n, i]), tokens, reward)
            for i, reward in enumerate(rewards)
        ]
        draft = BatchDraft(
            worker_id=worker.worker_id,
            idempotency_key=f"key-{n}",
            payload_sha256=f"{n:064x}",
            run_id=self.run_id,
            lease_id=lease.lease_id,
            policy_version=policy_version,
            object_key=f"runs/{self.run_id}/{n}.parquet",
            samples=samples,
            audit_kinds=audit_kinds,
        )
        return batches.record_batch(self.db, draft, now_ms).batch

    def reject(self, worker: Worker, reason: str, now_ms: int) -> Batch:
        """A batch refused for `reason` before its lease was resolved."""
        n = next(self._keys)
        draft = BatchDraft(
            worker_id=worker.worker_id,
            idempotency_key=f"key-{n}",
            payload_sha256=f"{n:064x}",
            run_id=None,
            lease_id=None,
            policy_version=0,
            rejection=Rejection(reason, f"refused: {reason}"),
        )
        return batches.record_batch(self.db, draft, now_ms).batch

    def publish(self, version: int, now_ms: int, metrics: dict[str, float] | None = None) -> None:
        repo.publish_policy(
            self.db,
            repo.PolicyDraft(
                run_id=self.run_id,
                version=version,
                parent_version=version - 1 if version > 1 else None,
                kind=PolicyKind.FULL if version == 1 else PolicyKind.DELTA,
                manifest_json=b"{}",
                shards=[],
                trained_through_cursor=0,
                trainer_step=version * 10,
                metrics=metrics or {},
            ),
            now_ms,
        )


def make_world(db: Database, run_id: str = "r1", now_ms: int = T0) -> World:
    """Create run `run_id` (group size G) in `db`."""
    repo.ensure_run(
        db,
        repo.RunSpec(
            run_id=run_id,
            trainer_public_key=b"\x01" * 32,
            base_model_id="tiny",
            tokenizer_sha256="a" * 64,
            reward_spec_json="{}",
            reward_spec_hash="b" * 64,
            sampling={"temperature": 1.0},
            group_size=G,
            max_policy_lag=2,
        ),
        now_ms,
    )
    return World(db, run_id)
