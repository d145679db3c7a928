"""Accepting a batch on PostgreSQL (one call of migration 0003's function) stores and
refuses exactly what the statement-by-statement path stores and refuses on SQLite.

The same scenario (accepted batches with and without audits, retries of a key, a key
reused for other content, copies refused or audited, every kind of lease that is not
open, an unregistered and a banned worker, samples out of group order) runs against a
SQLite file and a real PostgreSQL; every outcome and every row of the tables an
acceptance writes must match, with random ids replaced by what they name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pg_storage_support import T0, ensure_test_run
from sqlalchemy import event, select, text

from coderepair.coordinator.storage import audits, batches, repo
from coderepair.coordinator.storage.batches import BatchDraft, SampleIndex
from coderepair.coordinator.storage.db import Database, Dialect
from coderepair.coordinator.storage.errors import StorageError
from coderepair.coordinator.storage.migrate import upgrade_to_head
from coderepair.coordinator.storage.models import (
    AuditJob,
    AuditKind,
    Batch,
    CreditEntry,
    Lease,
    Rollout,
    Run,
    Worker,
)

pytestmark = pytest.mark.postgres

G = 4
ALICE, BOB, CAROL = (bytes([n]) * 32 for n in (2, 3, 4))


@pytest.fixture
def pg_db(postgres_url: str) -> Iterator[Database]:
    db = Database.open(postgres_url, pool_size=4)
    assert db.dialect is Dialect.POSTGRESQL
    upgrade_to_head(db.engine)
    yield db
    db.close()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database.open(f"sqlite:///{tmp_path / 'coordinator.db'}")
    upgrade_to_head(db.engine)
    yield db
    db.close()


class _Scenario:
    """Drives one database; records each outcome with its random ids replaced."""

    def __init__(self, db: Database) -> None:
        self.db = db
        ensure_test_run(db, G)
        self.workers = {
            name: repo.upsert_worker(
                db,
                key,
                display_name=name,
                client_version="0.1.0",
                capabilities={},
                now_ms=T0,
            ).worker_id
            for name, key in (("alice", ALICE), ("bob", BOB), ("carol", CAROL))
        }
        self.leases: dict[str, str] = {}  # lease id -> "lease-N"
        self.outcomes: list[Any] = []

    def lease(self, worker: str, tasks: Sequence[str], deadline: int = T0 + 1000) -> str:
        lease_id = repo.create_lease(
            self.db,
            run_id="r1",
            worker_id=self.workers[worker],
            policy_version=0,
            tasks=[repo.LeaseTask(t, list(range(G))) for t in tasks],
            issued_ms=T0,
            deadline_ms=deadline,
        ).lease_id
        self.leases[lease_id] = f"lease-{len(self.leases)}"
        return lease_id

    def draft(
        self, worker: str, lease_id: str, key: str, samples: Sequence[SampleIndex], **kw: Any
    ) -> BatchDraft:
        return BatchDraft(
            worker_id=self.workers.get(worker, worker),
            idempotency_key=key,
            payload_sha256=kw.pop("payload", key.ljust(64, "0")[:64]),
            run_id="r1",
            lease_id=lease_id,
            policy_version=kw.pop("policy_version", 0),
            object_key=f"runs/r1/{key}.parquet",
            samples=samples,
            **kw,
        )

    def submit(self, draft: BatchDraft, now: int = T0 + 1) -> None:
        try:
            recorded = batches.record_batch(self.db, draft, now)
        except StorageError as exc:
            # A refused copy's message quotes one of its matches, whichever the
            # database returned first; the matches themselves are compared.
            message = "" if getattr(exc, "matches", None) else self.named(str(exc))
            self.outcomes.append(
                (
                    type(exc).__name__,
                    message,
                    getattr(exc, "reason", None),
                    sorted(
                        (m.completion_sha256, m.cursor, m.worker_id, self.named(m.batch_id))
                        for m in getattr(exc, "matches", ())
                    ),
                )
            )
            return
        self.outcomes.append(("recorded", recorded.created, self.batch(recorded.batch)))

    def named(self, value: str) -> str:
        """`value` with batch and lease ids replaced by what they name."""
        with self.db.read() as session:
            for batch_id, worker_id, key in session.execute(
                select(Batch.batch_id, Batch.worker_id, Batch.idempotency_key)
            ):
                value = value.replace(batch_id, f"batch({worker_id},{key})")
        for lease_id, name in self.leases.items():
            value = value.replace(lease_id, name)
        return value

    def batch(self, batch: Batch) -> dict[str, Any]:
        row = {c.key: getattr(batch, c.key) for c in Batch.__table__.columns}
        row["batch_id"] = self.named(row["batch_id"])
        row["lease_id"] = self.leases.get(row["lease_id"], row["lease_id"])
        return row

    def tables(self) -> dict[str, Any]:
        with self.db.read() as session:
            stored = {
                "batches": sorted(
                    (self.batch(b) for b in session.scalars(select(Batch))),
                    key=lambda b: b["batch_id"],
                ),
                "rollouts": [
                    {**_columns(r), "batch_id": self.named(r.batch_id)}
                    for r in session.scalars(select(Rollout).order_by(Rollout.cursor))
                ],
                "audit_jobs": sorted(
                    (self.named(j.batch_id), j.worker_id, j.kind, j.state, j.created_unix_ms)
                    for j in session.scalars(select(AuditJob))
                ),
                "credit": sorted(
                    (
                        c.worker_id,
                        self.named(c.batch_id or ""),
                        c.kind,
                        c.pending_delta,
                        c.granted_delta,
                        c.created_unix_ms,
                    )
                    for c in session.scalars(select(CreditEntry))
                ),
                "workers": sorted(
                    (
                        w.worker_id,
                        w.state,
                        w.batches_accepted,
                        w.batches_rejected,
                        w.credit_pending,
                        w.credit_granted,
                        w.valid_streak,
                    )
                    for w in session.scalars(select(Worker))
                ),
                "leases": sorted(
                    (self.leases[le.lease_id], le.state, le.closed_unix_ms)
                    for le in session.scalars(select(Lease))
                ),
                "heads": [(r.run_id, r.head_cursor) for r in session.scalars(select(Run))],
            }
        return stored


def _columns(obj: object) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}  # type: ignore[attr-defined]


def _samples(tasks: Sequence[str], tag: str) -> list[SampleIndex]:
    out = []
    for t in tasks:
        for i in range(G):
            digest = batches.completion_digest(t, [len(out), ord(tag[0]), i])
            out.append(SampleIndex(len(out), t, i, digest, 5 + i, float(i % 2) / 4))
    return out


def _play(db: Database) -> _Scenario:
    s = _Scenario(db)
    # Accepted: without audits, then with two kinds; a retry of the first key, then the
    # first key for other content.
    first = s.draft("alice", s.lease("alice", ["t1", "t2"]), "key-a1", _samples(["t1", "t2"], "a"))
    s.submit(first)
    s.submit(
        s.draft(
            "alice",
            s.lease("alice", ["t3"]),
            "key-a2",
            _samples(["t3"], "b"),
            audit_kinds=[AuditKind.PROOF, AuditKind.SAMPLING, AuditKind.PROOF],
        )
    )
    s.submit(first, T0 + 5)
    s.submit(replace(first, payload_sha256="f" * 64), T0 + 6)
    # Samples out of group order: a task's samples still get consecutive cursors.
    shuffled = _samples(["t4", "t5"], "c")
    order = [5, 0, 7, 2, 4, 1, 6, 3]
    s.submit(
        s.draft(
            "alice",
            s.lease("alice", ["t4", "t5"]),
            "key-a3",
            [shuffled[i]._replace(row_index=k) for k, i in enumerate(order)],
        )
    )
    # Copies of alice's completions by bob: refused; audited with the kinds the draft
    # has not queued yet; audited for the copy alone (no sampled audit); audited where
    # the kinds are all queued already; accepted where the draft asks for no audit of
    # copies.
    copied = _samples(["t1"], "d")
    copied[1] = copied[1]._replace(completion_sha256=first.samples[1].completion_sha256)
    copied[3] = copied[3]._replace(completion_sha256=first.samples[2].completion_sha256)
    s.submit(s.draft("bob", s.lease("bob", ["t1"]), "key-b1", copied))
    s.submit(
        s.draft(
            "bob",
            s.lease("bob", ["t1"]),
            "key-b2",
            copied,
            audit_kinds=[AuditKind.SAMPLING],
            duplicate_audit_kinds=[AuditKind.SAMPLING, AuditKind.REWARD],
        )
    )
    s.submit(
        s.draft(
            "bob",
            s.lease("bob", ["t1"]),
            "key-b2x",
            [c._replace(completion_sha256=c.completion_sha256[:-1] + "x") for c in copied[:3]]
            + [copied[3]],
            duplicate_audit_kinds=[AuditKind.REWARD],
        )
    )
    recopied = [c._replace(completion_sha256=c.completion_sha256[::-1]) for c in copied]
    recopied[0] = recopied[0]._replace(completion_sha256=first.samples[0].completion_sha256)
    s.submit(
        s.draft(
            "bob",
            s.lease("bob", ["t1"]),
            "key-b3",
            recopied,
            audit_kinds=[AuditKind.PROOF],
            duplicate_audit_kinds=[AuditKind.PROOF],
        )
    )
    plain = [c._replace(completion_sha256=c.completion_sha256.upper()) for c in copied]
    plain[2] = plain[2]._replace(completion_sha256=first.samples[3].completion_sha256)
    s.submit(s.draft("bob", s.lease("bob", ["t1"]), "key-b4", plain, duplicate_audit_kinds=[]))
    # Leases that are not open for the batch.
    fresh = _samples(["t6"], "e")
    s.submit(s.draft("alice", "no-such-lease", "key-l1", fresh))
    s.submit(s.draft("alice", s.lease("bob", ["t6"]), "key-l2", fresh))
    s.submit(s.draft("alice", s.lease("alice", ["t6"], deadline=T0 + 10), "key-l3", fresh), T0 + 11)
    released = s.lease("alice", ["t6"])
    repo.release_lease(db, released, s.workers["alice"], T0 + 1)
    s.submit(s.draft("alice", released, "key-l4", fresh))
    s.submit(s.draft("alice", s.lease("alice", ["t6"]), "key-l5", fresh, policy_version=1))
    submitted = first.lease_id or ""
    s.submit(s.draft("alice", submitted, "key-l6", fresh))
    # Workers that may not submit.
    s.submit(s.draft("0123456789abcdef", s.lease("alice", ["t6"]), "key-w1", fresh))
    carols = s.lease("carol", ["t6"])
    audits.ban_worker(
        db, s.workers["carol"], reason="caught", until_ms=None, void_pending=False, now_ms=T0
    )
    s.submit(s.draft("carol", carols, "key-w2", fresh))
    # And one more accepted batch after all the refusals: nothing they did is left over.
    s.submit(s.draft("bob", s.lease("bob", ["t7"]), "key-b5", _samples(["t7"], "f")))
    return s


def test_postgres_accepts_and_refuses_exactly_as_the_statements_do_on_sqlite(
    sqlite_db: Database, pg_db: Database
) -> None:
    on_sqlite, on_postgres = _play(sqlite_db), _play(pg_db)
    kinds = [o[0] if o[0] != "recorded" else f"recorded:{o[1]}" for o in on_sqlite.outcomes]
    # The scenario reaches every answer of the function.
    assert kinds == [
        "recorded:True",
        "recorded:True",
        "recorded:False",
        "IdempotencyConflictError",
        "recorded:True",
        "DuplicateCompletionError",
        "recorded:True",
        "recorded:True",
        "recorded:True",
        "recorded:True",
        "LeaseNotOpenError",
        "LeaseNotOpenError",
        "LeaseNotOpenError",
        "LeaseNotOpenError",
        "LeaseNotOpenError",
        "LeaseNotOpenError",
        "NotFoundError",
        "WorkerBannedError",
        "recorded:True",
    ], on_sqlite.outcomes
    for step, (expected, got) in enumerate(
        zip(on_sqlite.outcomes, on_postgres.outcomes, strict=True)
    ):
        assert got == expected, f"outcome {step}"
    expected_tables, got_tables = on_sqlite.tables(), on_postgres.tables()
    for table, rows in expected_tables.items():
        assert got_tables[table] == rows, table
    # A few facts checked outright, so that both paths cannot agree on a wrong answer.
    stored = {b["batch_id"]: b for b in expected_tables["batches"]}
    alice, bob = on_sqlite.workers["alice"], on_sqlite.workers["bob"]
    assert stored[f"batch({bob},key-b2)"]["audit_pending"]  # the copy was audited
    assert stored[f"batch({bob},key-b2x)"]["audit_pending"]  # by the copy alone
    assert stored[f"batch({bob},key-b3)"]["audit_pending"]
    assert not stored[f"batch({bob},key-b4)"]["audit_pending"]
    assert [j[:3] for j in expected_tables["audit_jobs"] if j[0] == f"batch({bob},key-b2)"] == [
        (f"batch({bob},key-b2)", bob, AuditKind.REWARD),
        (f"batch({bob},key-b2)", bob, AuditKind.SAMPLING),
    ]
    rows = [r for r in expected_tables["rollouts"] if r["batch_id"] == f"batch({alice},key-a3)"]
    assert [(r["task_id"], r["sample_index"]) for r in rows] == [
        (t, i) for t in ("t5", "t4") for i in range(G)
    ]
    assert [r["cursor"] for r in rows] == list(range(rows[0]["cursor"], rows[0]["cursor"] + 8))


def test_an_accepted_batch_is_one_call_and_its_arrays_land_as_drafted(pg_db: Database) -> None:
    """One statement per acceptance, whatever the batch size; values that an array
    literal would have to quote come back as they went (the arrays travel in binary)."""
    s = _Scenario(pg_db)
    tasks = ('t{1}, "q"', "t\\2 é NULL")
    samples = _samples(tasks, "g")
    draft = s.draft("alice", s.lease("alice", tasks), "key-arrays", samples)
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        statements.append(statement)

    event.listen(pg_db.engine, "before_cursor_execute", seen)
    try:
        recorded = batches.record_batch(pg_db, draft, T0 + 1)
    finally:
        event.remove(pg_db.engine, "before_cursor_execute", seen)
    assert len(statements) == 1 and "coderepair_accept_batch(" in statements[0], statements
    assert (recorded.batch.first_cursor, recorded.batch.last_cursor) == (1, 2 * G)
    with pg_db.read() as session:
        stored = session.scalars(select(Rollout).order_by(Rollout.cursor)).all()
    assert {
        r.row_index: (
            r.task_id,
            r.sample_index,
            r.completion_sha256,
            r.n_completion_tokens,
            r.reward,
        )
        for r in stored
    } == {
        s.row_index: (
            s.task_id,
            s.sample_index,
            s.completion_sha256,
            s.n_completion_tokens,
            s.reward,
        )
        for s in samples
    }


def test_the_call_probes_the_digest_index_on_a_table_never_analysed(pg_db: Database) -> None:
    """The duplicate check inside the function plans as one index probe per digest even
    where PostgreSQL has no statistics for the rows (a fresh deployment ingests faster
    than autovacuum analyses): auto_explain shows the plans of the function's own
    statements."""
    s = _Scenario(pg_db)
    original = s.draft("alice", s.lease("alice", ["t1"]), "key-orig", _samples(["t1"], "h"))
    batches.record_batch(pg_db, original, T0 + 1)
    with pg_db.write() as session:
        session.execute(
            text(
                "INSERT INTO rollouts (run_id, cursor, batch_id, row_index, task_id, "
                "sample_index, worker_id, policy_version, completion_sha256, "
                "n_completion_tokens, reward, accepted_unix_ms, voided) "
                "SELECT 'r1', 1000 + n, batch_id, 0, 't1', 0, worker_id, 0, md5(n::text) || "
                "md5(n::text), 1, 0.0, 0, false FROM batches, generate_series(1, 50000) AS n"
            )
        )
    plans: list[str] = []
    draft = s.draft("bob", s.lease("bob", ["t1"]), "key-probe", _samples(["t1"], "i"))
    with pg_db.write() as session:
        connection = session.connection()
        raw = connection.connection.driver_connection
        raw.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        for setting in (
            "LOAD 'auto_explain'",
            "SET LOCAL auto_explain.log_min_duration = 0",
            "SET LOCAL auto_explain.log_nested_statements = on",
            "SET LOCAL client_min_messages = log",
        ):
            connection.exec_driver_sql(setting)
        recorded = batches.record_in(session, draft, T0 + 2)
    assert recorded.created
    probe = [p for p in plans if "FROM rollouts" in p and "completion_sha256 = d.digest" in p]
    assert probe, plans
    assert "Seq Scan on rollouts" not in probe[0], probe[0]
    assert "ix_rollouts_completion_sha256" in probe[0], probe[0]
