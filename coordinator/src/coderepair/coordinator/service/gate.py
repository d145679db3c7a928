"""Refusals and the door every signed request passes: envelope, signature, clock, replay.

A handler raises `Refusal` (a `RejectionReason` plus a message saying what to do); the
`guarded` decorator turns it into a gRPC status chosen by `coderepair.protocol.rpc`
with the `Rejection` in the trailing metadata. Any other exception becomes INTERNAL
("nothing was written, retry"): every storage call is one transaction, so a failure
leaves no half-written state.

`EnvelopeGate.open` checks, cheapest first: the request's size, the envelope's wire
format, its purpose, clock skew and signature (`EnvelopeVerifier`, which also keeps an
in-process nonce cache), then the nonce in the database's `seen_nonces` table, which
coordinator replicas share and which survives a restart, and only then decodes the
payload. A gate made with `with_group_commit` records the nonce through a
`storage.batches.GroupCommitter` instead, which commits the nonces of concurrent
requests in one transaction (the request still waits for that commit).

`EnvelopeGate.open_deferred` is for a handler that writes anyway: it runs every check
but the database's nonce and hands back a `PendingNonce`, which the handler records in
the same operation as its own write (`remember_or_refuse`), so that write and nonce
commit together, or neither does. SubmitRollouts does this: one group-commit wait per
batch instead of two. A replay to the replica that saw the envelope is still refused
at the door by the in-process cache; one sent to another replica is refused when its
write finds the nonce taken, and nothing of it is stored.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc
from google.protobuf import message as _message

from coderepair.coordinator.storage import batches, repo
from coderepair.coordinator.storage.errors import (
    ConflictError,
    CursorBeyondHeadError,
    NotFoundError,
    StorageError,
    WorkerBannedError,
)
from coderepair.coordinator.storage.models import Worker, WorkerState
from coderepair.protocol import rpc
from coderepair.protocol.errors import DecodeError, ProtocolError, VerificationError
from coderepair.protocol.identity import (
    ClockSkew,
    Envelope,
    EnvelopeVerifier,
    ReplayedNonce,
    fingerprint,
)
from coderepair.v1 import common_pb2

__all__ = [
    "EnvelopeGate",
    "Refusal",
    "UndecodableRequestGuard",
    "guarded",
    "reason_name",
    "refusal_from",
]

log = logging.getLogger(__name__)
R = common_pb2.RejectionReason
_MAX_MESSAGE_CHARS = 1024


class Refusal(ProtocolError):
    """A request the coordinator refuses, with the reason the caller sees."""

    def __init__(
        self,
        reason: Any,
        message: str,
        *,
        task_id: str | None = None,
        sample_index: int | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.task_id = task_id
        self.sample_index = sample_index
        self.retry_after_ms = retry_after_ms

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Exceptions pickle as cls(*args); ours has keyword-only fields besides. A
        # refusal made in a batch-preparing helper process crosses back whole.
        return (
            _refusal,
            (self.reason, self.message, self.task_id, self.sample_index, self.retry_after_ms),
        )

    @property
    def reason_name(self) -> str:
        """The reason without its prefix, as stored in `batches.rejection_reason`."""
        return reason_name(self.reason)

    def to_proto(self) -> common_pb2.Rejection:
        rejection = common_pb2.Rejection(
            reason=self.reason, message=self.message[:_MAX_MESSAGE_CHARS]
        )
        if self.task_id is not None:
            rejection.task_id = self.task_id
        if self.sample_index is not None:
            rejection.sample_index = self.sample_index
        if self.retry_after_ms is not None:
            rejection.retry_after_ms = self.retry_after_ms
        return rejection


def _refusal(
    reason: Any,
    message: str,
    task_id: str | None,
    sample_index: int | None,
    retry_after_ms: int | None,
) -> Refusal:
    return Refusal(
        reason,
        message,
        task_id=task_id,
        sample_index=sample_index,
        retry_after_ms=retry_after_ms,
    )


def reason_name(reason: int) -> str:
    """ "STRUCTURAL" for REJECTION_REASON_STRUCTURAL, and so on."""
    return R.Name(reason).removeprefix("REJECTION_REASON_")


def reason_value(name: str) -> Any:
    """The enum value of a stored reason name; UNSPECIFIED for an unknown one."""
    try:
        return R.Value(f"REJECTION_REASON_{name}")
    except ValueError:
        return R.REJECTION_REASON_UNSPECIFIED


def refusal_from(exc: ProtocolError) -> Refusal:
    """The refusal a typed protocol or storage error stands for."""
    if isinstance(exc, Refusal):
        return exc
    message = str(exc)
    if isinstance(exc, ReplayedNonce):
        return Refusal(R.REJECTION_REASON_REPLAY, message)
    if isinstance(exc, ClockSkew):
        return Refusal(R.REJECTION_REASON_CLOCK_SKEW, message)
    if isinstance(exc, VerificationError):
        return Refusal(R.REJECTION_REASON_SIGNATURE, message)
    if isinstance(exc, DecodeError):
        return Refusal(R.REJECTION_REASON_STRUCTURAL, message)
    if isinstance(exc, WorkerBannedError):
        return Refusal(R.REJECTION_REASON_BANNED, message)
    if isinstance(exc, CursorBeyondHeadError):
        return Refusal(R.REJECTION_REASON_STRUCTURAL, message)
    if isinstance(exc, NotFoundError):
        return Refusal(R.REJECTION_REASON_STRUCTURAL, message)
    if isinstance(exc, ConflictError | StorageError):
        return Refusal(R.REJECTION_REASON_CONFLICT, message)
    return Refusal(R.REJECTION_REASON_STRUCTURAL, message)


_P = ParamSpec("_P")
_T = TypeVar("_T")
_S = TypeVar("_S")


def guarded(
    method: Callable[Concatenate[_S, Any, Any, _P], Awaitable[_T]],
) -> Callable[Concatenate[_S, Any, Any, _P], Awaitable[_T]]:
    """Wrap a unary handler ``(self, request, context)``: refusals and failures end the
    call with a status and a `Rejection` trailer instead of an unhandled exception."""

    @functools.wraps(method)
    async def wrapper(self: _S, request: Any, context: Any, *args: _P.args, **kw: _P.kwargs) -> _T:
        try:
            return await method(self, request, context, *args, **kw)
        except ProtocolError as exc:
            await rpc.abort_with_rejection(context, refusal_from(exc).to_proto())
        except Exception:
            # A bug or a database outage: log it with the traceback, tell the caller
            # that nothing was written (every storage call is one transaction).
            log.exception("internal error in %s", method.__qualname__)
            await rpc.abort_with_rejection(context, internal_error().to_proto())

    return wrapper


def internal_error() -> Refusal:
    return Refusal(
        R.REJECTION_REASON_INTERNAL,
        "the coordinator failed while handling the request; nothing was written: retry "
        "after a moment",
        retry_after_ms=1000,
    )


def check_size(request: _message.Message, limit: int) -> None:
    """Refuse a request larger than the configured limit (the server's own limit is
    twice it, so every request up to there gets a typed answer)."""
    size = request.ByteSize()
    if size > limit:
        raise Refusal(
            R.REJECTION_REASON_TOO_LARGE,
            f"request is {size} bytes, over this coordinator's {limit}-byte limit: send "
            "fewer samples per batch (or ask the operator to raise server.max_message_bytes)",
        )


M = TypeVar("M", bound=_message.Message)


@dataclass(frozen=True, slots=True)
class PendingNonce:
    """An envelope's (signer, nonce) that `open_deferred` checked but did not record."""

    signer: bytes
    nonce: bytes
    expires_ms: int
    now_ms: int

    def replay(self) -> Refusal:
        return Refusal(
            R.REJECTION_REASON_REPLAY,
            f"nonce {self.nonce.hex()} from {fingerprint(self.signer)} was already used: "
            "sign every request afresh (a retry re-signs the same payload)",
        )

    def remember_or_refuse(self, session: Any) -> None:
        """Record the nonce in the caller's transaction; `Refusal` (REPLAY) if taken."""
        fresh = batches.remember_nonce_in(
            session, self.signer, self.nonce, expires_ms=self.expires_ms, now_ms=self.now_ms
        )
        if not fresh:
            raise self.replay()


