"""Fixtures for the coordinator's storage tests: a migrated SQLite database in a temp
directory, and a small world in it (one run, two registered workers)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coderepair.coordinator.storage import repo
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.migrate import upgrade_to_head
from coderepair.coordinator.storage.models import Run, Worker

GROUP_SIZE = 4
T0 = 1_700_000_000_000


@dataclass
class StorageWorld:
    """A run and two workers in a fresh database."""

    db: Database
    run: Run
    alice: Worker
    bob: Worker


def make_world(db: Database) -> StorageWorld:
    """Create run "r1" (group size 4) and workers alice and bob in `db`."""
    run = repo.ensure_run(
        db,
        repo.RunSpec(
            run_id="r1",
            trainer_public_key=b"\x01" * 32,
            base_model_id="tiny",
            tokenizer_sha256="a" * 64,
            reward_spec_json="{}",
            reward_spec_hash="b" * 64,
            sampling={"temperature": 1.0},
            group_size=GROUP_SIZE,
            max_policy_lag=2,
        ),
        T0,
    )
    workers = [
        repo.upsert_worker(
            db,
            bytes([n]) * 32,
            display_name=name,
            client_version="0.1.0",
            capabilities={"engine": "hf"},
            now_ms=T0,
        )
        for n, name in ((2, "alice"), (3, "bob"))
    ]
    return StorageWorld(db=db, run=run, alice=workers[0], bob=workers[1])


@pytest.fixture
def storage_db(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database file (WAL) under tmp_path."""
    db = Database.open(f"sqlite:///{tmp_path / 'coordinator.db'}")
    upgrade_to_head(db.engine)
    yield db
    db.close()


@pytest.fixture
def storage_world(storage_db: Database) -> StorageWorld:
    """`make_world` in `storage_db`."""
    return make_world(storage_db)


def make_lease(world: StorageWorld, *, deadline: int = T0 + 1000, n_tasks: int = 1) -> str:
    """An open lease of alice on run r1 with tasks t0..t{n-1} (seeds 10i..10i+3)."""
    lease = repo.create_lease(
        world.db,
        run_id="r1",
        worker_id=world.alice.worker_id,
        policy_version=0,
        tasks=[repo.LeaseTask(f"t{i}", [10 * i + j for j in range(4)]) for i in range(n_tasks)],
        issued_ms=T0,
        deadline_ms=deadline,
    )
    return lease.lease_id
