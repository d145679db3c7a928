"""Fuzzing: every gRPC method of the contract gets malformed messages (hypothesis).

A real coordinator process (`redteam_support.CoordinatorProcess`, SQLite, no model
auditor) is fuzzed over loopback on each method of the three services with
(a) arbitrary request bytes, (b) request messages whose fields hold arbitrary values,
and (c) for signed methods, envelopes correctly signed by a registered key of the right
party around arbitrary payload messages. Every answer must be a deliberate one: OK or a
status that names the caller's mistake. UNKNOWN and INTERNAL mean a handler tripped
over its input (and the server logs a traceback per request) and fail the test. After
each method's run, the server still answers the health check and honest calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redteam_support import CoordinatorProcess, World, build_world

from coderepair.protocol import rpc
from coderepair.protocol.identity import Identity
from coderepair.v1 import admin_pb2, trainer_pb2, worker_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

_ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
}
_SERVICES = [
    (rpc.WORKER_SERVICE, worker_pb2),
    (rpc.TRAINER_SERVICE, trainer_pb2),
    (rpc.ADMIN_SERVICE, admin_pb2),
]
_METHODS = [
    (service, m)
    for service, module in _SERVICES
    for m in module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods
]
_F = _descriptor.FieldDescriptor


def _scalar(field: _descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == _F.TYPE_STRING:
        return st.text(max_size=80)
    if kind == _F.TYPE_BYTES:
        return st.binary(max_size=300)
    if kind == _F.TYPE_BOOL:
        return st.booleans()
    if kind in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if kind == _F.TYPE_ENUM:
        return st.integers(-3, 40)
    if kind in (_F.TYPE_UINT32, _F.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (_F.TYPE_UINT64, _F.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if kind in (_F.TYPE_INT32, _F.TYPE_SINT32, _F.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    return st.integers(-(2**63), 2**63 - 1)


@st.composite
def messages(draw: st.DrawFn, cls: type[_message.Message], depth: int = 0) -> _message.Message:
    """A message of ``cls`` with arbitrary values in some of its fields."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == 3
        if field.type == _F.TYPE_MESSAGE:
            if depth >= 2 or field.message_type.GetOptions().map_entry:
                continue
            sub = field.message_type._concrete_class
            if repeated:
                for item in draw(st.lists(messages(sub, depth + 1), max_size=3)):
                    getattr(msg, field.name).add().CopyFrom(item)
            else:
                getattr(msg, field.name).CopyFrom(draw(messages(sub, depth + 1)))
        elif repeated:
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=8)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, str, Identity]]:
    world = build_world(tmp_path_factory.mktemp("fuzz"), n_tasks=16)
    coordinator = CoordinatorProcess(world, "coordinator", model_audits=False)
    asyncio.run(coordinator.start())
    worker = Identity.create(world.root / "keys" / "fuzz-worker.pem")
    try:
        asyncio.run(coordinator.publish())
        with grpc.insecure_channel(coordinator.address) as channel:
            _unary(channel, f"/{rpc.WORKER_SERVICE}/Register")(
                worker_pb2.RegisterRequest(
                    envelope=_sign(
                        worker,
                        f"/{rpc.WORKER_SERVICE}/Register",
                        worker_pb2.RegisterPayload(display_name="fuzz", client_version="0.1.0"),
                    )
                ).SerializeToString(),
                timeout=10,
            )
        yield world, coordinator.address, worker
    finally:
        coordinator.stop()


def _unary(channel: grpc.Channel, path: str, stream: bool = False) -> Any:
    make = channel.unary_stream if stream else channel.unary_unary
    return make(path)


def _sign(identity: Identity, path: str, payload: _message.Message | bytes) -> bytes:
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    return identity.sign(rpc.SIGNED_RPCS[path].purpose, data).to_bytes()