class EnvelopeGate:
    """Opens signed requests: returns (signer, payload) or raises `Refusal`."""

    def __init__(
        self,
        verifier: EnvelopeVerifier,
        call: Callable[..., Awaitable[Any]],
        now_ms: Callable[[], int],
        max_message_bytes: int,
    ) -> None:
        self._verifier = verifier
        self._call = call
        self._now_ms = now_ms
        self._limit = max_message_bytes
        self._committer: batches.GroupCommitter | None = None

    def with_group_commit(self, committer: batches.GroupCommitter) -> EnvelopeGate:
        """A gate like this one that records nonces through `committer`."""
        gate = EnvelopeGate(self._verifier, self._call, self._now_ms, self._limit)
        gate._committer = committer
        return gate

    async def _remember(self, signer: bytes, nonce: bytes, expires: int, now: int) -> bool:
        if self._committer is None:
            fresh: bool = await self._call(
                repo.remember_nonce, signer, nonce, expires_ms=expires, now_ms=now
            )
            return fresh
        future = self._committer.submit(
            lambda session: batches.remember_nonce_in(
                session, signer, nonce, expires_ms=expires, now_ms=now
            )
        )
        return await asyncio.wrap_future(future)

    async def open(self, request: _message.Message, method: str) -> tuple[bytes, Any]:
        """Check and decode a signed request, recording its nonce; (signer, payload)."""
        payload_type, payload, pending = self._verify(request, method)
        fresh = await self._remember(
            pending.signer, pending.nonce, pending.expires_ms, pending.now_ms
        )
        if not fresh:
            raise pending.replay()
        return pending.signer, _decode(payload, payload_type)

    def open_deferred(
        self, request: _message.Message, method: str, view: Any = None
    ) -> tuple[bytes, Any, bytes, PendingNonce]:
        """Like `open`, but the nonce is the caller's to record (module docstring):
        (signer, payload, the payload's signed bytes, the pending nonce).

        ``view``: a message type to parse the payload as instead of the method's own,
        one with the same fields read another way (`wire.SubmitView`).
        """
        payload_type, payload, pending = self._verify(request, method)
        return pending.signer, _decode(payload, view or payload_type), payload, pending

    def _verify(self, request: _message.Message, method: str) -> tuple[Any, bytes, PendingNonce]:
        """Size, envelope, purpose, clock, signature, in-process nonce cache."""
        signed = rpc.SIGNED_RPCS[method]
        check_size(request, self._limit)
        raw = request.envelope  # type: ignore[attr-defined]
        if not raw:
            raise Refusal(
                R.REJECTION_REASON_STRUCTURAL,
                f"{method} needs a signed envelope in field 1: sign the "
                f"{signed.payload_type.DESCRIPTOR.name} with "
                f"Identity.sign({signed.purpose!r}, ...)",
            )
        try:
            envelope = Envelope.from_bytes(raw)
            payload = self._verifier.verify(envelope, purpose=signed.purpose)
        except ProtocolError as exc:
            raise refusal_from(exc) from exc
        now = self._now_ms()
        expires = now + int(2 * self._verifier.max_clock_skew_s * 1000)
        return (
            signed.payload_type,
            payload,
            PendingNonce(envelope.signer, envelope.nonce, expires, now),
        )


