"""The coordinator's storage on a real PostgreSQL: migrations, idempotent batches,
gap-free cursors with concurrent acceptors, and SKIP LOCKED audit claims.

Threads stand in for coordinator replicas: each repository call takes its own pooled
connection, so the transactions interleave in the server exactly as they would from
several processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
from pg_storage_support import T0, ensure_test_run
from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from coderepair.coordinator.storage import audits, batches, repo
from coderepair.coordinator.storage.batches import BatchDraft, SampleIndex
from coderepair.coordinator.storage.db import Database, Dialect
from coderepair.coordinator.storage.errors import (
    ConflictError,
    DuplicateCompletionError,
    JobNotClaimedError,
)
from coderepair.coordinator.storage.migrate import (
    current_revision,
    head_revision,
    schema_diff,
    upgrade_to_head,
)
from coderepair.coordinator.storage.models import (
    AuditJob,
    AuditKind,
    AuditState,
    Batch,
    PolicyKind,
    Worker,
)

pytestmark = pytest.mark.postgres

G = 4


@dataclass
class World:
    db: Database
    workers: list[Worker]


@pytest.fixture
def world(postgres_url: str) -> Iterator[World]:
    db = Database.open(postgres_url, pool_size=24)
    assert db.dialect is Dialect.POSTGRESQL
    upgrade_to_head(db.engine)
    ensure_test_run(db, G)
    workers = [
        repo.upsert_worker(
            db,
            bytes([n + 10]) * 32,
            display_name=f"w{n}",
            client_version="0.1.0",
            capabilities={},
            now_ms=T0,
        )
        for n in range(8)
    ]
    yield World(db, workers)
    db.close()


def _run_threads(n: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # re-raised below in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]


def _draft(
    world: World,
    worker: Worker,
    key: str,
    kinds: tuple[AuditKind, ...] = (),
    tasks: tuple[str, str] = ("t1", "t2"),
) -> BatchDraft:
    lease = repo.create_lease(
        world.db,
        run_id="r1",
        worker_id=worker.worker_id,
        policy_version=0,
        tasks=[repo.LeaseTask(task, list(range(G))) for task in tasks],
        issued_ms=T0,
        deadline_ms=T0 + 600_000,
    )
    samples = [
        SampleIndex(i, tasks[i // G], i % G, batches.completion_digest(key, [i]), 3 + i, i / 8)
        for i in range(2 * G)
    ]
    return BatchDraft(
        worker_id=worker.worker_id,
        idempotency_key=key,
        payload_sha256="c" * 64,
        run_id="r1",
        lease_id=lease.lease_id,
        policy_version=0,
        object_key=f"runs/r1/{key}.parquet",
        samples=samples,
        audit_kinds=kinds,
    )


def test_migrations_match_the_models_and_tolerate_concurrent_starters(postgres_url: str) -> None:
    _run_threads(4, lambda _: upgrade_to_head(postgres_url))
    db = Database.open(postgres_url)
    try:
        assert current_revision(db.engine) == head_revision()
        assert schema_diff(db.engine) == []
    finally:
        db.close()


def test_concurrent_retries_of_one_key_store_one_batch(world: World) -> None:
    draft = _draft(world, world.workers[0], "key-pg-concurrent-1")
    results: list[batches.RecordedBatch] = []
    _run_threads(12, lambda _: results.append(batches.record_batch(world.db, draft, T0 + 1)))
    assert sum(r.created for r in results) == 1
    assert len({r.batch.batch_id for r in results}) == 1
    assert batches.head_cursor(world.db, "r1") == 2 * G


def test_concurrent_acceptors_get_gap_free_cursors_seen_in_order(world: World) -> None:
    per_worker = 6
    drafts = {
        i: [_draft(world, world.workers[i], f"key-pg-{i}-{n:04d}") for n in range(per_worker)]
        for i in range(len(world.workers))
    }
    done = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        # A trainer following the stream: it must never observe cursor c+1 before c.
        after = 0
        while True:
            finished = done.is_set()
            rows = batches.read_stream(world.db, "r1", after, 50)
            for row in rows:
                assert row.cursor == after + 1, f"saw cursor {row.cursor} right after {after}"
                after = row.cursor
                seen.append(row.cursor)
            if finished and not rows:
                return

    reader_thread = threading.Thread(target=reader)
    reader_thread.start()
    try:
        _run_threads(
            len(world.workers),
            lambda i: [batches.record_batch(world.db, d, T0 + 1) for d in drafts[i]],
        )
    finally:
        done.set()
        reader_thread.join(timeout=60)
    total = len(world.workers) * per_worker * 2 * G
    assert seen == list(range(1, total + 1))
    assert batches.head_cursor(world.db, "r1") == total
    with world.db.read() as session:
        ranges = sorted(session.execute(select(Batch.first_cursor, Batch.last_cursor)).all())
    assert all(last - first + 1 == 2 * G for first, last in ranges)  # type: ignore[operator]
    assert [r[0] for r in ranges] == list(range(1, total + 1, 2 * G))


def test_duplicates_are_found_by_index_probes_before_any_analyze(world: World) -> None:
    """A copied completion is refused and found on PostgreSQL, and the query probes the
    digest index even on a big table PostgreSQL has no statistics for (a fresh
    deployment ingests faster than autovacuum analyses; `IN (...)` then scanned the
    whole table for every batch)."""
    alice, bob = world.workers[:2]
    first = _draft(world, alice, "key-pg-dup-1")
    original = batches.record_batch(world.db, first, T0 + 1)
    copied = _draft(world, bob, "key-pg-dup-2")
    samples = list(copied.samples)
    samples[3] = samples[3]._replace(completion_sha256=first.samples[3].completion_sha256)
    with pytest.raises(DuplicateCompletionError) as caught:
        batches.record_batch(world.db, replace(copied, samples=samples), T0 + 2)
    assert [m.batch_id for m in caught.value.matches] == [original.batch.batch_id]
    assert batches.head_cursor(world.db, "r1") == 2 * G  # nothing of the copy was written
    digest = samples[3].completion_sha256
    assert [m.worker_id for m in batches.find_duplicate_completions(world.db, [digest])] == [
        alice.worker_id
    ]
    assert batches.find_duplicate_completions(world.db, [digest], alice.worker_id) == []
    # 50,000 more rows, never analysed: the plan must still be index probes.
    with world.db.write() as session:
        session.execute(
            text(
                "INSERT INTO rollouts (run_id, cursor, batch_id, row_index, task_id, "
                "sample_index, worker_id, policy_version, completion_sha256, "
                "n_completion_tokens, reward, accepted_unix_ms, voided) "
                "SELECT 'r1', 1000 + n, :batch, 0, 't1', 0, :worker, 0, md5(n::text) || "
                "md5(n::text), 1, 0.0, 0, false FROM generate_series(1, 50000) AS n"
            ),
            {"batch": original.batch.batch_id, "worker": alice.worker_id},
        )
    with world.db.read() as session:
        plan = "\n".join(
            row[0]
            for row in session.connection().exec_driver_sql(
                "EXPLAIN " + batches._PG_DUPLICATES,
                {"digests": [f"{n:064x}" for n in range(64)], "worker_id": bob.worker_id},
            )
        )
    assert "Seq Scan on rollouts" not in plan, plan
    assert "ix_rollouts_completion_sha256" in plan, plan


def test_skip_locked_claims_never_hand_a_job_to_two_claimers(world: World) -> None:
    for n in range(10):
        batches.record_batch(
            world.db,
            _draft(world, world.workers[n % 8], f"key-pg-audit-{n:04d}", (AuditKind.PROOF,)),
            T0,
        )
    claimed: dict[int, list[str]] = {}

    def claimer(i: int) -> None:
        got: list[str] = []
        while jobs := audits.claim_audit_jobs(
            world.db, f"v{i}", now_ms=T0, limit=1, claim_ttl_ms=60_000
        ):
            got.extend(j.job_id for j in jobs)
        claimed[i] = got

    _run_threads(6, claimer)
    ids = [job for jobs in claimed.values() for job in jobs]
    assert len(ids) == 10 == len(set(ids))


def test_a_locked_job_is_skipped_not_waited_for(world: World) -> None:
    for n in range(2):
        batches.record_batch(
            world.db,
            _draft(world, world.workers[n], f"key-pg-skip-{n:04d}", (AuditKind.REWARD,)),
            T0 + n,
        )
    with world.db.write() as holder:
        # Another replica is in the middle of claiming the oldest job.
        locked = holder.scalars(
            select(AuditJob.job_id).order_by(AuditJob.created_unix_ms).limit(1).with_for_update()
        ).one()
        started = time.monotonic()
        jobs = audits.claim_audit_jobs(world.db, "v2", now_ms=T0, limit=10, claim_ttl_ms=1000)
        elapsed = time.monotonic() - started
    assert [j.job_id for j in jobs] != [] and locked not in {j.job_id for j in jobs}
    assert elapsed < 5.0  # it did not wait for the holder's transaction


def test_concurrent_expiry_sweeps_close_each_lease_once(world: World) -> None:
    for n in range(20):
        repo.create_lease(
            world.db,
            run_id="r1",
            worker_id=world.workers[n % 8].worker_id,
            policy_version=0,
            tasks=[repo.LeaseTask(f"t{n}", list(range(G)))],
            issued_ms=T0,
            deadline_ms=T0 + 10,
        )
    expired: list[str] = []
    _run_threads(4, lambda _: _sweep(world, expired))
    assert len(expired) == 20 == len(set(expired))


def _sweep(world: World, out: list[str]) -> None:
    while leases := repo.expire_leases(world.db, T0 + 11, limit=3):
        out.extend(lease.lease_id for lease in leases)


def test_conditional_updates_decide_on_postgresql(world: World) -> None:
    # These operations branch on how many rows a conditional UPDATE changed.
    draft = repo.PolicyDraft(
        run_id="r1", version=1, parent_version=None, kind=PolicyKind.FULL, manifest_json=b"{}",
        shards=[], trained_through_cursor=0, trainer_step=1, metrics={},
    )  # fmt: skip
    repo.publish_policy(world.db, draft, T0)
    with pytest.raises(ConflictError, match="not the next one"):
        repo.publish_policy(world.db, draft, T0)
    lease = _draft(world, world.workers[0], "key-pg-release-01").lease_id
    assert lease is not None
    assert repo.release_lease(world.db, lease, world.workers[0].worker_id, T0) is True
    assert repo.release_lease(world.db, lease, world.workers[0].worker_id, T0) is False
    signer, nonce = b"\x09" * 32, b"\x08" * 16
    assert repo.remember_nonce(world.db, signer, nonce, expires_ms=T0 + 5, now_ms=T0)
    assert not repo.remember_nonce(world.db, signer, nonce, expires_ms=T0 + 5, now_ms=T0 + 1)
    batches.record_batch(
        world.db, _draft(world, world.workers[1], "key-pg-verdict-1", (AuditKind.PROOF,)), T0
    )
    [job] = audits.claim_audit_jobs(world.db, "v1", now_ms=T0, limit=5, claim_ttl_ms=10)
    outcome = audits.finish_audit_job(
        world.db, job.job_id, "v1", verdict=AuditState.FAILED, detail="bad", metrics={},
        now_ms=T0 + 1, max_failed_audits=1,
    )  # fmt: skip
    assert outcome.batch_voided and outcome.worker_banned
    with pytest.raises(JobNotClaimedError):
        audits.finish_audit_job(
            world.db, job.job_id, "v1", verdict=AuditState.PASSED, detail="", metrics={},
            now_ms=T0 + 2, max_failed_audits=1,
        )  # fmt: skip
    assert batches.read_stream(world.db, "r1", 0, 100) == []


_LOCK = select(Worker.worker_id).where(Worker.worker_id == bindparam("w")).with_for_update()


def _one_group_beside(
    db: Database,
    other: Callable[[], None],
    started: threading.Event,
    ops: list[tuple[Callable[[Session], str], str | None]],
) -> list[str]:
    """Run `other` (a transaction) in a thread; once it has `started`, commit `ops`
    ((run, worker_id) pairs) as one group, queued behind a blocking operation so that
    they form one, and return their results after `other` has ended."""
    committer = batches.GroupCommitter(db)
    release = threading.Event()
    blocker = committer.submit(lambda session: release.wait(30))
    thread = threading.Thread(target=other)
    thread.start()
    assert started.wait(30)
    futures = [committer.submit(run, worker_id=worker_id) for run, worker_id in ops]
    release.set()
    assert blocker.result(30) is True
    results = [f.result(60) for f in futures]
    thread.join(60)
    return results


def test_a_group_commit_that_loses_a_deadlock_is_retried_whole(world: World) -> None:
    """Another transaction (a sweep) holds worker B and waits for worker A, which the
    group's first operation holds, while its second waits for B. PostgreSQL fails the
    group (the other side waits longer before it looks for deadlocks); the group rolls
    back, which lets the other transaction finish, and then commits on its retry."""
    a, b = world.workers[0].worker_id, world.workers[1].worker_id
    a_held, b_held, other_done = threading.Event(), threading.Event(), threading.Event()
    runs: list[str] = []

    def other() -> None:
        with world.db.write() as session:
            session.execute(text("SET LOCAL deadlock_timeout = '20s'"))
            session.execute(_LOCK, {"w": b})
            b_held.set()
            assert a_held.wait(30)
            session.execute(_LOCK, {"w": a})  # waits for the group's first operation
        other_done.set()

    def first(session: Session) -> str:
        runs.append("first")
        session.execute(_LOCK, {"w": a})
        a_held.set()
        time.sleep(0.5)  # the other transaction is waiting for `a` by now
        return "first"

    def second(session: Session) -> str:
        runs.append("second")
        session.execute(_LOCK, {"w": b})
        return "second"

    results = _one_group_beside(world.db, other, b_held, [(first, None), (second, None)])
    assert results == ["first", "second"]
    assert other_done.is_set()
    assert runs.count("first") >= 2  # the group ran again after the deadlock
    assert batches.is_transient(ValueError()) is False


def test_a_group_locks_its_workers_in_order_and_waits_instead_of_deadlocking(
    world: World,
) -> None:
    """A sweep-like transaction locks workers A then B (id order, as every transaction
    that locks several workers does). A group whose first operation is B's and second
    A's locks both up front in that same order, so it waits for the sweep instead of
    deadlocking with it: each operation runs once and the sweep commits. (Taken one
    operation at a time the group held B while waiting for A: a deadlock, and its whole
    group rolled back and ran again.)"""
    a, b = sorted(w.worker_id for w in world.workers[:2])
    a_held, other_done = threading.Event(), threading.Event()
    runs: list[str] = []

    def other() -> None:
        with world.db.write() as session:
            session.execute(text("SET LOCAL deadlock_timeout = '20s'"))
            session.execute(_LOCK, {"w": a})
            a_held.set()
            time.sleep(0.5)  # the group has started by now
            session.execute(_LOCK, {"w": b})
        other_done.set()

    def locking(worker_id: str) -> Callable[[Session], str]:
        def run(session: Session) -> str:
            runs.append(worker_id)
            session.execute(_LOCK, {"w": worker_id})
            return worker_id

        return run

    results = _one_group_beside(world.db, other, a_held, [(locking(b), b), (locking(a), a)])
    assert results == [b, a]
    assert other_done.is_set()
    assert runs == [b, a]  # once each: nobody was chosen as a deadlock victim
