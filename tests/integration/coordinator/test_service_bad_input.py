"""Every kind of bad input gets a clear answer over real gRPC, and nothing is half-written.

Unattributable requests (bad envelope, forged signature, replay, skew, unknown key,
wrong key for the service) end with a gRPC status plus the `Rejection` in the trailing
metadata; a signed batch that fails validation is answered in-band (contract:
common.proto), with the same reason codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
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

from coderepair.coordinator.service.server import Coordinator
from coderepair.protocol import rpc
from coderepair.protocol.identity import Envelope, Identity
from coderepair.v1 import admin_pb2, common_pb2, trainer_pb2, worker_pb2

R = common_pb2


@pytest.fixture
async def world(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> AsyncIterator[tuple[Coordinator, Clients]]:
    config = make_config(
        tmp_path,
        assets,
        keys,
        server={"max_message_bytes": 64 * 1024},
        run={"max_tasks_per_lease": 1},
    )
    coordinator = Coordinator(config, seed=0)
    await coordinator.start()
    clients = Clients(coordinator.address)
    await clients.register(keys.workers[0])
    await clients.register(keys.workers[1])
    assert (await clients.publish(keys.trainer, assets["shards"])).accepted
    yield coordinator, clients
    await clients.close()
    await coordinator.shutdown()


async def _refused(call: Any) -> tuple[grpc.StatusCode, common_pb2.Rejection]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    rejection = rpc.rejection_from_metadata(info.value.trailing_metadata())  # type: ignore[arg-type]
    assert rejection is not None, "every refusal carries a Rejection trailer"
    assert rejection.message, "and says what is wrong"
    return info.value.code(), rejection


def _submit(envelope: bytes) -> worker_pb2.SubmitRolloutsRequest:
    return worker_pb2.SubmitRolloutsRequest(envelope=envelope)


async def test_envelope_level_refusals(world: tuple[Coordinator, Clients], keys: Keys) -> None:
    _, clients = world
    worker = keys.workers[0]
    stub = clients.worker
    # Not an envelope at all.
    code, rej = await _refused(stub.SubmitRollouts(_submit(b"garbage")))
    assert (code, rej.reason) == (grpc.StatusCode.INVALID_ARGUMENT, R.REJECTION_REASON_STRUCTURAL)
    # Empty envelope.
    code, rej = await _refused(stub.SubmitRollouts(_submit(b"")))
    assert rej.reason == R.REJECTION_REASON_STRUCTURAL
    # A valid envelope whose payload is not a SubmitPayload (wrong types on the wire).
    bad_payload = worker.sign(rpc.SUBMIT_ROLLOUTS_PURPOSE, b"\xff\xff\xff").to_bytes()
    code, rej = await _refused(stub.SubmitRollouts(_submit(bad_payload)))
    assert rej.reason == R.REJECTION_REASON_STRUCTURAL
    # Forged signature.
    good = worker.sign(rpc.SUBMIT_ROLLOUTS_PURPOSE, b"")
    forged = Envelope(
        payload=good.payload,
        signer=good.signer,
        purpose=good.purpose,
        timestamp_ms=good.timestamp_ms,
        nonce=good.nonce,
        signature=bytes(64),
    ).to_bytes()
    code, rej = await _refused(stub.SubmitRollouts(_submit(forged)))
    assert (code, rej.reason) == (grpc.StatusCode.UNAUTHENTICATED, R.REJECTION_REASON_SIGNATURE)
    # A signature made for another RPC.
    wrong_purpose = worker.sign(rpc.REGISTER_PURPOSE, b"").to_bytes()
    code, rej = await _refused(stub.SubmitRollouts(_submit(wrong_purpose)))
    assert rej.reason == R.REJECTION_REASON_SIGNATURE
    # Clock skew.
    old = worker.sign(rpc.HEARTBEAT_PURPOSE, b"", now_ms=1_000_000).to_bytes()
    code, rej = await _refused(stub.Heartbeat(worker_pb2.HeartbeatRequest(envelope=old)))
    assert rej.reason == R.REJECTION_REASON_CLOCK_SKEW
    # Replay: the same envelope twice.
    beat = signed(worker, W + "Heartbeat", worker_pb2.HeartbeatPayload())
    await stub.Heartbeat(worker_pb2.HeartbeatRequest(envelope=beat))
    code, rej = await _refused(stub.Heartbeat(worker_pb2.HeartbeatRequest(envelope=beat)))
    assert (code, rej.reason) == (grpc.StatusCode.UNAUTHENTICATED, R.REJECTION_REASON_REPLAY)
    # Unknown key.
    stranger = Identity.generate()
    code, rej = await _refused(clients.lease(stranger))
    assert rej.reason == R.REJECTION_REASON_NOT_REGISTERED
    # A worker key on the trainer and admin services.
    ack = trainer_pb2.AckPayload(run_id="r1", cursor=0)
    code, rej = await _refused(
        clients.trainer.AckCursor(
            trainer_pb2.AckCursorRequest(envelope=signed(worker, T + "AckCursor", ack))
        )
    )
    assert (code, rej.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        R.REJECTION_REASON_NOT_AUTHORIZED,
    )
    code, rej = await _refused(
        clients.admin.GetStats(
            admin_pb2.GetStatsRequest(
                envelope=signed(worker, A + "GetStats", admin_pb2.GetStatsPayload())
            )
        )
    )
    assert rej.reason == R.REJECTION_REASON_NOT_AUTHORIZED


async def test_oversized_request(world: tuple[Coordinator, Clients], keys: Keys) -> None:
    _, clients = world
    leased = (await clients.lease(keys.workers[0])).lease
    samples = make_samples(leased)
    samples[0].completion_text = "x" * 100_000
    code, rej = await _refused(clients.submit(keys.workers[0], submit_payload(leased, samples)))
    assert (code, rej.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        R.REJECTION_REASON_TOO_LARGE,
    )


async def test_batch_refusals_are_in_band_and_nothing_is_half_written(
    world: tuple[Coordinator, Clients], keys: Keys, assets: dict[str, Path]
) -> None:
    coordinator, clients = world
    alice, bob = keys.workers[0], keys.workers[1]
    leased = (await clients.lease(alice)).lease

    async def refusal(identity: Identity, payload: worker_pb2.SubmitPayload) -> Any:
        answer = await clients.submit(identity, payload)
        assert not answer.accepted
        return answer.rejection

    # Unknown lease.
    ghost = submit_payload(leased, make_samples(leased))
    ghost.lease_id = "no-such-lease"
    assert (await refusal(alice, ghost)).reason == R.REJECTION_REASON_UNKNOWN_LEASE
    # Someone else's lease.
    theirs = await refusal(bob, submit_payload(leased, make_samples(leased)))
    assert theirs.reason == R.REJECTION_REASON_NOT_LEASE_OWNER
    # Wrong sample count, wrong seed, bad idempotency key.
    short = submit_payload(leased, make_samples(leased)[:1])
    assert (await refusal(alice, short)).reason == R.REJECTION_REASON_STRUCTURAL
    wrong_seed = make_samples(leased)
    wrong_seed[1].seed ^= 1
    rejection = await refusal(alice, submit_payload(leased, wrong_seed))
    assert rejection.reason == R.REJECTION_REASON_STRUCTURAL
    assert rejection.task_id == wrong_seed[1].task_id and rejection.sample_index == 1
    bad_key = submit_payload(leased, make_samples(leased), key="short")
    assert (await refusal(alice, bad_key)).reason == R.REJECTION_REASON_STRUCTURAL
    inconsistent = make_samples(leased)
    inconsistent[0].reward = 0.5  # not the clamped sum of its components
    assert (await refusal(alice, submit_payload(leased, inconsistent))).reason == (
        R.REJECTION_REASON_STRUCTURAL
    )
    # A future policy version.
    future = submit_payload(leased, make_samples(leased))
    future.policy_version = leased.policy_version + 1
    assert (await refusal(alice, future)).reason == R.REJECTION_REASON_STALE_POLICY
    # A stale one: the run moves two versions on (max_policy_lag = 1).
    for version in (2, 3):
        assert (await clients.publish(keys.trainer, assets["shards"], version)).accepted
    stale = await refusal(alice, submit_payload(leased, make_samples(leased)))
    assert stale.reason == R.REJECTION_REASON_STALE_POLICY
    # A refused batch was never visible and the lease was not consumed by it...
    assert await clients.stream(keys.trainer) == []
    # ...and a fresh lease at the latest version is accepted; bob copying alice's
    # completions into his own lease is refused as DUPLICATE.
    good = (await clients.lease(alice)).lease
    copied_from = make_samples(good)
    assert (await clients.submit(alice, submit_payload(good, copied_from))).accepted
    # Round robin over 4 tasks: within 4 leases bob is given alice's (now free) task.
    for _ in range(4):
        bobs = (await clients.lease(bob)).lease
        if bobs.tasks[0].task_id == good.tasks[0].task_id:
            break
    assert bobs.tasks[0].task_id == good.tasks[0].task_id
    copy = make_samples(bobs)
    for mine, original in zip(copy, copied_from, strict=True):
        mine.completion_token_ids[:] = original.completion_token_ids
    dup = await refusal(bob, submit_payload(bobs, copy))
    assert dup.reason == R.REJECTION_REASON_DUPLICATE
    rows = await clients.stream(keys.trainer)
    assert len(rows) == 2 and {r.worker_id for r in rows} == {alice.key_id}
    del coordinator


async def test_banned_key_is_refused(world: tuple[Coordinator, Clients], keys: Keys) -> None:
    _, clients = world
    worker = keys.workers[0]
    leased = (await clients.lease(worker)).lease
    ban = admin_pb2.BanPayload(worker_id=worker.key_id, reason="testing bans")
    banned = await clients.admin.BanWorker(
        admin_pb2.BanWorkerRequest(envelope=signed(keys.admin, A + "BanWorker", ban))
    )
    assert banned.worker.state == R.WORKER_STATE_BANNED
    code, rej = await _refused(clients.lease(worker))
    assert (code, rej.reason) == (grpc.StatusCode.PERMISSION_DENIED, R.REJECTION_REASON_BANNED)
    code, rej = await _refused(clients.submit(worker, submit_payload(leased, make_samples(leased))))
    assert rej.reason == R.REJECTION_REASON_BANNED
    assert "testing bans" in rej.message