def _decode(payload: bytes, payload_type: Any) -> Any:
    try:
        return rpc.decode_payload(payload, payload_type)
    except DecodeError as exc:
        raise refusal_from(exc) from exc


def require_active(worker: Worker) -> Worker:
    """Refuse a banned worker (ban reason and end included)."""
    if worker.state is WorkerState.BANNED:
        until = (
            f" until {worker.banned_until_unix_ms} (unix ms)"
            if worker.banned_until_unix_ms
            else " permanently"
        )
        raise Refusal(
            R.REJECTION_REASON_BANNED,
            f"key {worker.worker_id} is banned{until}: {worker.ban_reason or 'no reason given'}",
        )
    return worker


def not_registered(worker_id: str) -> Refusal:
    return Refusal(
        R.REJECTION_REASON_NOT_REGISTERED,
        f"key {worker_id} is not registered at this coordinator: call Register first",
    )


class _Undecodable:
    """Marks a request whose bytes did not decode (see `UndecodableRequestGuard`)."""


_UNDECODABLE = _Undecodable()


class UndecodableRequestGuard(grpc.aio.ServerInterceptor):
    """Request bytes that are no protobuf of the method's type are refused with
    INVALID_ARGUMENT and a STRUCTURAL `Rejection`, like every other malformed request.

    Without it, gRPC answers UNKNOWN and logs an ERROR traceback per request, so any
    client could fill the coordinator's log with garbage at line rate.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        method = str(handler_call_details.method)[:128]

        def tolerant(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception:  # protobuf's DecodeError, and whatever a parser raises
                return _UNDECODABLE

        async def refuse(context: Any) -> None:
            refusal = Refusal(
                R.REJECTION_REASON_STRUCTURAL,
                f"the request bytes are not a {method} request message: send the "
                "serialized request of the contract",
            )
            await rpc.abort_with_rejection(context, refusal.to_proto())

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def guarded_unary(request: Any, context: Any) -> Any:
                if request is _UNDECODABLE:
                    await refuse(context)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                guarded_unary,
                request_deserializer=tolerant,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            stream = handler.unary_stream

            async def guarded_stream(request: Any, context: Any) -> Any:
                if request is _UNDECODABLE:
                    await refuse(context)
                async for item in stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                guarded_stream,
                request_deserializer=tolerant,
                response_serializer=handler.response_serializer,
            )
        return handler


async def abort_unimplemented(context: grpc.aio.ServicerContext, what: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, what)
