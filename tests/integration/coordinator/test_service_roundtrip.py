"""Register → publish → lease → submit → stream → ack over real gRPC on loopback, on
SQLite and on a real PostgreSQL, with the local object store and with an S3-compatible
server (moto); plus idempotent retries, lease expiry, audits and the admin service."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_support import (
    A,
    Clients,
    Keys,
    T,
    W,
    make_config,
    make_samples,
    signed,
    submit_payload,
)

from coderepair.coordinator.service.audit import AuditRequest, AuditResult
from coderepair.coordinator.service.server import Coordinator
from coderepair.coordinator.storage.objects import S3ObjectStore
from coderepair.protocol import rpc
from coderepair.protocol.identity import Identity
from coderepair.v1 import admin_pb2, common_pb2, trainer_pb2, worker_pb2


async def _open(config: Any, **kwargs: Any) -> AsyncIterator[tuple[Coordinator, Clients]]:
    coordinator = Coordinator(config, seed=0, **kwargs)
    await coordinator.start()
    clients = Clients(coordinator.address)
    try:
        yield coordinator, clients
    finally:
        await clients.close()
        await coordinator.shutdown()


async def _round_trip(coordinator: Coordinator, clients: Clients, keys: Keys, shards: Path) -> None:
    worker = keys.workers[0]
    registered = await clients.register(worker)
    assert registered.state == common_pb2.WORKER_STATE_ACTIVE
    assert [r.run_id for r in registered.runs] == ["r1"]
    # No policy yet: no work, with a retry hint.
    empty = await clients.lease(worker)
    assert not empty.HasField("lease") and empty.retry_after_ms > 0
    published = await clients.publish(keys.trainer, shards)
    assert published.accepted, published.rejection.message
    policy = await clients.worker.GetPolicy(worker_pb2.GetPolicyRequest(run_id="r1"))
    assert [p.version for p in policy.chain] == [1]
    leased = (await clients.lease(worker, max_tasks=2)).lease
    assert len(leased.tasks) == 2 and leased.group_size == 2
    assert all(len(t.seeds) == 2 and t.prompt_token_ids for t in leased.tasks)
    payload = submit_payload(leased, make_samples(leased))
    answer = await clients.submit(worker, payload)
    assert answer.accepted, answer.rejection.message
    assert answer.audit_pending  # streak 0: always audited
    rows = await clients.stream(keys.trainer)
    assert [r.cursor for r in rows] == [1, 2, 3, 4]
    assert {r.batch_id for r in rows} == {answer.batch_id}
    by_key = {(s.task_id, s.sample_index): s for s in payload.samples}
    for row in rows:
        sent = by_key[(row.sample.task_id, row.sample.sample_index)]
        assert list(row.sample.completion_token_ids) == list(sent.completion_token_ids)
        assert row.sample.seed == sent.seed and row.group_size == 2
    # The G rows of a task are consecutive.
    assert rows[0].sample.task_id == rows[1].sample.task_id
    ack = trainer_pb2.AckPayload(run_id="r1", cursor=4, trainer_step=1)
    acked = await clients.trainer.AckCursor(
        trainer_pb2.AckCursorRequest(envelope=signed(keys.trainer, T + "AckCursor", ack))
    )
    assert (acked.acked_cursor, acked.head_cursor) == (4, 4)
    assert await clients.stream(keys.trainer, after=4) == []
    # The in-process audit passes and the (zero-length) window closes: credit granted.
    for _ in range(100):
        await coordinator.sweep_once()
        status = await clients.worker.GetStatus(
            worker_pb2.GetStatusRequest(
                worker_public_key=worker.public_key, batch_ids=[answer.batch_id]
            )
        )
        if status.batches[0].state == common_pb2.BATCH_STATE_ACCEPTED:
            break
        await asyncio.sleep(0.05)
    assert status.batches[0].state == common_pb2.BATCH_STATE_ACCEPTED
    assert status.worker.valid_streak == 1 and status.worker.credit_granted == 4 * 5
    # Health and the admin view.
    health = health_pb2_grpc.HealthStub(clients.channel)
    checked = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    stats = await clients.admin.GetStats(
        admin_pb2.GetStatsRequest(
            envelope=signed(keys.admin, A + "GetStats", admin_pb2.GetStatsPayload())
        )
    )
    assert stats.batches_accepted == 1 and stats.head_cursor == 4 and stats.acked_cursor == 4
    assert stats.latest_policy_version == 1


async def test_round_trip_sqlite(tmp_path: Path, assets: dict[str, Path], keys: Keys) -> None:
    config = make_config(tmp_path, assets, keys)
    async for coordinator, clients in _open(config):
        await _round_trip(coordinator, clients, keys, assets["shards"])


@pytest.mark.postgres
async def test_round_trip_postgres(
    tmp_path: Path, assets: dict[str, Path], keys: Keys, postgres_url: str
) -> None:
    config = make_config(tmp_path, assets, keys, database_url=postgres_url)
    async for coordinator, clients in _open(config):
        await _round_trip(coordinator, clients, keys, assets["shards"])


async def test_round_trip_s3(
    tmp_path: Path,
    assets: dict[str, Path],
    keys: Keys,
    s3_bucket: Callable[[], tuple[Any, str]],
) -> None:
    client, bucket = s3_bucket()
    config = make_config(tmp_path, assets, keys)
    store = S3ObjectStore(bucket, client, prefix="coordinator")
    async for coordinator, clients in _open(config, object_store=store):
        await _round_trip(coordinator, clients, keys, assets["shards"])
    listed = client.list_objects_v2(Bucket=bucket, Prefix="coordinator/runs/r1/batches/")
    assert listed["KeyCount"] == 1


@pytest.mark.slow
async def test_round_trip_with_a_batch_preparing_helper(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    config = make_config(tmp_path, assets, keys, server={"prepare_processes": 1})
    async for coordinator, clients in _open(config):
        (helper,) = coordinator.preparer.pids()
        assert helper != os.getpid()
        await _round_trip(coordinator, clients, keys, assets["shards"])
    with pytest.raises(ProcessLookupError):  # shutdown stopped (and reaped) the helper
        os.kill(helper, 0)


@pytest.mark.slow
async def test_a_helper_refuses_in_band_and_a_killed_one_costs_no_batch(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    config = make_config(tmp_path, assets, keys, server={"prepare_processes": 1})
    async for coordinator, clients in _open(config):
        worker = keys.workers[0]
        leased, payload = await _first_payload(clients, keys, assets)
        bad = submit_payload(leased, make_samples(leased))
        bad.samples[1].seed += 1
        refused = await clients.submit(worker, bad)
        assert not refused.accepted
        assert refused.rejection.reason == common_pb2.REJECTION_REASON_STRUCTURAL
        assert (refused.rejection.task_id, refused.rejection.sample_index) == (
            bad.samples[1].task_id,
            1,
        )
        again = await clients.submit(worker, bad)  # stored: the retry gets the verdict
        assert again.replayed_response and again.batch_id == refused.batch_id
        # The refusal was for this lease's samples, not the lease: it is still open.
        (helper,) = coordinator.preparer.pids()
        os.kill(helper, signal.SIGKILL)
        answers = await asyncio.gather(*(clients.submit(worker, payload) for _ in range(3)))
        assert all(a.accepted for a in answers)
        assert len({a.batch_id for a in answers}) == 1
        assert sum(not a.replayed_response for a in answers) == 1
        assert coordinator.preparer.pids() not in ([], [helper])
        assert len(await clients.stream(keys.trainer)) == 2


async def test_the_sweep_checkpoints_the_wal_the_commits_leave(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    config = make_config(tmp_path, assets, keys, server={"sweep_interval_s": 600})
    async for coordinator, clients in _open(config):
        db = coordinator.context.db
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        await _first_payload(clients, keys, assets)
        calls: list[None] = []
        db.checkpoint = functools.partial(_counted, calls, db.checkpoint)  # type: ignore[method-assign]
        await coordinator.sweep_once()
        assert calls == [None]


def _counted(calls: list[None], checkpoint: Callable[[], None]) -> None:
    calls.append(None)
    checkpoint()


async def _first_payload(
    clients: Clients, keys: Keys, assets: dict[str, Path]
) -> tuple[Any, worker_pb2.SubmitPayload]:
    """Register worker 0, publish version 1, lease one task: (lease, valid payload)."""
    await clients.register(keys.workers[0])
    assert (await clients.publish(keys.trainer, assets["shards"])).accepted
    leased = (await clients.lease(keys.workers[0])).lease
    return leased, submit_payload(leased, make_samples(leased))


async def _two_workers_and_a_policy(
    clients: Clients, keys: Keys, assets: dict[str, Path]
) -> tuple[Identity, Identity]:
    """Register workers 0 and 1 and publish version 1: (alice, bob)."""
    alice, bob = keys.workers[0], keys.workers[1]
    for identity in (alice, bob):
        await clients.register(identity)
    assert (await clients.publish(keys.trainer, assets["shards"])).accepted
    return alice, bob


async def test_retry_is_stored_once(tmp_path: Path, assets: dict[str, Path], keys: Keys) -> None:
    config = make_config(tmp_path, assets, keys)
    async for _coordinator, clients in _open(config):
        worker = keys.workers[0]
        leased, payload = await _first_payload(clients, keys, assets)
        first = await clients.submit(worker, payload)
        # The retry re-signs the same payload in a fresh envelope (new nonce).
        again = await asyncio.gather(*(clients.submit(worker, payload) for _ in range(3)))
        assert first.accepted and not first.replayed_response
        for answer in again:
            assert answer.accepted and answer.replayed_response
            assert answer.batch_id == first.batch_id
        rows = await clients.stream(keys.trainer)
        assert len(rows) == 2
        # The same key with other content is a conflict, answered in-band, not stored.
        other = submit_payload(leased, make_samples(leased, salt="x"), payload.idempotency_key)
        conflict = await clients.submit(worker, other)
        assert not conflict.accepted
        assert conflict.rejection.reason == common_pb2.REJECTION_REASON_CONFLICT
        assert len(await clients.stream(keys.trainer)) == 2


async def test_expired_lease_returns_tasks_to_pool(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    # Four fixture tasks, one per lease: the fifth lease must wait for an expiry.
    config = make_config(tmp_path, assets, keys, run={"lease_ttl_s": 0.5, "max_tasks_per_lease": 4})
    async for coordinator, clients in _open(config):
        alice, bob = await _two_workers_and_a_policy(clients, keys, assets)
        held = (await clients.lease(alice, max_tasks=4)).lease
        assert len(held.tasks) == 4
        none = await clients.lease(bob)
        assert not none.HasField("lease") and none.retry_after_ms > 0
        await asyncio.sleep(0.6)
        await coordinator.sweep_once()
        again = (await clients.lease(bob, max_tasks=4)).lease
        assert {t.task_id for t in again.tasks} == {t.task_id for t in held.tasks}
        late = await clients.submit(alice, submit_payload(held, make_samples(held)))
        assert not late.accepted
        assert late.rejection.reason == common_pb2.REJECTION_REASON_LEASE_EXPIRED
        # Heartbeat tells alice to stop working on it.
        beat = worker_pb2.HeartbeatPayload(
            activity=worker_pb2.WORKER_ACTIVITY_WORKING, lease_ids=[held.lease_id]
        )
        answer = await clients.worker.Heartbeat(
            worker_pb2.HeartbeatRequest(envelope=signed(alice, W + "Heartbeat", beat))
        )
        assert list(answer.revoked_lease_ids) == [held.lease_id]


async def test_release_returns_tasks(tmp_path: Path, assets: dict[str, Path], keys: Keys) -> None:
    config = make_config(tmp_path, assets, keys, run={"max_tasks_per_lease": 4})
    async for _coordinator, clients in _open(config):
        worker = keys.workers[0]
        await clients.register(worker)
        assert (await clients.publish(keys.trainer, assets["shards"])).accepted
        held = (await clients.lease(worker, max_tasks=4)).lease
        release = worker_pb2.ReleasePayload(lease_id=held.lease_id, reason="ctrl-c")
        request = worker_pb2.ReleaseLeaseRequest(
            envelope=signed(worker, W + "ReleaseLease", release)
        )
        assert (await clients.worker.ReleaseLease(request)).released
        request.envelope = signed(worker, W + "ReleaseLease", release)
        assert not (await clients.worker.ReleaseLease(request)).released
        assert len((await clients.lease(worker, max_tasks=4)).lease.tasks) == 4


async def test_back_pressure_waits_for_the_trainer(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    # G = 2 and at most 4 rollouts ahead: two tasks may be out or unacknowledged at once.
    run = {"max_tasks_per_lease": 4, "max_rollouts_ahead": 4}
    config = make_config(tmp_path, assets, keys, run=run)
    async for _coordinator, clients in _open(config):
        alice, bob = await _two_workers_and_a_policy(clients, keys, assets)
        held = (await clients.lease(alice, max_tasks=4)).lease
        assert len(held.tasks) == 2, "the lease is cut to the room under the limit"
        # Free tasks remain, but the leased rollouts fill the limit.
        waiting = await clients.lease(bob)
        assert not waiting.HasField("lease") and waiting.retry_after_ms > 0
        assert (await clients.submit(alice, submit_payload(held, make_samples(held)))).accepted
        # Accepted but not checkpointed by the trainer: still ahead.
        still = await clients.lease(bob)
        assert not still.HasField("lease") and still.retry_after_ms > 0
        ack = trainer_pb2.AckPayload(run_id="r1", cursor=2, trainer_step=1)
        await clients.trainer.AckCursor(
            trainer_pb2.AckCursorRequest(envelope=signed(keys.trainer, T + "AckCursor", ack))
        )
        # Two rollouts acknowledged: room for one task of two samples, no more.
        one = (await clients.lease(bob, max_tasks=4)).lease
        assert len(one.tasks) == 1
        assert not (await clients.lease(alice)).HasField("lease")
        # The trainer dropped the other two rows while it waits (all-equal rewards): it
        # acks them as consumed, its checkpoint unchanged, and they leave the count.
        consumed = trainer_pb2.AckPayload(run_id="r1", cursor=2, consumed_cursor=4)
        answer = await clients.trainer.AckCursor(
            trainer_pb2.AckCursorRequest(envelope=signed(keys.trainer, T + "AckCursor", consumed))
        )
        assert (answer.acked_cursor, answer.consumed_cursor, answer.head_cursor) == (2, 4, 4)
        assert len((await clients.lease(alice, max_tasks=4)).lease.tasks) == 1


class RejectLongCompletions:
    """An auditor that fails batches with completions over 3 tokens (a stand-in policy
    for "this worker cheats", so the void/streak/ban path runs end to end)."""

    def __call__(self, request: AuditRequest) -> AuditResult:
        if any(len(r.completion_ids) > 3 for r in request.records):
            return AuditResult("failed", "completion too long for this test", {"tokens": 5.0})
        return AuditResult("passed", "ok")


async def test_failed_audits_void_and_ban(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    config = make_config(tmp_path, assets, keys, audit={"max_failed_audits": 2, "window_s": 60})
    async for coordinator, clients in _open(config, auditor=RejectLongCompletions()):
        worker = keys.workers[0]
        await clients.register(worker)
        assert (await clients.publish(keys.trainer, assets["shards"])).accepted
        for attempt in range(2):
            leased = (await clients.lease(worker)).lease
            answer = await clients.submit(
                worker, submit_payload(leased, make_samples(leased, salt=str(attempt)))
            )
            assert answer.accepted and answer.audit_pending
            for _ in range(100):
                status = await clients.worker.GetStatus(
                    worker_pb2.GetStatusRequest(
                        worker_public_key=worker.public_key, batch_ids=[answer.batch_id]
                    )
                )
                if status.batches[0].state == common_pb2.BATCH_STATE_VOIDED:
                    break
                await asyncio.sleep(0.05)
            assert status.batches[0].rejection.reason == common_pb2.REJECTION_REASON_AUDIT_REWARD
        assert status.worker.state == common_pb2.WORKER_STATE_BANNED
        assert status.worker.batches_voided == 2 and status.worker.credit_pending == 0
        # Voided rows are skipped by the stream.
        assert await clients.stream(keys.trainer) == []
        listed = await clients.admin.ListAudits(
            admin_pb2.ListAuditsRequest(
                envelope=signed(keys.admin, A + "ListAudits", admin_pb2.ListAuditsPayload())
            )
        )
        assert [a.verdict for a in listed.audits] == [admin_pb2.AUDIT_VERDICT_FAILED] * 2
        del coordinator


async def _refused_as_replay(replica: Clients, envelope: bytes) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await replica.worker.SubmitRollouts(worker_pb2.SubmitRolloutsRequest(envelope=envelope))
    rejection = rpc.rejection_from_metadata(info.value.trailing_metadata())  # type: ignore[arg-type]
    assert rejection is not None
    assert rejection.reason == common_pb2.REJECTION_REASON_REPLAY, rejection.message


async def test_a_batch_envelope_replayed_to_another_replica_is_refused_and_stores_nothing(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    """Two coordinators on one database, as replicas are. SubmitRollouts records its
    envelope's nonce in the same group-commit operation as the batch: the replica that
    saw an envelope refuses its replay from memory, the other finds the nonce in the
    shared table when it writes, and refuses it without storing anything."""
    config = make_config(tmp_path, assets, keys)
    async for _a, first in _open(config):
        async for _b, second in _open(config):
            worker = keys.workers[0]
            _, payload = await _first_payload(first, keys, assets)
            envelope = signed(worker, W + "SubmitRollouts", payload)
            request = worker_pb2.SubmitRolloutsRequest(envelope=envelope)
            answer = await first.worker.SubmitRollouts(request)
            assert answer.accepted, answer.rejection.message
            for replica in (first, second):
                await _refused_as_replay(replica, envelope)
            # A refused batch burns its nonce too: stored once (rejected), then replays
            # of its envelope are refused at either replica.
            other = (await first.lease(worker)).lease
            bad = make_samples(other)
            bad[0].seed += 1
            refused_envelope = signed(worker, W + "SubmitRollouts", submit_payload(other, bad))
            refused = await second.worker.SubmitRollouts(
                worker_pb2.SubmitRolloutsRequest(envelope=refused_envelope)
            )
            assert not refused.accepted
            assert refused.rejection.reason == common_pb2.REJECTION_REASON_STRUCTURAL
            for replica in (second, first):
                await _refused_as_replay(replica, refused_envelope)
            # A retry (the same payload in a fresh envelope) at the other replica gets
            # the stored verdict; the trainer sees the accepted batch's rows once.
            retry = await second.submit(worker, payload)
            assert retry.accepted and retry.replayed_response
            assert retry.batch_id == answer.batch_id
            assert len(await second.stream(keys.trainer)) == len(payload.samples)
            # Nothing of the replays was stored: one batch accepted, one refused.
            status = await second.worker.GetStatus(
                worker_pb2.GetStatusRequest(worker_public_key=worker.public_key)
            )
            assert (status.worker.batches_accepted, status.worker.batches_rejected) == (1, 1)
