"""Audit claims, verdicts, voiding, bans, the audit window and credit (SQLite)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest

from coderepair.coordinator.storage import audits, batches, repo
from coderepair.coordinator.storage.batches import BatchDraft, SampleIndex
from coderepair.coordinator.storage.errors import JobNotClaimedError
from coderepair.coordinator.storage.models import (
    AuditKind,
    AuditState,
    Batch,
    BatchState,
    Worker,
    WorkerState,
)

if TYPE_CHECKING:
    from storage_support import StorageWorld

T0 = 1_700_000_000_000
G = 4


def _submit(
    world: StorageWorld,
    worker: Worker,
    key: str,
    kinds: tuple[AuditKind, ...] = (),
    now: int = T0,
) -> Batch:
    lease_id = repo.create_lease(
        world.db,
        run_id="r1",
        worker_id=worker.worker_id,
        policy_version=0,
        tasks=[repo.LeaseTask("t1", list(range(G)))],
        issued_ms=T0,
        deadline_ms=T0 + 10_000,
    ).lease_id
    samples = [
        SampleIndex(i, "t1", i, batches.completion_digest(key, [i]), 10, 1.0) for i in range(G)
    ]
    draft = BatchDraft(
        worker_id=worker.worker_id,
        idempotency_key=key,
        payload_sha256="d" * 64,
        run_id="r1",
        lease_id=lease_id,
        policy_version=0,
        object_key=f"b/{key}",
        samples=samples,
        audit_kinds=kinds,
    )
    return batches.record_batch(world.db, draft, now).batch


def _claim(world: StorageWorld, who: str, now: int = T0, limit: int = 10) -> list[str]:
    jobs = audits.claim_audit_jobs(
        world.db, who, now_ms=now, limit=limit, claim_ttl_ms=1000, max_attempts=2
    )
    return [j.job_id for j in jobs]


def test_concurrent_claimers_never_share_a_job(storage_world: StorageWorld) -> None:
    world = storage_world
    for n in range(6):
        _submit(world, world.alice, f"key-claims-{n:06d}", (AuditKind.PROOF, AuditKind.REWARD))
    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        try:
            got: list[str] = []
            while batch := _claim(world, name, limit=1):
                got.extend(batch)
            claimed[name] = got
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"v{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    all_ids = [job for jobs in claimed.values() for job in jobs]
    assert len(all_ids) == 12 == len(set(all_ids))


def test_expired_claims_are_taken_over_and_the_old_holder_is_refused(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    _submit(world, world.alice, "key-expire-00001", (AuditKind.PROOF,))
    [job_id] = _claim(world, "v1")
    assert _claim(world, "v2", now=T0 + 999) == []
    assert _claim(world, "v2", now=T0 + 1001) == [job_id]
    with pytest.raises(JobNotClaimedError, match="held by 'v2'"):
        audits.finish_audit_job(
            world.db, job_id, "v1", verdict=AuditState.PASSED, detail="", metrics={},
            now_ms=T0 + 1002, max_failed_audits=3,
        )  # fmt: skip


def test_errored_audits_are_retried_up_to_the_attempt_limit(storage_world: StorageWorld) -> None:
    world = storage_world
    _submit(world, world.alice, "key-errored-0001", (AuditKind.REWARD,))
    for attempt in range(2):
        [job_id] = _claim(world, "v1", now=T0 + attempt)
        outcome = audits.finish_audit_job(
            world.db, job_id, "v1", verdict=AuditState.ERROR, detail="sandbox died",
            metrics={}, now_ms=T0 + attempt, max_failed_audits=3,
        )  # fmt: skip
        assert not outcome.batch_voided
    assert _claim(world, "v1", now=T0 + 5) == []  # max_attempts=2 reached
    worker = repo.get_worker(world.db, world.alice.worker_id)
    assert worker is not None and worker.audits_failed == 0


def test_failed_audit_voids_the_batch_withdraws_credit_and_resets_the_streak(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    batch = _submit(world, world.alice, "key-failed-00001", (AuditKind.PROOF, AuditKind.SAMPLING))
    jobs = _claim(world, "v1")
    outcome = audits.finish_audit_job(
        world.db, jobs[0], "v1", verdict=AuditState.FAILED, detail="exp mismatches 40",
        metrics={"exp_mismatches": 40.0}, now_ms=T0 + 1, max_failed_audits=3,
    )  # fmt: skip
    assert outcome.batch_voided and not outcome.worker_banned
    assert audits.audit_metrics(outcome.job) == {"exp_mismatches": 40.0}
    stored = batches.get_batch(world.db, batch.batch_id)
    assert stored is not None and stored.state is BatchState.VOIDED
    assert stored.rejection_reason in {"AUDIT_PROOF", "AUDIT_SAMPLING"}
    assert batches.read_stream(world.db, "r1", 0, 10) == []
    worker = repo.get_worker(world.db, world.alice.worker_id)
    assert worker is not None
    assert (worker.credit_pending, worker.audits_failed, worker.batches_voided) == (0, 1, 1)
    # The batch's other audit is not handed out any more: the batch is settled.
    assert _claim(world, "v2", now=T0 + 5000) == []


def test_repeated_failures_ban_the_key(storage_world: StorageWorld) -> None:
    world = storage_world
    for n in range(2):
        _submit(world, world.alice, f"key-ban-{n:08d}", (AuditKind.PROOF,))
    pending = _submit(world, world.alice, "key-ban-pending1", now=T0 + 1)
    outcomes = []
    for job_id in _claim(world, "v1"):
        outcome = audits.finish_audit_job(
            world.db, job_id, "v1", verdict=AuditState.FAILED, detail="bad", metrics={},
            now_ms=T0 + 1, max_failed_audits=2,
        )  # fmt: skip
        outcomes.append(outcome)
    assert [o.worker_banned for o in outcomes] == [False, True]
    worker = repo.get_worker(world.db, world.alice.worker_id)
    assert worker is not None and worker.state is WorkerState.BANNED
    assert "2 failed audits" in (worker.ban_reason or "")
    # A ban by audit voids the key's batches still in their audit window, audited or not:
    # a key that built a streak and then cheated sent most of its batches unaudited.
    stored = batches.get_batch(world.db, pending.batch_id)
    assert stored is not None and stored.state is BatchState.VOIDED
    assert worker.credit_pending == 0
    unbanned = audits.unban_worker(world.db, world.alice.worker_id, T0 + 2)
    assert unbanned.state is WorkerState.ACTIVE and unbanned.valid_streak == 0


def test_operator_ban_can_void_the_batches_in_their_audit_window(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    for n in range(3):
        _submit(world, world.alice, f"key-opban-{n:06d}")
    _submit(world, world.bob, "key-opban-bob001")
    worker, voided = audits.ban_worker(
        world.db, world.alice.worker_id, reason="sybil", until_ms=None, void_pending=True,
        now_ms=T0 + 1,
    )  # fmt: skip
    assert voided == 3 and worker.state is WorkerState.BANNED
    assert worker.credit_pending == 0 and worker.batches_voided == 3
    assert {r.worker_id for r in batches.read_stream(world.db, "r1", 0, 100)} == {
        world.bob.worker_id
    }


def test_audit_window_grants_credit_only_when_every_audit_passed(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    plain = _submit(world, world.alice, "key-window-plain")
    audited = _submit(world, world.alice, "key-window-audit", (AuditKind.PROOF,))
    assert audits.close_audit_windows(world.db, now_ms=T0 + 99, window_ms=100) == []
    closed = audits.close_audit_windows(world.db, now_ms=T0 + 100, window_ms=100)
    assert [b.batch_id for b in closed] == [plain.batch_id]  # the audit is outstanding
    [job_id] = _claim(world, "v1")
    audits.finish_audit_job(
        world.db, job_id, "v1", verdict=AuditState.PASSED, detail="ok", metrics={},
        now_ms=T0 + 101, max_failed_audits=3,
    )  # fmt: skip
    closed = audits.close_audit_windows(world.db, now_ms=T0 + 102, window_ms=100)
    assert [b.batch_id for b in closed] == [audited.batch_id]
    assert closed[0].state is BatchState.ACCEPTED
    worker = repo.get_worker(world.db, world.alice.worker_id)
    assert worker is not None
    assert (worker.credit_pending, worker.credit_granted, worker.valid_streak) == (0, 80, 2)
    # An accepted batch can no longer be voided.
    assert not audits.void_batch(world.db, plain.batch_id, "BANNED", "late", T0 + 200)
    with pytest.raises(JobNotClaimedError, match="passed, failed or error"):
        audits.finish_audit_job(
            world.db, job_id, "v1", verdict=AuditState.CLAIMED, detail="", metrics={},
            now_ms=T0, max_failed_audits=3,
        )  # fmt: skip


def _refuse(world: StorageWorld, worker: Worker, key: str, reason: str, now: int) -> bool:
    draft = BatchDraft(
        worker_id=worker.worker_id,
        idempotency_key=key,
        payload_sha256="e" * 64,
        run_id=None,
        lease_id=None,
        policy_version=0,
        rejection=batches.Rejection(reason, "refused", ban_after=3, ban_window=6),
    )
    return batches.record_batch(world.db, draft, now).banned


def _pass_all(world: StorageWorld, now: int) -> int:
    jobs = _claim(world, "v1", now=now)
    for job_id in jobs:
        audits.finish_audit_job(
            world.db, job_id, "v1", verdict=AuditState.PASSED, detail="ok", metrics={},
            now_ms=now, max_failed_audits=3,
        )  # fmt: skip
    return len(jobs)


def test_a_skipped_batch_waits_for_a_later_passed_audit(storage_world: StorageWorld) -> None:
    """With audits on, a batch the sampler skipped is accepted only once a later batch of
    its key passed its audits: a key that built a streak and then cheats in every batch
    keeps none of them (they wait, and the failed audit voids them)."""
    world = storage_world
    kinds = (AuditKind.PROOF,)
    skipped = _submit(world, world.alice, "key-vouch-skip01")
    later = _submit(world, world.alice, "key-vouch-audit1", kinds, now=T0 + 10)
    earlier = _submit(world, world.bob, "key-vouch-bob001", kinds)
    bob_skipped = _submit(world, world.bob, "key-vouch-bob002", now=T0 + 1)
    close = audits.close_audit_windows
    assert close(world.db, now_ms=T0 + 200, window_ms=100, audit_kinds=kinds) == []
    # Alice's later audit is outstanding and may vouch for her skipped batch: no new job.
    # Bob's audited batch came before his skipped one and cannot: his gets its own.
    jobs = audits.list_audit_jobs(world.db)
    assert sorted(j.batch_id for j in jobs) == sorted(
        [later.batch_id, earlier.batch_id, bob_skipped.batch_id]
    )
    assert _pass_all(world, T0 + 201) == 3
    closed = close(world.db, now_ms=T0 + 202, window_ms=100, audit_kinds=kinds)
    assert {b.batch_id for b in closed} == {
        skipped.batch_id, later.batch_id, earlier.batch_id, bob_skipped.batch_id
    }  # fmt: skip
    alice = repo.get_worker(world.db, world.alice.worker_id)
    assert alice is not None and (alice.credit_granted, alice.valid_streak) == (80, 2)


def test_a_quiet_key_gets_its_newest_batch_audited(storage_world: StorageWorld) -> None:
    """A key whose skipped batches have no later audit to vouch for them, and that sent
    nothing for a whole window, gets one audit, on its newest pending batch, which
    settles all of them; none while one is outstanding."""
    world = storage_world
    kinds = (AuditKind.PROOF, AuditKind.REWARD)
    first = _submit(world, world.alice, "key-quiet-000001")
    newest = _submit(world, world.alice, "key-quiet-000002", now=T0 + 5)
    close = audits.close_audit_windows
    # The first batch's window closed, but the key sent another within the window: it
    # may still be sampled, so nothing is queued yet.
    assert close(world.db, now_ms=T0 + 100, window_ms=100, audit_kinds=kinds) == []
    assert audits.list_audit_jobs(world.db, worker_id=world.alice.worker_id) == []
    assert close(world.db, now_ms=T0 + 105, window_ms=100, audit_kinds=kinds) == []
    jobs = audits.list_audit_jobs(world.db, worker_id=world.alice.worker_id)
    assert {(j.batch_id, j.kind) for j in jobs} == {(newest.batch_id, k) for k in kinds}
    assert close(world.db, now_ms=T0 + 150, window_ms=100, audit_kinds=kinds) == []
    assert len(audits.list_audit_jobs(world.db, worker_id=world.alice.worker_id)) == 2
    assert _pass_all(world, T0 + 151) == 2
    closed = close(world.db, now_ms=T0 + 152, window_ms=100, audit_kinds=kinds)
    assert {b.batch_id for b in closed} == {first.batch_id, newest.batch_id}
    # Without audits configured, skipped batches are accepted when their window closes.
    plain = _submit(world, world.bob, "key-quiet-bob001")
    closed = close(world.db, now_ms=T0 + 152, window_ms=100)
    assert [b.batch_id for b in closed] == [plain.batch_id]


def test_a_failed_audit_voids_the_skipped_batches_sent_before_it(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    before = [_submit(world, world.alice, f"key-skipped-{n:05d}", now=T0 + n) for n in range(2)]
    failed = _submit(world, world.alice, "key-skipped-audit", (AuditKind.PROOF,), now=T0 + 5)
    after = _submit(world, world.alice, "key-skipped-after", now=T0 + 6)
    [job_id] = _claim(world, "v1", now=T0 + 7)
    outcome = audits.finish_audit_job(
        world.db, job_id, "v1", verdict=AuditState.FAILED, detail="bad", metrics={},
        now_ms=T0 + 7, max_failed_audits=3,
    )  # fmt: skip
    assert outcome.batch_voided and not outcome.worker_banned
    states = {
        b.batch_id: stored.state
        for b in (*before, failed, after)
        if (stored := batches.get_batch(world.db, b.batch_id)) is not None
    }
    assert states == {
        before[0].batch_id: BatchState.VOIDED,
        before[1].batch_id: BatchState.VOIDED,
        failed.batch_id: BatchState.VOIDED,
        after.batch_id: BatchState.PENDING_AUDIT,
    }
    worker = repo.get_worker(world.db, world.alice.worker_id)
    assert worker is not None and (worker.batches_voided, worker.credit_pending) == (3, 40)


def test_malformed_batches_ban_the_key_that_signed_them(storage_world: StorageWorld) -> None:
    world = storage_world
    pending = _submit(world, world.alice, "key-strike-good1")
    # Refusals an honest worker meets (an expired lease, a stale version) never count.
    for n in range(6):
        reason = ("LEASE_EXPIRED", "STALE_POLICY", "DUPLICATE")[n % 3]
        assert not _refuse(world, world.alice, f"key-honest-{n:06d}", reason, T0 + 10 + n)
    # Strikes count among the key's last 6 batches only, so two long ago do not add up.
    assert not _refuse(world, world.alice, "key-strike-0001", "STRUCTURAL", T0 + 20)
    assert not _refuse(world, world.alice, "key-strike-0002", "REPLAY", T0 + 21)
    worker = repo.get_worker(world.db, world.alice.worker_id)
    assert worker is not None and worker.state is WorkerState.ACTIVE
    # A retry of a refusal is answered from the stored verdict and is no new strike.
    assert not _refuse(world, world.alice, "key-strike-0002", "REPLAY", T0 + 22)
    assert _refuse(world, world.alice, "key-strike-0003", "NOT_LEASE_OWNER", T0 + 23)
    worker = repo.get_worker(world.db, world.alice.worker_id)
    assert worker is not None and worker.state is WorkerState.BANNED
    assert "3 of its last 6 batches" in (worker.ban_reason or "")
    stored = batches.get_batch(world.db, pending.batch_id)
    assert stored is not None and stored.state is BatchState.VOIDED
    # Bob's record is his own.
    bob = repo.get_worker(world.db, world.bob.worker_id)
    assert bob is not None and bob.state is WorkerState.ACTIVE


def test_strikes_outside_the_window_do_not_ban(storage_world: StorageWorld) -> None:
    world = storage_world
    for n in range(2):
        assert not _refuse(world, world.alice, f"key-old-strike-{n:04d}", "STRUCTURAL", T0 - 9 + n)
    for n in range(6):  # accepted at T0, after the two strikes
        _submit(world, world.alice, f"key-window-good-{n:02d}")
    assert not _refuse(world, world.alice, "key-new-strike-0001", "STRUCTURAL", T0 + 100)
    worker = repo.get_worker(world.db, world.alice.worker_id)
    assert worker is not None and worker.state is WorkerState.ACTIVE
