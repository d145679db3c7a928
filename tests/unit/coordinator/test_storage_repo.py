"""Runs, policy versions, workers, leases and replay nonces in the storage layer (SQLite)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from storage_support import make_lease

from coderepair.coordinator.storage import audits, repo
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.errors import (
    ConflictError,
    NotFoundError,
    WorkerBannedError,
)
from coderepair.coordinator.storage.models import LeaseState, PolicyKind, WorkerState
from coderepair.protocol.identity import fingerprint

if TYPE_CHECKING:
    from storage_support import StorageWorld

T0 = 1_700_000_000_000


def _spec(**changes: object) -> repo.RunSpec:
    spec = repo.RunSpec(
        run_id="r1",
        trainer_public_key=b"\x01" * 32,
        base_model_id="tiny",
        tokenizer_sha256="a" * 64,
        reward_spec_json="{}",
        reward_spec_hash="b" * 64,
        sampling={"temperature": 1.0},
        group_size=4,
        max_policy_lag=2,
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def test_ensure_run_is_idempotent_and_refuses_changing_fixed_facts(
    storage_db: Database,
) -> None:
    first = repo.ensure_run(storage_db, _spec(), T0)
    again = repo.ensure_run(storage_db, _spec(max_policy_lag=5), T0 + 1)
    assert again.created_unix_ms == first.created_unix_ms
    assert again.max_policy_lag == 5
    with pytest.raises(ConflictError, match="group_size"):
        repo.ensure_run(storage_db, _spec(group_size=8), T0)
    with pytest.raises(ConflictError, match="32"):
        repo.ensure_run(storage_db, _spec(run_id="r2", trainer_public_key=b"x"), T0)
    assert [r.run_id for r in repo.list_runs(storage_db)] == ["r1"]


def _policy(version: int, parent: int | None = None) -> repo.PolicyDraft:
    return repo.PolicyDraft(
        run_id="r1",
        version=version,
        parent_version=parent,
        kind=PolicyKind.FULL if parent is None else PolicyKind.DELTA,
        manifest_json=b'{"signed": true}',
        shards=[{"name": "model.safetensors", "size": 3, "sha256": "c" * 64}],
        trained_through_cursor=0,
        trainer_step=version * 10,
        metrics={"loss": 0.5},
    )


def test_policy_versions_are_published_strictly_in_order(storage_world: StorageWorld) -> None:
    db = storage_world.db
    repo.publish_policy(db, _policy(1), T0)
    with pytest.raises(ConflictError, match="next one \\(2\\)"):
        repo.publish_policy(db, _policy(3, parent=1), T0)
    with pytest.raises(ConflictError, match="at policy version 1"):
        repo.publish_policy(db, _policy(1), T0)
    stored = repo.publish_policy(db, _policy(2, parent=1), T0 + 5)
    assert stored.kind is PolicyKind.DELTA
    run = repo.get_run(db, "r1")
    assert run is not None and run.latest_policy_version == 2
    fetched = repo.get_policy(db, "r1", 1)
    assert fetched is not None and fetched.manifest_json == b'{"signed": true}'
    with pytest.raises(NotFoundError):
        repo.publish_policy(db, replace(_policy(1), run_id="nope"), T0)


def test_register_is_idempotent_and_updates_capabilities(storage_db: Database) -> None:
    key = b"\x07" * 32
    first = repo.upsert_worker(
        storage_db, key, display_name="a", client_version="0.1", capabilities={}, now_ms=T0
    )
    second = repo.upsert_worker(
        storage_db,
        key,
        display_name="b",
        client_version="0.2",
        capabilities={"engine": "vllm"},
        now_ms=T0 + 9,
    )
    assert first.worker_id == second.worker_id == fingerprint(key)
    assert second.registered_unix_ms == T0
    assert second.last_seen_unix_ms == T0 + 9
    assert (second.display_name, second.client_version) == ("b", "0.2")
    assert second.capabilities_json == '{"engine":"vllm"}'
    with pytest.raises(ConflictError, match="32 bytes"):
        repo.upsert_worker(
            storage_db, b"short", display_name="", client_version="", capabilities={}, now_ms=T0
        )


def test_timed_ban_ends_by_itself_with_the_streak_reset(storage_world: StorageWorld) -> None:
    db, alice = storage_world.db, storage_world.alice
    worker, _ = audits.ban_worker(
        db, alice.worker_id, reason="spam", until_ms=T0 + 100, void_pending=False, now_ms=T0
    )
    assert worker.state is WorkerState.BANNED
    assert repo.touch_worker(db, alice.worker_id, T0 + 50).state is WorkerState.BANNED
    after = repo.touch_worker(db, alice.worker_id, T0 + 100)
    assert after.state is WorkerState.ACTIVE
    assert after.ban_reason is None and after.valid_streak == 0
    with pytest.raises(NotFoundError, match="Register"):
        repo.touch_worker(db, "0" * 16, T0)


def test_lease_round_trips_its_tasks_and_seeds(storage_world: StorageWorld) -> None:
    lease_id = make_lease(storage_world, n_tasks=2)
    lease = repo.get_lease(storage_world.db, lease_id)
    assert lease is not None and lease.state is LeaseState.OPEN
    assert repo.lease_tasks(lease) == [
        repo.LeaseTask("t0", [0, 1, 2, 3]),
        repo.LeaseTask("t1", [10, 11, 12, 13]),
    ]
    assert repo.open_lease_count(storage_world.db, "r1") == 1


def test_lease_refuses_wrong_seed_counts_bad_deadlines_and_banned_workers(
    storage_world: StorageWorld,
) -> None:
    db, alice = storage_world.db, storage_world.alice
    kwargs = {"run_id": "r1", "worker_id": alice.worker_id, "policy_version": 0}
    with pytest.raises(ConflictError, match="group size 4"):
        repo.create_lease(
            db, **kwargs, tasks=[repo.LeaseTask("t", [1])], issued_ms=T0, deadline_ms=T0 + 1
        )
    with pytest.raises(ConflictError, match="after issue time"):
        repo.create_lease(
            db, **kwargs, tasks=[repo.LeaseTask("t", [1] * 4)], issued_ms=T0, deadline_ms=T0
        )
    with pytest.raises(ConflictError, match="at least one task"):
        repo.create_lease(db, **kwargs, tasks=[], issued_ms=T0, deadline_ms=T0 + 1)
    audits.ban_worker(db, alice.worker_id, reason="x", until_ms=None, void_pending=False, now_ms=T0)
    with pytest.raises(WorkerBannedError):
        make_lease(storage_world)


def test_release_is_idempotent_and_only_for_the_owner(storage_world: StorageWorld) -> None:
    db = storage_world.db
    lease_id = make_lease(storage_world)
    with pytest.raises(NotFoundError):
        repo.release_lease(db, lease_id, storage_world.bob.worker_id, T0 + 1)
    assert repo.release_lease(db, lease_id, storage_world.alice.worker_id, T0 + 1) is True
    assert repo.release_lease(db, lease_id, storage_world.alice.worker_id, T0 + 2) is False
    lease = repo.get_lease(db, lease_id)
    assert lease is not None and lease.state is LeaseState.RELEASED


def test_expiry_sweep_closes_only_leases_past_their_deadline(storage_world: StorageWorld) -> None:
    db = storage_world.db
    early = make_lease(storage_world, deadline=T0 + 10)
    late = make_lease(storage_world, deadline=T0 + 1000)
    released = make_lease(storage_world, deadline=T0 + 10)
    repo.release_lease(db, released, storage_world.alice.worker_id, T0 + 1)
    expired = repo.expire_leases(db, T0 + 11)
    assert [lease.lease_id for lease in expired] == [early]
    assert expired[0].state is LeaseState.EXPIRED
    assert repo.expire_leases(db, T0 + 11) == []
    still = repo.get_lease(db, late)
    assert still is not None and still.state is LeaseState.OPEN


def test_ban_revokes_open_leases(storage_world: StorageWorld) -> None:
    db = storage_world.db
    lease_id = make_lease(storage_world)
    audits.ban_worker(
        db, storage_world.alice.worker_id, reason="x", until_ms=None, void_pending=False, now_ms=T0
    )
    lease = repo.get_lease(db, lease_id)
    assert lease is not None and lease.state is LeaseState.REVOKED


def test_nonces_are_remembered_until_they_expire(storage_db: Database) -> None:
    signer, nonce = b"\x05" * 32, b"\x06" * 16
    assert repo.remember_nonce(storage_db, signer, nonce, expires_ms=T0 + 10, now_ms=T0)
    assert not repo.remember_nonce(storage_db, signer, nonce, expires_ms=T0 + 20, now_ms=T0 + 5)
    assert repo.remember_nonce(storage_db, signer, b"\x07" * 16, expires_ms=T0 + 10, now_ms=T0)
    # Past expiry the pair may be used again (its envelope fails the clock check anyway).
    assert repo.remember_nonce(storage_db, signer, nonce, expires_ms=T0 + 30, now_ms=T0 + 11)
    assert repo.prune_nonces(storage_db, T0 + 25) == 1


def _holding_the_write_lock(db: Database) -> Database:
    """Another handle on `db`'s file whose writers give up at once on a taken lock."""
    return Database.open(db.engine.url, sqlite_busy_timeout_ms=50)


def test_sweeps_with_nothing_due_do_not_wait_for_the_write_lock(
    storage_world: StorageWorld,
) -> None:
    db = storage_world.db
    open_lease = make_lease(storage_world, deadline=T0 + 1000)
    assert repo.remember_nonce(db, b"\x05" * 32, b"\x06" * 16, expires_ms=T0 + 10, now_ms=T0)
    sweeper = _holding_the_write_lock(db)
    try:
        with db.write() as session:  # a long commit of another writer holds the lock
            session.execute(text("UPDATE runs SET head_cursor = head_cursor"))
            # Nothing due: answered from a read, where a write would time out here.
            assert repo.expire_leases(sweeper, T0 + 11) == []
            assert repo.prune_nonces(sweeper, T0 + 5) == 0
            # Something due: it needs the lock, and says so when it cannot have it.
            with pytest.raises(OperationalError):
                repo.expire_leases(sweeper, T0 + 2000)
        expired = repo.expire_leases(sweeper, T0 + 2000)
        assert [lease.lease_id for lease in expired] == [open_lease]
        assert repo.prune_nonces(sweeper, T0 + 11) == 1
    finally:
        sweeper.close()
