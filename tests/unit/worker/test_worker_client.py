"""`CoordinatorClient` against a real grpc.aio server on loopback.

The server is a scripted `WorkerServiceServicer` (not the coordinator) so that each test
decides when the "coordinator" is unavailable, refuses, or restarts: what is tested is
the client's retries, backoff, re-signing, idempotency and reconnects.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from coderepair.protocol import rpc
from coderepair.protocol.identity import Envelope, Identity
from coderepair.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from coderepair.worker.client import (
    CoordinatorClient,
    CoordinatorRefusal,
    CoordinatorUnavailable,
    RetryPolicy,
)

FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, max_elapsed_s=5.0, call_timeout_s=2)


class Scripted(worker_pb2_grpc.WorkerServiceServicer):
    """Fails the first ``failures`` submissions with UNAVAILABLE, then accepts, storing
    each idempotency key once (like the coordinator's batch table)."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.envelopes: list[Envelope] = []
        self.stored: dict[str, str] = {}

    async def SubmitRollouts(self, request: Any, context: Any) -> Any:
        envelope = Envelope.from_bytes(request.envelope)
        self.envelopes.append(envelope)
        if len(self.envelopes) <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        payload = worker_pb2.SubmitPayload.FromString(envelope.payload)
        replayed = payload.idempotency_key in self.stored
        batch = self.stored.setdefault(payload.idempotency_key, f"b{len(self.stored) + 1}")
        return worker_pb2.SubmitRolloutsResponse(
            accepted=True, batch_id=batch, replayed_response=replayed
        )

    async def Register(self, request: Any, context: Any) -> Any:
        self.envelopes.append(Envelope.from_bytes(request.envelope))
        rejection = common_pb2.Rejection(
            reason=common_pb2.REJECTION_REASON_BANNED, message="this key is banned"
        )
        await rpc.abort_with_rejection(context, rejection)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _serve(servicer: Scripted, port: int) -> grpc.aio.Server:
    server = grpc.aio.server(options=rpc.server_options())
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


@pytest.fixture
async def port() -> AsyncIterator[int]:
    yield _free_port()


def _payload() -> worker_pb2.SubmitPayload:
    return worker_pb2.SubmitPayload(lease_id="l1", idempotency_key="k" * 32, policy_version=1)


async def test_submit_retries_unavailable_with_the_same_key_and_fresh_envelopes(
    port: int,
) -> None:
    servicer = Scripted(failures=3)
    server = await _serve(servicer, port)
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    identity = Identity.generate()
    try:
        async with CoordinatorClient(
            f"127.0.0.1:{port}", identity, retry=FAST, rng=random.Random(0), sleep=record
        ) as client:
            answer = await client.submit(_payload())
            again = await client.submit(_payload())  # a retry after a lost answer
    finally:
        await server.stop(None)
    assert answer.accepted and not answer.replayed_response
    assert again.accepted and again.replayed_response and again.batch_id == answer.batch_id
    assert list(servicer.stored) == ["k" * 32]
    # Every attempt carried byte-identical payloads under a fresh nonce and signature.
    assert len({e.payload for e in servicer.envelopes}) == 1
    assert len({e.nonce for e in servicer.envelopes}) == len(servicer.envelopes) == 5
    # Exponential backoff with jitter in [base/2, base], capped.
    assert len(waits) == 3 and client.stats.retries == 3 and client.stats.reconnects == 3
    for attempt, wait in enumerate(waits):
        base = min(FAST.initial_backoff_s * 2**attempt, FAST.max_backoff_s)
        assert base / 2 <= wait <= base


async def test_an_out_of_band_refusal_is_raised_with_its_reason_and_not_retried(
    port: int,
) -> None:
    servicer = Scripted()
    server = await _serve(servicer, port)
    try:
        async with CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), retry=FAST) as c:
            with pytest.raises(CoordinatorRefusal) as refused:
                await c.register("w", "0.1.0", common_pb2.WorkerCapabilities())
    finally:
        await server.stop(None)
    assert refused.value.reason == common_pb2.REJECTION_REASON_BANNED
    assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert "this key is banned" in str(refused.value)
    assert len(servicer.envelopes) == 1


