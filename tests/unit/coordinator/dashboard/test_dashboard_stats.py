"""The dashboard's figures, read from a real SQLite database filled through the storage
layer's own functions."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from dashboard_world import T0, make_world
from sqlalchemy import event

from coderepair.coordinator.dashboard.config import StatsWindow
from coderepair.coordinator.dashboard.stats import ACCEPTED, UnknownRunError, collect_stats
from coderepair.coordinator.storage import audits, repo
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.models import AuditKind, AuditState

# 6 buckets of 10 s: [T0-50s, T0-40s) ... [T0, T0+10s) when now is in the last one.
WINDOW = StatsWindow(history_s=60, bucket_s=10, rate_window_s=20, online_window_s=30)
NOW = T0 + 5_000


def test_empty_database_gives_zeros_and_no_run(storage_db: Database) -> None:
    snap = collect_stats(storage_db, WINDOW, now_ms=NOW)
    assert snap.run_id is None and snap.runs == ()
    assert snap.workers.registered == snap.workers.online == snap.workers.banned == 0
    assert snap.rollout_series == () and snap.policies == ()
    assert len(snap.batch_series) == WINDOW.n_buckets
    assert all(not b.outcomes for b in snap.batch_series)
    assert snap.to_json()["rollouts_per_s"] == 0.0


def test_buckets_are_aligned_and_count_rollouts_rates_and_rewards(storage_db: Database) -> None:
    world = make_world(storage_db, now_ms=T0 - 60_000)
    alice = world.worker("alice", 2, now_ms=T0 - 60_000)
    world.accept(alice, [0.0, 1.0, 1.0, 0.0], T0 - 45_000)  # bucket 0
    world.accept(alice, [1.0, 1.0, 1.0, 1.0], T0 - 12_000)  # bucket 3
    world.accept(alice, [0.5, 0.5, 0.5, 0.5], T0 - 11_000)  # bucket 3
    world.accept(alice, [1.0, 0.0, 0.0, 0.0], T0 + 1_000)  # bucket 5 (current)
    snap = collect_stats(storage_db, WINDOW, now_ms=NOW)

    assert snap.run_id == "r1"
    starts = [b.start_unix_ms for b in snap.rollout_series]
    assert starts == [T0 - 50_000 + i * 10_000 for i in range(6)]
    assert [b.rollouts for b in snap.rollout_series] == [4, 0, 0, 8, 0, 4]
    assert [b.tokens for b in snap.rollout_series] == [20, 0, 0, 40, 0, 20]
    assert snap.rollout_series[3].reward_mean == pytest.approx(0.75)
    assert snap.rollout_series[1].reward_mean is None
    assert snap.rollout_series[3].rate_per_s == pytest.approx(0.8)
    # The current bucket has run 5.001 s, not 10.
    assert snap.rollout_series[5].rate_per_s == pytest.approx(4 / 5.001)
    # Rate window: the last 20 s hold the two batches at -12 s/-11 s and the one at +1 s.
    assert snap.rollouts_per_s == pytest.approx(12 / 20)
    assert snap.reward_mean_recent == pytest.approx((4 + 2 + 1) / 12)
    assert snap.run() is not None and snap.run().head_cursor == 16  # type: ignore[union-attr]


def test_outcomes_by_reason_over_time_include_voided_batches(storage_db: Database) -> None:
    world = make_world(storage_db)
    alice, bob = world.worker("alice", 2), world.worker("bob", 3)
    world.accept(alice, [1.0] * 4, T0 - 30_000)
    world.reject(bob, "UNKNOWN_LEASE", T0 - 30_000)
    world.reject(bob, "UNKNOWN_LEASE", T0 - 29_000)
    voided = world.accept(bob, [1.0] * 4, T0 + 1_000)
    assert audits.void_batch(storage_db, voided.batch_id, "AUDIT_PROOF", "bad proof", T0 + 2_000)
    world.reject(alice, "DUPLICATE", T0 + 2_000)
    snap = collect_stats(storage_db, WINDOW, now_ms=NOW)

    assert dict(snap.batch_series[2].outcomes) == {ACCEPTED: 1, "UNKNOWN_LEASE": 2}
    # A voided batch counts at its submission time, under the reason it was voided for.
    assert dict(snap.batch_series[5].outcomes) == {"AUDIT_PROOF": 1, "DUPLICATE": 1}
    assert dict(snap.outcome_totals) == {
        ACCEPTED: 1,
        "UNKNOWN_LEASE": 2,
        "AUDIT_PROOF": 1,
        "DUPLICATE": 1,
    }
    # Voided rollouts are ingested (rate) but leave the reward and token figures.
    last = snap.rollout_series[5]
    assert (last.rollouts, last.voided, last.tokens, last.reward_mean) == (4, 4, 0, None)


def test_workers_online_banned_and_leases(storage_db: Database) -> None:
    world = make_world(storage_db)
    old = world.worker("old", 4, now_ms=T0 - 40_000)  # beyond the 30 s online window
    alice = world.worker("alice", 2, now_ms=T0)
    mallory = world.worker("mallory", 5, now_ms=T0 - 1)
    timed = world.worker("timed", 6, now_ms=T0 - 1)
    repo.create_lease(
        storage_db,
        run_id="r1",
        worker_id=alice.worker_id,
        policy_version=0,
        tasks=[repo.LeaseTask("t", [1, 2, 3, 4])],
        issued_ms=T0 - 10_000,
        deadline_ms=T0 - 1,  # overdue at NOW
    )
    repo.create_lease(
        storage_db,
        run_id="r1",
        worker_id=mallory.worker_id,
        policy_version=0,
        tasks=[repo.LeaseTask("t", [1, 2, 3, 4])],
        issued_ms=T0,
        deadline_ms=T0 + 60_000,
    )
    audits.ban_worker(
        storage_db,
        mallory.worker_id,
        reason="copying",
        until_ms=None,
        void_pending=False,
        now_ms=T0,
    )
    # A timed ban that ended before NOW no longer counts, though its row still says banned.
    audits.ban_worker(
        storage_db,
        timed.worker_id,
        reason="short",
        until_ms=NOW - 1,
        void_pending=False,
        now_ms=T0,
    )
    snap = collect_stats(storage_db, WINDOW, now_ms=NOW)

    assert snap.workers.registered == 4
    assert snap.workers.online == 3
    assert snap.workers.online_workers[0].display_name == "alice"
    assert old.worker_id not in {w.worker_id for w in snap.workers.online_workers}
    assert snap.workers.banned == 1
    banned = [
        (b.display_name, b.reason, b.banned_until_unix_ms) for b in snap.workers.banned_workers
    ]
    assert banned == [("mallory", "copying", None)]
    # mallory's lease was revoked by the ban; alice's is open and past its deadline.
    assert (snap.leases.open, snap.leases.overdue) == (1, 1)


def test_audit_backlog_counts_pending_claimed_and_retrying_jobs(storage_db: Database) -> None:
    world = make_world(storage_db)
    alice = world.worker("alice", 2)
    world.accept(alice, [1.0] * 4, T0 - 3_000, audit_kinds=[AuditKind.PROOF, AuditKind.REWARD])
    world.accept(alice, [1.0] * 4, T0 - 2_000, audit_kinds=[AuditKind.PROOF])
    world.accept(alice, [1.0] * 4, T0 - 1_000)
    claimed = audits.claim_audit_jobs(
        storage_db, "v1", now_ms=T0, limit=2, claim_ttl_ms=60_000, kinds=[AuditKind.PROOF]
    )
    audits.finish_audit_job(
        storage_db,
        claimed[0].job_id,
        "v1",
        verdict=AuditState.ERROR,
        detail="oom",
        metrics={},
        now_ms=T0,
        max_failed_audits=3,
    )
    snap = collect_stats(storage_db, WINDOW, now_ms=NOW)

    backlog = snap.audits
    assert (backlog.pending, backlog.claimed, backlog.retrying) == (1, 1, 1)
    assert backlog.by_kind == {"proof": {"claimed": 1, "error": 1}, "reward": {"pending": 1}}
    assert backlog.oldest_pending_unix_ms == T0 - 3_000
    assert backlog.batches_in_audit_window == 3


def test_reward_curve_per_policy_version_with_the_base_model(storage_db: Database) -> None:
    world = make_world(storage_db)
    alice = world.worker("alice", 2)
    world.accept(alice, [0.0, 0.0, 0.0, 1.0], T0 - 9_000, policy_version=0)
    world.publish(1, T0 - 8_000, metrics={"loss": 0.5, "note": "x"})  # type: ignore[dict-item]
    world.accept(alice, [0.0, 1.0, 0.0, 1.0], T0 - 7_000, policy_version=1)
    world.publish(2, T0 - 6_000)
    world.accept(alice, [1.0, 1.0, 0.0, 1.0], T0 - 5_000, policy_version=2)
    snap = collect_stats(storage_db, WINDOW, now_ms=NOW)

    assert [(p.version, p.kind, p.rollouts, p.reward_mean) for p in snap.policies] == [
        (2, "delta", 4, 0.75),
        (1, "full", 4, 0.5),
        (0, "base", 4, 0.25),
    ]
    assert snap.policies[1].metrics == {"loss": 0.5}  # non-numbers are left out
    assert snap.policies[0].parent_version == 1 and snap.policies[0].trainer_step == 20

    # With the table limited to the newest version, only that version is read.
    narrow = collect_stats(
        storage_db, StatsWindow(history_s=60, bucket_s=10, max_policy_versions=1), now_ms=NOW
    )
    assert [(p.version, p.reward_mean) for p in narrow.policies] == [(2, 0.75)]


def test_run_selection_and_unknown_runs(storage_db: Database) -> None:
    first = make_world(storage_db, "first", now_ms=T0 - 2)
    make_world(storage_db, "second", now_ms=T0 - 1)
    alice = first.worker("alice", 2)
    first.accept(alice, [1.0] * 4, T0)
    assert collect_stats(storage_db, WINDOW, now_ms=NOW).run_id == "second"
    picked = collect_stats(storage_db, WINDOW, now_ms=NOW, run_id="first")
    assert picked.run_id == "first"
    assert sum(b.rollouts for b in picked.rollout_series) == 4
    with pytest.raises(UnknownRunError, match=r"no run 'nope'.*first"):
        collect_stats(storage_db, WINDOW, now_ms=NOW, run_id="nope")


def test_snapshot_json_is_plain_and_round_trips(storage_db: Database) -> None:
    import json

    world = make_world(storage_db)
    world.accept(world.worker("alice", 2), [1.0] * 4, T0)
    snap = collect_stats(storage_db, WINDOW, now_ms=NOW)
    decoded = json.loads(snap.to_json_bytes())
    assert decoded["run_id"] == "r1"
    assert decoded["window"]["bucket_s"] == 10
    assert decoded["rollout_series"][-1]["rollouts"] == 4


def test_window_validation_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="raise bucket_s or shorten history_s"):
        StatsWindow(history_s=100_000, bucket_s=1)
    with pytest.raises(ValueError, match="make the buckets shorter"):
        StatsWindow(history_s=60, bucket_s=120)


def test_queries_read_index_ranges_not_whole_tables(storage_db: Database, tmp_path: Any) -> None:
    """SQLite's plan for every statement of a snapshot: the big tables (rollouts,
    batches, audit jobs, leases) are only searched through an index."""
    world = make_world(storage_db)
    alice = world.worker("alice", 2)
    for i in range(3):
        world.accept(alice, [1.0] * 4, T0 - i * 1000, audit_kinds=[AuditKind.PROOF])
    world.publish(1, T0)
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, params))

    event.listen(storage_db.engine, "before_cursor_execute", capture)
    try:
        collect_stats(
            storage_db, StatsWindow(history_s=60, bucket_s=10, max_policy_versions=1), now_ms=NOW
        )
    finally:
        event.remove(storage_db.engine, "before_cursor_execute", capture)
    assert len(statements) >= 10
    url = storage_db.engine.url.database
    assert url is not None
    with sqlite3.connect(url) as connection:
        for statement, params in statements:
            plan = [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {statement}", params)]
            for table in ("rollouts", "batches", "audit_jobs", "leases"):
                assert not any(step.startswith(f"SCAN {table}") for step in plan), (
                    statement,
                    plan,
                )
