"""Batches, cursors, duplicates and the trainer stream in the storage layer (SQLite)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event, text

from coderepair.coordinator.storage import audits, batches, repo
from coderepair.coordinator.storage.batches import BatchDraft, Rejection, SampleIndex
from coderepair.coordinator.storage.errors import (
    ConflictError,
    CursorBeyondHeadError,
    DuplicateCompletionError,
    IdempotencyConflictError,
    LeaseNotOpenError,
    NotFoundError,
    WorkerBannedError,
)
from coderepair.coordinator.storage.models import AuditKind, BatchState, LeaseState, Worker

if TYPE_CHECKING:
    from sqlalchemy.orm import Session
    from storage_support import StorageWorld

T0 = 1_700_000_000_000
G = 4


def _lease(
    world: StorageWorld, worker: Worker, tasks: Sequence[str], deadline: int = T0 + 1000
) -> str:
    return repo.create_lease(
        world.db,
        run_id="r1",
        worker_id=worker.worker_id,
        policy_version=0,
        tasks=[repo.LeaseTask(t, list(range(G))) for t in tasks],
        issued_ms=T0,
        deadline_ms=deadline,
    ).lease_id


def _samples(tasks: Sequence[str], tag: str) -> list[SampleIndex]:
    out = []
    for t in tasks:
        for i in range(G):
            digest = batches.completion_digest(t, [len(out), ord(tag[0]), i])
            out.append(SampleIndex(len(out), t, i, digest, 5, float(i % 2)))
    return out


def _draft(
    world: StorageWorld, worker: Worker, lease_id: str, samples: Sequence[SampleIndex], key: str
) -> BatchDraft:
    return BatchDraft(
        worker_id=worker.worker_id,
        idempotency_key=key,
        payload_sha256=key.ljust(64, "0")[:64],
        run_id="r1",
        lease_id=lease_id,
        policy_version=0,
        object_key=f"runs/r1/{key}.parquet",
        samples=samples,
    )


def _submit(
    world: StorageWorld, worker: Worker, tasks: Sequence[str], key: str
) -> batches.RecordedBatch:
    lease_id = _lease(world, worker, tasks)
    return batches.record_batch(
        world.db, _draft(world, worker, lease_id, _samples(tasks, key), key), T0 + 1
    )


def test_accepted_batch_gets_consecutive_cursors_and_closes_the_lease(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    first = _submit(world, world.alice, ["t1", "t2"], "key-a-000000000001")
    second = _submit(world, world.bob, ["t3"], "key-b-000000000001")
    assert first.created and second.created
    assert (first.batch.first_cursor, first.batch.last_cursor) == (1, 8)
    assert (second.batch.first_cursor, second.batch.last_cursor) == (9, 12)
    assert first.batch.state is BatchState.PENDING_AUDIT
    assert first.batch.n_tokens == 8 * 5
    assert batches.head_cursor(world.db, "r1") == 12
    lease = repo.get_lease(world.db, first.batch.lease_id or "")
    assert lease is not None and lease.state is LeaseState.SUBMITTED
    alice = repo.get_worker(world.db, world.alice.worker_id)
    assert alice is not None and alice.credit_pending == 40 and alice.batches_accepted == 1


def test_group_rows_get_consecutive_cursors_whatever_the_submission_order(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    lease_id = _lease(world, world.alice, ["t1", "t2"])
    samples = _samples(["t1", "t2"], "x")
    shuffled = [samples[i] for i in (4, 0, 5, 1, 6, 2, 7, 3)]
    batches.record_batch(
        world.db, _draft(world, world.alice, lease_id, shuffled, "key-shuffled-0001"), T0
    )
    rows = batches.read_stream(world.db, "r1", 0, 100)
    assert [(r.task_id, r.sample_index) for r in rows] == [
        ("t2", 0), ("t2", 1), ("t2", 2), ("t2", 3), ("t1", 0), ("t1", 1), ("t1", 2), ("t1", 3),
    ]  # fmt: skip
    assert [r.row_index for r in rows] == [4, 5, 6, 7, 0, 1, 2, 3]


def test_a_retried_key_returns_the_stored_batch_and_stores_nothing_new(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    lease_id = _lease(world, world.alice, ["t1"])
    draft = _draft(world, world.alice, lease_id, _samples(["t1"], "r"), "key-retry-000001")
    first = batches.record_batch(world.db, draft, T0)
    again = batches.record_batch(world.db, draft, T0 + 5)
    assert not again.created
    assert again.batch.batch_id == first.batch.batch_id
    assert batches.head_cursor(world.db, "r1") == G
    with pytest.raises(IdempotencyConflictError, match="other content"):
        batches.record_batch(world.db, replace(draft, payload_sha256="f" * 64), T0)


def test_concurrent_retries_of_one_key_store_one_batch(storage_world: StorageWorld) -> None:
    world = storage_world
    lease_id = _lease(world, world.alice, ["t1"])
    draft = _draft(world, world.alice, lease_id, _samples(["t1"], "c"), "key-concurrent-01")
    results: list[batches.RecordedBatch] = []
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            results.append(batches.record_batch(world.db, draft, T0))
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(r.created for r in results) == 1
    assert len({r.batch.batch_id for r in results}) == 1
    assert batches.head_cursor(world.db, "r1") == G


def test_rejected_batches_are_stored_for_replay_without_rows(storage_world: StorageWorld) -> None:
    world = storage_world
    draft = BatchDraft(
        worker_id=world.alice.worker_id,
        idempotency_key="key-rejected-0001",
        payload_sha256="e" * 64,
        run_id=None,
        lease_id=None,
        policy_version=0,
        rejection=Rejection("UNKNOWN_LEASE", "no lease 'x' exists"),
    )
    first = batches.record_batch(world.db, draft, T0)
    again = batches.record_batch(world.db, draft, T0 + 1)
    assert first.created and not again.created
    assert again.batch.state is BatchState.REJECTED
    assert again.batch.rejection_reason == "UNKNOWN_LEASE"
    assert batches.head_cursor(world.db, "r1") == 0
    alice = repo.get_worker(world.db, world.alice.worker_id)
    assert alice is not None and alice.batches_rejected == 1


@pytest.mark.parametrize(
    ("situation", "reason"),
    [
        ("unknown", "UNKNOWN_LEASE"),
        ("other_owner", "NOT_LEASE_OWNER"),
        ("past_deadline", "LEASE_EXPIRED"),
        ("released", "UNKNOWN_LEASE"),
        ("wrong_version", "STALE_POLICY"),
    ],
)
def test_a_batch_for_a_lease_that_is_not_open_is_refused_and_nothing_written(
    storage_world: StorageWorld, situation: str, reason: str
) -> None:
    world = storage_world
    owner = world.bob if situation == "other_owner" else world.alice
    lease_id = _lease(world, owner, ["t1"], deadline=T0 + 10)
    if situation == "released":
        repo.release_lease(world.db, lease_id, owner.worker_id, T0 + 1)
    draft = _draft(world, world.alice, lease_id, _samples(["t1"], "n"), "key-not-open-0001")
    if situation == "unknown":
        draft = replace(draft, lease_id="no-such-lease")
    if situation == "wrong_version":
        draft = replace(draft, policy_version=1)
    now = T0 + 11 if situation == "past_deadline" else T0 + 2
    with pytest.raises(LeaseNotOpenError) as caught:
        batches.record_batch(world.db, draft, now)
    assert caught.value.reason == reason
    assert batches.head_cursor(world.db, "r1") == 0
    assert batches.read_stream(world.db, "r1", 0, 10) == []


def test_banned_workers_cannot_submit(storage_world: StorageWorld) -> None:
    world = storage_world
    lease_id = _lease(world, world.alice, ["t1"])
    audits.ban_worker(
        world.db, world.alice.worker_id, reason="x", until_ms=None, void_pending=False, now_ms=T0
    )
    with pytest.raises(WorkerBannedError):
        batches.record_batch(
            world.db,
            _draft(world, world.alice, lease_id, _samples(["t1"], "b"), "key-banned-00001"),
            T0,
        )


def test_a_completion_copied_from_another_worker_is_refused(storage_world: StorageWorld) -> None:
    world = storage_world
    original = _submit(world, world.alice, ["t1"], "key-original-001")
    copied = _samples(["t1"], "z")
    copied[2] = copied[2]._replace(completion_sha256=_samples(["t1"], "k")[2].completion_sha256)
    lease_id = _lease(world, world.bob, ["t1"])
    with pytest.raises(DuplicateCompletionError) as caught:
        batches.record_batch(
            world.db, _draft(world, world.bob, lease_id, copied, "key-copy-000001"), T0
        )
    assert caught.value.matches[0].batch_id == original.batch.batch_id
    assert batches.head_cursor(world.db, "r1") == G  # the copier's rows were rolled back
    lease = repo.get_lease(world.db, lease_id)
    assert lease is not None and lease.state is LeaseState.OPEN
    found = batches.find_duplicate_completions(world.db, [copied[2].completion_sha256])
    assert [m.worker_id for m in found] == [world.alice.worker_id]
    assert (
        batches.find_duplicate_completions(
            world.db, [copied[2].completion_sha256], exclude_worker_id=world.alice.worker_id
        )
        == []
    )


def test_a_copied_completion_is_accepted_and_audited_where_the_draft_says_so(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    _submit(world, world.alice, ["t1"], "key-original-002")
    copied = _samples(["t1"], "y")
    copied[1] = copied[1]._replace(completion_sha256=_samples(["t1"], "k")[1].completion_sha256)
    on_duplicate = [AuditKind.SAMPLING, AuditKind.PROOF]
    # Not sampled for audit, and no copy: nothing queued.
    lease_id = _lease(world, world.bob, ["t1"])
    clean = replace(
        _draft(world, world.bob, lease_id, _samples(["t1"], "w"), "key-clean-000001"),
        duplicate_audit_kinds=on_duplicate,
    )
    recorded = batches.record_batch(world.db, clean, T0)
    assert not recorded.batch.audit_pending
    assert audits.list_audit_jobs(world.db, batch_id=recorded.batch.batch_id) == []
    # Sampled for the proof audit, and a copy: the rest of the kinds are queued too.
    lease_id = _lease(world, world.bob, ["t1"])
    draft = replace(
        _draft(world, world.bob, lease_id, copied, "key-copy-000002"),
        audit_kinds=[AuditKind.PROOF],
        duplicate_audit_kinds=on_duplicate,
    )
    recorded = batches.record_batch(world.db, draft, T0)
    assert recorded.created and recorded.batch.audit_pending
    stored = batches.get_batch(world.db, recorded.batch.batch_id)
    assert stored is not None and stored.audit_pending
    jobs = audits.list_audit_jobs(world.db, batch_id=recorded.batch.batch_id)
    assert sorted(j.kind for j in jobs) == [AuditKind.PROOF, AuditKind.SAMPLING]
    assert batches.head_cursor(world.db, "r1") == 3 * G


def test_accepted_drafts_are_checked(storage_world: StorageWorld) -> None:
    world = storage_world
    lease_id = _lease(world, world.alice, ["t1"])
    draft = _draft(world, world.alice, lease_id, _samples(["t1"], "q"), "key-checked-0001")
    with pytest.raises(ConflictError, match="at least one sample"):
        batches.record_batch(world.db, replace(draft, samples=[]), T0)
    with pytest.raises(ConflictError, match="object key"):
        batches.record_batch(world.db, replace(draft, object_key=None), T0)
    bad_rows = [s._replace(row_index=s.row_index + 1) for s in draft.samples]
    with pytest.raises(ConflictError, match="row_index"):
        batches.record_batch(world.db, replace(draft, samples=bad_rows), T0)


def test_stream_reads_in_order_never_splits_a_group_and_skips_voided_rows(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    a = _submit(world, world.alice, ["t1", "t2"], "key-stream-a-001")  # cursors 1..8
    b = _submit(world, world.bob, ["t3"], "key-stream-b-001")  # cursors 9..12
    rows = batches.read_stream(world.db, "r1", 0, 2)
    assert [r.cursor for r in rows] == [1, 2, 3, 4]  # the limit fell inside group t1
    assert rows[0].object_key == a.batch.object_key and rows[0].audit_pending
    assert [r.cursor for r in batches.read_stream(world.db, "r1", 4, 100)] == list(range(5, 13))
    audits.void_batch(world.db, a.batch.batch_id, "AUDIT_PROOF", "proof mismatch", T0 + 2)
    assert [r.cursor for r in batches.read_stream(world.db, "r1", 0, 100)] == [9, 10, 11, 12]
    assert [r.batch_id for r in batches.read_stream(world.db, "r1", 0, 100)] == [
        b.batch.batch_id
    ] * 4
    assert batches.read_stream(world.db, "r1", 0, 100, min_policy_version=1) == []
    with pytest.raises(ConflictError):
        batches.read_stream(world.db, "r1", 0, 0)


def test_acks_move_forward_only_and_never_past_the_head(storage_world: StorageWorld) -> None:
    world = storage_world
    assert batches.rollouts_ahead(world.db, "r1") == 0
    _submit(world, world.alice, ["t1", "t2"], "key-ack-00000001")
    assert batches.rollouts_ahead(world.db, "r1") == 8  # no ack yet: all of them
    assert batches.ack_cursor(world.db, "r1", 4, 10, T0) == batches.AckResult(4, 8, 4)
    assert batches.rollouts_ahead(world.db, "r1") == 4
    assert batches.ack_cursor(world.db, "r1", 2, 11, T0) == batches.AckResult(4, 8, 4)
    assert batches.rollouts_ahead(world.db, "r1") == 4
    assert batches.ack_cursor(world.db, "r1", 8, 12, T0) == batches.AckResult(8, 8, 8)
    assert batches.rollouts_ahead(world.db, "r1") == 0
    with pytest.raises(NotFoundError):
        batches.rollouts_ahead(world.db, "no-such-run")
    with pytest.raises(CursorBeyondHeadError, match="beyond"):
        batches.ack_cursor(world.db, "r1", 9, 13, T0)


def test_back_pressure_counts_from_the_consumed_cursor(storage_world: StorageWorld) -> None:
    """A trainer that dropped rows while it waits acks them as consumed, not checkpointed:
    they leave the back-pressure count, and the checkpointed cursor stays where it was."""
    world = storage_world
    _submit(world, world.alice, ["t1", "t2", "t3"], "key-consumed-0001")
    assert batches.ack_cursor(world.db, "r1", 0, 0, T0, consumed=8) == batches.AckResult(0, 12, 8)
    assert batches.rollouts_ahead(world.db, "r1") == 4
    # A checkpoint behind the consumed cursor moves the checkpoint only.
    assert batches.ack_cursor(world.db, "r1", 4, 1, T0) == batches.AckResult(4, 12, 8)
    assert batches.rollouts_ahead(world.db, "r1") == 4
    # A late, smaller consumed cursor moves nothing back.
    assert batches.ack_cursor(world.db, "r1", 4, 1, T0, consumed=6) == batches.AckResult(4, 12, 8)
    # A checkpoint past the consumed cursor carries it along (consumed >= checkpointed).
    assert batches.ack_cursor(world.db, "r1", 10, 2, T0) == batches.AckResult(10, 12, 10)
    assert batches.rollouts_ahead(world.db, "r1") == 2
    with pytest.raises(CursorBeyondHeadError, match="consumed cursor 13 is beyond"):
        batches.ack_cursor(world.db, "r1", 10, 2, T0, consumed=13)
    assert batches.ack_cursor(world.db, "r1", 0, 2, T0) == batches.AckResult(10, 12, 10)


@settings(max_examples=100, deadline=None)
@given(
    task=st.text(max_size=20),
    ids=st.lists(st.integers(0, 2**32 - 1), max_size=20),
    other=st.lists(st.integers(0, 2**32 - 1), max_size=20),
)
def test_completion_digest_separates_tasks_and_completions(
    task: str, ids: list[int], other: list[int]
) -> None:
    digest = batches.completion_digest(task, ids)
    assert len(digest) == 64
    assert (batches.completion_digest(task, other) == digest) == (ids == other)
    assert batches.completion_digest(task + "x", ids) != digest


def test_audit_kinds_queue_jobs_with_the_batch(storage_world: StorageWorld) -> None:
    world = storage_world
    lease_id = _lease(world, world.alice, ["t1"])
    draft = replace(
        _draft(world, world.alice, lease_id, _samples(["t1"], "j"), "key-jobs-0000001"),
        audit_kinds=[AuditKind.PROOF, AuditKind.SAMPLING, AuditKind.PROOF],
    )
    recorded = batches.record_batch(world.db, draft, T0)
    assert recorded.batch.audit_pending
    jobs = audits.list_audit_jobs(world.db, batch_id=recorded.batch.batch_id)
    assert sorted(j.kind for j in jobs) == [AuditKind.PROOF, AuditKind.SAMPLING]


def test_a_cancelled_caller_does_not_stop_the_group_committer(
    storage_world: StorageWorld,
) -> None:
    """A caller that gives up (cancelled RPC, shutdown) must not kill the writer thread."""
    committer = batches.GroupCommitter(storage_world.db)
    busy, release = threading.Event(), threading.Event()

    def slow(_session: object) -> str:
        busy.set()
        release.wait(10)
        return "slow"

    first = committer.submit(slow)
    assert busy.wait(10)
    # Queued while the thread is busy, then abandoned by its caller.
    abandoned = committer.submit(lambda _session: "abandoned")
    assert abandoned.cancel()
    release.set()
    assert first.result(10) == "slow"
    # The thread lives on: the next operation is committed and answered.
    assert committer.submit(lambda _session: "next").result(10) == "next"
    assert abandoned.cancelled()


def _columns(obj: object) -> dict[str, object]:
    table = type(obj).__table__  # type: ignore[attr-defined]
    return {c.key: getattr(obj, c.key) for c in table.columns}


def test_submission_view_holds_the_rows_as_stored(storage_world: StorageWorld) -> None:
    """The view is read in Core, not through the ORM: its objects must still carry
    every column of the stored rows, with enums as enums, and None where a row is
    missing."""
    world = storage_world
    lease_id = _lease(world, world.alice, ["t0"])
    view = batches.submission_view(world.db, world.alice.worker_id, lease_id)
    with world.db.read() as session:
        stored = [
            session.get(type(obj), pk)
            for obj, pk in (
                (world.alice, world.alice.worker_id),
                (view.lease, lease_id),
                (world.run, "r1"),
            )
        ]
    assert view.worker is not None and view.lease is not None and view.run is not None
    for got, want in zip((view.worker, view.lease, view.run), stored, strict=True):
        assert _columns(got) == _columns(want)
    assert view.lease.state is LeaseState.OPEN
    assert repo.lease_tasks(view.lease) == [repo.LeaseTask("t0", list(range(G)))]
    # An unknown lease, or none named: the worker row only.
    for lease in ("no-such-lease", None):
        missing = batches.submission_view(world.db, world.alice.worker_id, lease)
        assert missing.worker is not None and missing.lease is None and missing.run is None
    assert batches.submission_view(world.db, "nobody", lease_id) == batches.SubmissionView(
        None, None, None
    )


def test_a_batch_s_rollout_rows_go_in_as_one_statement(storage_world: StorageWorld) -> None:
    # One statement, not the driver's executemany: sqlite3 hands the GIL over once per
    # statement step, which costs up to a switch interval each under load (batches.py).
    world = storage_world
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        statements.append(statement)

    event.listen(world.db.engine, "before_cursor_execute", seen)
    try:
        recorded = _submit(world, world.alice, ["t1", "t2", "t3"], "key-a-000000000077")
    finally:
        event.remove(world.db.engine, "before_cursor_execute", seen)
    assert recorded.created and recorded.batch.n_samples == 3 * G
    inserts = [s for s in statements if s.startswith("INSERT INTO rollouts")]
    assert len(inserts) == 1
    assert inserts[0].count("), (") == 3 * G - 1  # one VALUES group per row
    rows = batches.read_stream(world.db, "r1", 0, 100)
    assert [r.cursor for r in rows] == list(range(1, 3 * G + 1))


def test_a_batch_over_the_statement_limit_goes_in_as_several_whole_inserts(
    storage_world: StorageWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The driver caps the parameters of one statement (SQLite at 32766), so a big
    # batch is cut into several multi-row INSERTs; every row must land as drafted.
    monkeypatch.setattr(batches, "_ROWS_PER_INSERT", 5)
    world = storage_world
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        statements.append(statement)

    tasks = ["t1", "t2", "t3"]
    lease_id = _lease(world, world.alice, tasks)
    samples = _samples(tasks, "c")
    draft = _draft(world, world.alice, lease_id, samples, "key-a-000000000078")
    event.listen(world.db.engine, "before_cursor_execute", seen)
    try:
        recorded = batches.record_batch(world.db, draft, T0 + 1)
    finally:
        event.remove(world.db.engine, "before_cursor_execute", seen)
    inserts = [s for s in statements if s.startswith("INSERT INTO rollouts")]
    assert [i.count("), (") + 1 for i in inserts] == [5, 5, 2]
    with world.db.read() as session:
        stored = session.execute(
            text(
                "SELECT cursor, batch_id, row_index, task_id, sample_index, worker_id, "
                "policy_version, completion_sha256, n_completion_tokens, reward, "
                "accepted_unix_ms, voided FROM rollouts ORDER BY cursor"
            )
        ).all()
    assert [tuple(r) for r in stored] == [
        (i + 1, recorded.batch.batch_id, s.row_index, s.task_id, s.sample_index,
         world.alice.worker_id, 0, s.completion_sha256, s.n_completion_tokens, s.reward,
         T0 + 1, False)
        for i, s in enumerate(samples)
    ]  # fmt: skip


def test_the_rollout_insert_names_every_column_of_the_table() -> None:
    # The positional INSERT lists its columns itself: a column added to the model
    # without a default must be added there too, or every accepted batch fails.
    table = batches._rollouts
    assert sorted(batches._ROLLOUT_COLUMNS) == sorted(c.key for c in table.columns)


def _savepoints(world: StorageWorld) -> tuple[list[str], object]:
    names: list[str] = []

    def seen(_conn: object, name: str) -> None:
        names.append(name)

    event.listen(world.db.engine, "savepoint", seen)
    return names, seen


def test_a_group_of_one_commits_without_a_savepoint_and_a_failure_writes_nothing(
    storage_world: StorageWorld,
) -> None:
    world = storage_world
    committer = batches.GroupCommitter(world.db)
    lease_id = _lease(world, world.alice, ["t1"])
    key = "key-a-000000000088"
    draft = _draft(world, world.alice, lease_id, _samples(["t1"], key), key)
    refused = replace(
        draft, idempotency_key="key-a-000000000089", samples=[], rejection=Rejection("X", "x")
    )

    def fails_after_writing(session: Session) -> None:
        assert batches.record_in(session, refused, T0).created
        raise ValueError("refused after its writes")

    savepoints, seen = _savepoints(world)
    try:
        recorded = committer.submit(lambda s: batches.record_in(s, draft, T0 + 1)).result(10)
        failed = committer.submit(fails_after_writing)
        with pytest.raises(ValueError, match="refused after its writes"):
            failed.result(10)
    finally:
        event.remove(world.db.engine, "savepoint", seen)
    assert savepoints == []
    assert recorded.created and batches.get_batch(world.db, recorded.batch.batch_id)
    # The failed operation's batch row went with its transaction: the key is free.
    assert batches.record_batch(world.db, refused, T0 + 2).created


def test_a_group_of_several_keeps_one_savepoint_each(storage_world: StorageWorld) -> None:
    world = storage_world
    committer = batches.GroupCommitter(world.db)
    busy, release = threading.Event(), threading.Event()

    def hold(_session: Session) -> str:
        busy.set()
        release.wait(10)
        return "held"

    def ok_op(session: Session) -> str:
        session.execute(text("SELECT 1"))  # a savepoint is opened at the first statement
        return "ok"

    def boom(session: Session) -> None:
        session.execute(text("SELECT 1"))
        raise ValueError("only me")

    savepoints, seen = _savepoints(world)
    try:
        first = committer.submit(hold)
        assert busy.wait(10)
        # Queued while the thread is busy: these two commit together.
        ok = committer.submit(ok_op)
        bad = committer.submit(boom)
        release.set()
        assert first.result(10) == "held" and ok.result(10) == "ok"
        with pytest.raises(ValueError, match="only me"):
            bad.result(10)
    finally:
        event.remove(world.db.engine, "savepoint", seen)
    assert len(savepoints) == 2