async def test_gives_up_with_a_clear_error_when_nothing_answers(port: int) -> None:
    policy = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, max_elapsed_s=0.5)
    async with CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), retry=policy) as c:
        with pytest.raises(CoordinatorUnavailable, match="did not answer") as failed:
            await c.submit(_payload())
    assert f"127.0.0.1:{port}" in str(failed.value) and "doctor" in str(failed.value)
    assert c.stats.retries >= 2


async def test_reconnects_to_a_restarted_server_and_the_batch_is_stored_once(
    port: int,
) -> None:
    servicer = Scripted()
    server = await _serve(servicer, port)
    async with CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), retry=FAST) as c:
        first = await c.submit(_payload())
        await server.stop(None)
        pending = asyncio.create_task(c.submit(_payload()))
        await asyncio.sleep(0.5)  # the client is retrying against a closed port
        assert not pending.done()
        server = await _serve(servicer, port)  # same state, like a coordinator on its DB
        try:
            again = await asyncio.wait_for(pending, 10)
        finally:
            await server.stop(None)
    assert again.accepted and again.replayed_response and again.batch_id == first.batch_id
    assert c.stats.reconnects >= 1 and len(servicer.stored) == 1


class SlowHeartbeat(Scripted):
    """Scripted, plus a Heartbeat that answers only after ``delay_s``."""

    def __init__(self, failures: int, delay_s: float) -> None:
        super().__init__(failures)
        self.delay_s = delay_s
        self.heartbeat_started = asyncio.Event()

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        self.heartbeat_started.set()
        await asyncio.sleep(self.delay_s)
        return worker_pb2.HeartbeatResponse(heartbeat_interval_ms=1234)


async def test_a_reconnect_does_not_cancel_the_other_calls_in_flight(port: int) -> None:
    # A submit that meets UNAVAILABLE rebuilds the channel while a heartbeat (or a lease)
    # runs on the old one. Closing that channel at once cancelled the heartbeat locally,
    # which grpc.aio reports as a bare CancelledError: it ended the worker's whole run.
    servicer = SlowHeartbeat(failures=1, delay_s=0.5)
    server = await _serve(servicer, port)
    try:
        async with CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), retry=FAST) as c:
            beat = asyncio.create_task(
                c.heartbeat(
                    activity=worker_pb2.WORKER_ACTIVITY_WORKING,
                    lease_ids=[],
                    run_id="r1",
                    policy_version=1,
                    tokens_per_second=0.0,
                )
            )
            await asyncio.wait_for(servicer.heartbeat_started.wait(), 5)
            answer = await c.submit(_payload())  # UNAVAILABLE once: a reconnect
            assert c.stats.reconnects == 1
            beaten = await asyncio.wait_for(beat, 5)
    finally:
        await server.stop(None)
    assert answer.accepted
    assert beaten.heartbeat_interval_ms == 1234


async def test_a_locally_cancelled_call_is_retried_but_our_own_cancellation_is_not(
    port: int,
) -> None:
    servicer = SlowHeartbeat(failures=0, delay_s=0.3)
    server = await _serve(servicer, port)
    try:
        async with CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), retry=FAST) as c:

            def beat() -> Any:
                return c.heartbeat(
                    activity=worker_pb2.WORKER_ACTIVITY_WORKING,
                    lease_ids=[],
                    run_id="r1",
                    policy_version=1,
                    tokens_per_second=0.0,
                )

            # The channel closed under the call (not this task cancelled): retried.
            first = asyncio.create_task(beat())
            await asyncio.wait_for(servicer.heartbeat_started.wait(), 5)
            assert c._channel is not None
            await c._channel.close()
            answered = await asyncio.wait_for(first, 5)
            assert answered.heartbeat_interval_ms == 1234 and c.stats.retries >= 1
            # The task itself cancelled: the cancellation goes through.
            servicer.heartbeat_started.clear()
            second = asyncio.create_task(beat())
            await asyncio.wait_for(servicer.heartbeat_started.wait(), 5)
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
    finally:
        await server.stop(None)
