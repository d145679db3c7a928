"""The database reads behind the coordinator's task pools (`service.stats`), on SQLite."""

from __future__ import annotations

from storage_support import T0, StorageWorld, make_lease

from coderepair.coordinator.service.stats import open_lease_tasks
from coderepair.coordinator.storage import repo


def test_open_lease_tasks_reads_only_the_leases_the_caller_does_not_know(
    storage_world: StorageWorld,
) -> None:
    db = storage_world.db
    first, second, closed = (
        make_lease(storage_world, n_tasks=2),
        make_lease(storage_world),
        make_lease(storage_world),
    )
    repo.release_lease(db, closed, storage_world.alice.worker_id, T0 + 1)
    assert open_lease_tasks(db) == {"r1": {first: ["t0", "t1"], second: ["t0"]}}
    # A known lease's tasks come from the caller, as given (its row is not parsed); a
    # known lease that is no longer open is left out; an unknown one is read from its row.
    known = {first: ["mine"], closed: ["t0"]}
    assert open_lease_tasks(db, known) == {"r1": {first: ["mine"], second: ["t0"]}}
    assert open_lease_tasks(db, {first: [], second: []}) == {"r1": {first: [], second: []}}