def _call(channel: grpc.Channel, path: str, stream: bool, request: bytes) -> grpc.StatusCode:
    try:
        if stream:
            for _ in _unary(channel, path, True)(request, timeout=10):
                pass
        else:
            _unary(channel, path)(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _signer(world: World, worker: Identity, service: str) -> Identity:
    if service == rpc.TRAINER_SERVICE:
        return world.keys.trainer
    if service == rpc.ADMIN_SERVICE:
        return world.keys.admin
    return worker


@pytest.mark.parametrize(("service", "method"), _METHODS, ids=lambda m: getattr(m, "name", m))
def test_malformed_messages_get_deliberate_answers(
    served: tuple[World, str, Identity], service: str, method: _descriptor.MethodDescriptor
) -> None:
    world, address, worker = served
    path = f"/{service}/{method.name}"
    stream = method.server_streaming
    request_cls = method.input_type._concrete_class
    signed = rpc.SIGNED_RPCS.get(path)
    signer = _signer(world, worker, service)
    seen: dict[str, int] = {}
    options = rpc.channel_options()
    with grpc.insecure_channel(address, options=options) as channel:
        payloads: st.SearchStrategy[Any] = st.one_of(
            st.binary(max_size=2000).map(lambda b: ("raw bytes", b)),
            messages(request_cls).map(lambda m: ("random fields", m.SerializeToString())),
        )
        if signed is not None:
            payload_cls = signed.payload_type
            payloads = st.one_of(
                payloads,
                messages(payload_cls).map(
                    lambda p: (
                        "signed random payload",
                        request_cls(envelope=_sign(signer, path, p)).SerializeToString(),
                    )
                ),
                st.binary(max_size=500).map(
                    lambda b: (
                        "signed random bytes",
                        request_cls(envelope=_sign(signer, path, b)).SerializeToString(),
                    )
                ),
            )

        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(case=payloads)
        def fuzz(case: tuple[str, bytes]) -> None:
            what, request = case
            code = _call(channel, path, stream, request)
            seen[code.name] = seen.get(code.name, 0) + 1
            assert code in _ALLOWED, f"{path}: {what} {request[:80]!r} got {code.name}"

        fuzz()
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # An honest call still works after the garbage.
        lease = worker_pb2.LeasePayload(run_id="r1", max_tasks=1)
        path_lease = f"/{rpc.WORKER_SERVICE}/LeaseTasks"
        raw = _unary(channel, path_lease)(
            worker_pb2.LeaseTasksRequest(
                envelope=_sign(worker, path_lease, lease)
            ).SerializeToString(),
            timeout=10,
        )
        got = worker_pb2.LeaseTasksResponse.FromString(raw)
        if got.HasField("lease"):
            release = f"/{rpc.WORKER_SERVICE}/ReleaseLease"
            payload = worker_pb2.ReleasePayload(lease_id=got.lease.lease_id, reason="fuzz")
            _unary(channel, release)(
                worker_pb2.ReleaseLeaseRequest(
                    envelope=_sign(worker, release, payload)
                ).SerializeToString(),
                timeout=10,
            )
    assert sum(seen.values()) >= 10, seen


def test_get_stats_window_past_the_database_integers_is_refused(
    served: tuple[World, str, Identity],
) -> None:
    """Found by the fuzzer: a window of 2**64 - 1 ms made GetStats fail with INTERNAL
    (SQLite overflow); it is now a STRUCTURAL refusal, and a sane window still works."""
    world, address, _ = served
    path = f"/{rpc.ADMIN_SERVICE}/GetStats"
    with grpc.insecure_channel(address) as channel:
        for window, code in ((2**64 - 1, grpc.StatusCode.INVALID_ARGUMENT),
                             (60_000, grpc.StatusCode.OK)):  # fmt: skip
            payload = admin_pb2.GetStatsPayload(window_ms=window)
            request = admin_pb2.GetStatsRequest(envelope=_sign(world.keys.admin, path, payload))
            assert _call(channel, path, False, request.SerializeToString()) == code
