"""An identical completion from another worker is audited by sampling replay, not refused.

Two honest workers write the same completion once the policy is confident (a learned
one-line fix), so refusing duplicates outright would punish the best samples. Where the
run's audits include sampling replay, the coordinator accepts such a batch and always
queues its audits: a copy made under other seeds fails the replay (the model auditor's
tests show that), an honest one passes. Without sampling replay it still refuses them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from service_support import Clients, Keys, make_config, make_samples, submit_payload
from sqlalchemy import select

from coderepair.coordinator.service.server import Coordinator
from coderepair.coordinator.storage.models import AuditJob, AuditKind
from coderepair.v1 import common_pb2, worker_pb2


@pytest.fixture
async def world(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> AsyncIterator[tuple[Coordinator, Clients]]:
    # Audits are queued but not run here (in_process off): what is checked is the queue.
    config = make_config(
        tmp_path,
        assets,
        keys,
        run={"max_tasks_per_lease": 1},
        audit={"kinds": ["sampling", "reward"], "in_process": False},
    )
    coordinator = Coordinator(config, seed=0)
    await coordinator.start()
    clients = Clients(coordinator.address)
    for worker in keys.workers[:2]:
        await clients.register(worker)
    assert (await clients.publish(keys.trainer, assets["shards"])).accepted
    yield coordinator, clients
    await clients.close()
    await coordinator.shutdown()


async def _lease_task(clients: Clients, worker: object, task_id: str) -> worker_pb2.Lease:
    # Round robin over the fixture tasks: within a few leases the worker gets this task.
    for _ in range(8):
        lease = (await clients.lease(worker)).lease
        if lease.tasks[0].task_id == task_id:
            return lease
    raise AssertionError(f"task {task_id} was never leased")


async def test_a_duplicate_is_accepted_and_audited_by_replay(
    world: tuple[Coordinator, Clients], keys: Keys
) -> None:
    coordinator, clients = world
    alice, bob = keys.workers[:2]
    first = (await clients.lease(alice)).lease
    original = make_samples(first)
    assert (await clients.submit(alice, submit_payload(first, original))).accepted
    second = await _lease_task(clients, bob, first.tasks[0].task_id)
    same = make_samples(second)
    for mine, theirs in zip(same, original, strict=True):
        mine.completion_token_ids[:] = theirs.completion_token_ids
    answer = await clients.submit(bob, submit_payload(second, same))
    assert answer.accepted, answer.rejection.message
    with coordinator.context.db.read() as session:
        kinds = set(
            session.scalars(select(AuditJob.kind).where(AuditJob.batch_id == answer.batch_id))
        )
    assert AuditKind.SAMPLING in kinds
    rows = await clients.stream(keys.trainer)
    assert {r.worker_id for r in rows} == {alice.key_id, bob.key_id}


async def test_without_sampling_replay_a_duplicate_is_still_refused(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    config = make_config(tmp_path, assets, keys, run={"max_tasks_per_lease": 1})
    assert "sampling" not in config.audit.kinds
    coordinator = Coordinator(config, seed=0)
    await coordinator.start()
    clients = Clients(coordinator.address)
    try:
        alice, bob = keys.workers[:2]
        for worker in (alice, bob):
            await clients.register(worker)
        assert (await clients.publish(keys.trainer, assets["shards"])).accepted
        first = (await clients.lease(alice)).lease
        original = make_samples(first)
        assert (await clients.submit(alice, submit_payload(first, original))).accepted
        second = await _lease_task(clients, bob, first.tasks[0].task_id)
        same = make_samples(second)
        for mine, theirs in zip(same, original, strict=True):
            mine.completion_token_ids[:] = theirs.completion_token_ids
        answer = await clients.submit(bob, submit_payload(second, same))
        assert not answer.accepted
        assert answer.rejection.reason == common_pb2.REJECTION_REASON_DUPLICATE
    finally:
        await clients.close()
        await coordinator.shutdown()
