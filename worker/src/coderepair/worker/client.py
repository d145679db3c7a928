"""The worker's gRPC client of the coordinator: signed requests, retries, reconnects.

Every state-changing call is a signed envelope (`coderepair.protocol.identity`) made
**per attempt**: a retry re-signs the same payload with a fresh nonce and timestamp, so
the coordinator's replay check never refuses a legitimate retry, while the payload (and
with it a batch's idempotency key) stays byte-identical, so a batch whose first answer
was lost is stored once and its retry gets the stored verdict back.

Transient failures (the coordinator restarting, a dropped connection) are retried with
exponential backoff and jitter up to `RetryPolicy.max_elapsed_s`; after an UNAVAILABLE
the channel is rebuilt, because a gRPC channel that saw its server vanish backs off its
own reconnects for up to minutes. A refusal the coordinator sends out of band (a gRPC
status with a `Rejection` in the trailers) is never retried: it raises
`CoordinatorRefusal` with the reason, whose message says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import message as _message
from pydantic import BaseModel, ConfigDict, Field

from coderepair.protocol import rpc
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.identity import Identity
from coderepair.v1 import common_pb2, worker_pb2, worker_pb2_grpc

__all__ = [
    "CoordinatorClient",
    "CoordinatorError",
    "CoordinatorRefusal",
    "CoordinatorUnavailable",
    "RetryPolicy",
]

log = logging.getLogger(__name__)
R = common_pb2.RejectionReason
T = TypeVar("T")

_W = f"/{rpc.WORKER_SERVICE}/"
# Codes that say nothing about the request itself: the same request may succeed later.
# CANCELLED is what a coordinator that stops gives the calls in flight (our own
# cancellation raises CancelledError instead); submits carry an idempotency key, so a
# batch retried after it is stored once, not dropped as refused.
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
# Channel reconnect backoff kept short: the client's own retry loop paces the attempts.
_RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class CoordinatorError(ProtocolError):
    """A coordinator call failed; subclasses say whether it is worth trying again."""


class CoordinatorUnavailable(CoordinatorError):
    """The coordinator could not be reached within the retry budget."""


class CoordinatorRefusal(CoordinatorError):
    """The coordinator refused the request (a gRPC status, maybe with a `Rejection`)."""

    def __init__(self, code: grpc.StatusCode, reason: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason

    @property
    def reason_name(self) -> str:
        return R.Name(self.reason) if self.reason in R.values() else str(self.reason)


class RetryPolicy(BaseModel):
    """How transient failures are retried."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    initial_backoff_s: float = Field(default=0.2, gt=0, le=60)
    """Wait before the second attempt; doubled for each further one (with jitter)."""
    max_backoff_s: float = Field(default=5.0, gt=0, le=600)
    """Longest wait between two attempts."""
    max_elapsed_s: float = Field(default=120.0, gt=0, le=24 * 3600)
    """Give up (`CoordinatorUnavailable`) when the first attempt is older than this."""
    call_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """Deadline of one attempt."""

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based), jittered."""
        base = min(self.initial_backoff_s * 2**attempt, self.max_backoff_s)
        # Full jitter on the upper half: workers that lost the same coordinator do not
        # all come back in the same millisecond.
        return base * (0.5 + 0.5 * rng.random())


@dataclass
class CallStats:
    """Counters a live view shows: attempts made, retries, channel rebuilds."""

    calls: int = 0
    retries: int = 0
    reconnects: int = 0


class CoordinatorClient:
    """Async client of the WorkerService for one identity. Use as ``async with``."""

    def __init__(
        self,
        address: str,
        identity: Identity,
        *,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.address = address
        self.identity = identity
        self.retry = retry or RetryPolicy()
        self.stats = CallStats()
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._channel: grpc.aio.Channel | None = None
        self._stub: worker_pb2_grpc.WorkerServiceStub | None = None
        # Channels replaced by `reconnect` while other calls may still run on them.
        self._retired: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        # Coordinator time minus local time, learnt at Register: signing with the
        # coordinator's clock keeps a worker with a wrong clock inside the skew bound.
        self.clock_offset_ms = 0

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel and any retired one still draining (idempotent)."""
        channel, self._channel, self._stub = self._channel, None, None
        retired, self._retired = self._retired, {}
        for task, old in retired.items():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await old.close()  # a no-op when its graceful close had finished
        if channel is not None:
            await channel.close()

    def _ensure(self) -> worker_pb2_grpc.WorkerServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.address, options=rpc.channel_options() + _RECONNECT_OPTIONS
            )
            self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        return self._stub

    async def reconnect(self) -> None:
        """Drop the channel; the next call opens a fresh one.

        The old channel is not closed at once: closing a grpc.aio channel cancels the
        calls still running on it, and those (a heartbeat, a lease, another batch) would
        see a bare `asyncio.CancelledError` that ends the task awaiting them. It closes
        in the background once its calls are done, or after one call timeout.
        """
        self.stats.reconnects += 1
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            task = asyncio.create_task(channel.close(grace=self.retry.call_timeout_s))
            self._retired[task] = channel
            task.add_done_callback(lambda done: self._retired.pop(done, None))

    def _envelope(self, method: str, payload: _message.Message) -> bytes:
        purpose = rpc.SIGNED_RPCS[_W + method].purpose
        now = int(time.time() * 1000) + self.clock_offset_ms
        return self.identity.sign(
            purpose, payload.SerializeToString(deterministic=True), now_ms=now
        ).to_bytes()

    async def _call(
        self,
        name: str,
        attempt_fn: Callable[[worker_pb2_grpc.WorkerServiceStub, float], Awaitable[T]],
        *,
        retry_codes: frozenset[grpc.StatusCode] = _TRANSIENT,
    ) -> T:
        """Run ``attempt_fn`` until it answers, a non-transient status, or the budget ends."""
        start = time.monotonic()
        attempt = 0
        while True:
            self.stats.calls += 1
            local = False
            try:
                return await attempt_fn(self._ensure(), self.retry.call_timeout_s)
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError for a call cancelled *locally*, which is
                # also what a closed channel does to its calls. Only a cancellation of
                # this task is ours to pass on; any other is a lost call, retried.
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                code, local = grpc.StatusCode.CANCELLED, True
                details = "the call was cancelled on this side (its channel closed)"
                if code not in retry_codes:
                    raise CoordinatorUnavailable(f"{name}: {details}") from None
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in retry_codes:
                    raise _refusal(name, exc) from None
                details = exc.details()
            if code is grpc.StatusCode.UNAVAILABLE or local:
                await self.reconnect()
            wait = self.retry.backoff(attempt, self._rng)
            if time.monotonic() - start + wait > self.retry.max_elapsed_s:
                raise CoordinatorUnavailable(
                    f"{name}: the coordinator at {self.address} did not answer for "
                    f"{time.monotonic() - start:.0f} s ({code.name}: {details}); "
                    "check that it runs and that this machine can reach it "
                    "(`coderepair-worker doctor`)"
                ) from None
            self.stats.retries += 1
            log.info("%s: %s, retrying in %.2f s", name, code.name, wait)
            await self._sleep(wait)
            attempt += 1

    # ---------------------------------------------------------------- the RPCs

    async def register(
        self, display_name: str, client_version: str, capabilities: common_pb2.WorkerCapabilities
    ) -> worker_pb2.RegisterResponse:
        """Register this key (idempotent: the coordinator upserts) and learn the runs."""
        payload = worker_pb2.RegisterPayload(
            display_name=display_name, client_version=client_version, capabilities=capabilities
        )

        async def attempt(stub: Any, timeout: float) -> worker_pb2.RegisterResponse:
            sent = int(time.time() * 1000)
            answer: worker_pb2.RegisterResponse = await stub.Register(
                worker_pb2.RegisterRequest(envelope=self._envelope("Register", payload)),
                timeout=timeout,
            )
            # Half the round trip approximates when the server read its clock.
            local = (sent + int(time.time() * 1000)) // 2
            self.clock_offset_ms = int(answer.server_time_unix_ms) - local
            return answer

        try:
            return await self._call("Register", attempt)
        except CoordinatorRefusal as exc:
            if exc.reason != R.REJECTION_REASON_CLOCK_SKEW:
                raise
            raise CoordinatorRefusal(
                exc.code,
                exc.reason,
                f"{exc}; set this machine's clock (NTP, e.g. `timedatectl set-ntp true`)",
            ) from None

    async def heartbeat(
        self,
        *,
        activity: int,
        lease_ids: Sequence[str],
        run_id: str,
        policy_version: int,
        tokens_per_second: float,
    ) -> worker_pb2.HeartbeatResponse:
        """Say we are alive and which leases we hold; learn revoked leases and new versions."""
        payload = worker_pb2.HeartbeatPayload(
            activity=activity,  # type: ignore[arg-type]
            lease_ids=list(lease_ids)[:16],
            loaded_run_id=run_id,
            loaded_policy_version=policy_version,
            tokens_per_second=tokens_per_second,
        )

        async def attempt(stub: Any, timeout: float) -> worker_pb2.HeartbeatResponse:
            request = worker_pb2.HeartbeatRequest(envelope=self._envelope("Heartbeat", payload))
            answer: worker_pb2.HeartbeatResponse = await stub.Heartbeat(request, timeout=timeout)
            return answer

        return await self._call("Heartbeat", attempt)

    async def get_policy(
        self, run_id: str, *, have_version: int | None = None, version: int | None = None
    ) -> worker_pb2.GetPolicyResponse:
        """The chain of versions to apply to reach ``version`` (default: latest)."""
        request = worker_pb2.GetPolicyRequest(run_id=run_id)
        if have_version is not None:
            request.have_version = have_version
        if version is not None:
            request.version = version

        async def attempt(stub: Any, timeout: float) -> worker_pb2.GetPolicyResponse:
            answer: worker_pb2.GetPolicyResponse = await stub.GetPolicy(request, timeout=timeout)
            return answer

        return await self._call("GetPolicy", attempt)

    async def lease(
        self, run_id: str, max_tasks: int, loaded_version: int | None = None
    ) -> worker_pb2.LeaseTasksResponse:
        """Ask for work. Retried only on UNAVAILABLE: after a DEADLINE_EXCEEDED the lease
        may exist, and a second one would only hold tasks until its deadline."""
        payload = worker_pb2.LeasePayload(run_id=run_id, max_tasks=max_tasks)
        if loaded_version is not None:
            payload.loaded_policy_version = loaded_version

        async def attempt(stub: Any, timeout: float) -> worker_pb2.LeaseTasksResponse:
            request = worker_pb2.LeaseTasksRequest(envelope=self._envelope("LeaseTasks", payload))
            answer: worker_pb2.LeaseTasksResponse = await stub.LeaseTasks(request, timeout=timeout)
            return answer

        # Not on a deadline (a lease granted to a call that timed out would be held by no
        # one), but on CANCELLED: a stopping coordinator drops the grant it did not answer.
        return await self._call(
            "LeaseTasks",
            attempt,
            retry_codes=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}),
        )

    async def submit(self, payload: worker_pb2.SubmitPayload) -> worker_pb2.SubmitRolloutsResponse:
        """Submit a batch; retried (same idempotency key, fresh envelope) until answered.

        The answer may be a refusal in-band (``accepted`` false, ``rejection`` set): that
        is the coordinator's verdict on the batch and is returned, not raised.
        """

        async def attempt(stub: Any, timeout: float) -> worker_pb2.SubmitRolloutsResponse:
            request = worker_pb2.SubmitRolloutsRequest(
                envelope=self._envelope("SubmitRollouts", payload)
            )
            answer: worker_pb2.SubmitRolloutsResponse = await stub.SubmitRollouts(
                request, timeout=timeout
            )
            return answer

        return await self._call("SubmitRollouts", attempt)

    async def release(self, lease_id: str, reason: str) -> bool:
        """Give a lease's tasks back to the pool; True when it was still open."""
        payload = worker_pb2.ReleasePayload(lease_id=lease_id, reason=reason[:256])

        async def attempt(stub: Any, timeout: float) -> worker_pb2.ReleaseLeaseResponse:
            request = worker_pb2.ReleaseLeaseRequest(
                envelope=self._envelope("ReleaseLease", payload)
            )
            answer: worker_pb2.ReleaseLeaseResponse = await stub.ReleaseLease(
                request, timeout=timeout
            )
            return answer

        return bool((await self._call("ReleaseLease", attempt)).released)

    async def status(self, batch_ids: Sequence[str] = ()) -> worker_pb2.GetStatusResponse:
        """This key's counters (credit, streak) and the state of some of its batches."""
        request = worker_pb2.GetStatusRequest(
            worker_public_key=self.identity.public_key, batch_ids=list(batch_ids)
        )

        async def attempt(stub: Any, timeout: float) -> worker_pb2.GetStatusResponse:
            answer: worker_pb2.GetStatusResponse = await stub.GetStatus(request, timeout=timeout)
            return answer

        return await self._call("GetStatus", attempt)


def _refusal(name: str, exc: grpc.aio.AioRpcError) -> CoordinatorRefusal:
    code = exc.code()
    try:
        rejection = rpc.rejection_from_metadata(exc.trailing_metadata())
    except ProtocolError:
        rejection = None
    reason = rejection.reason if rejection is not None else R.REJECTION_REASON_UNSPECIFIED
    message = rejection.message if rejection is not None and rejection.message else exc.details()
    return CoordinatorRefusal(code, reason, f"{name} refused ({code.name}): {message}")
