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
