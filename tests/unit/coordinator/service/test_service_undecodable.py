"""`UndecodableRequestGuard`: request bytes that are no protobuf get INVALID_ARGUMENT.

Found by the red team (`tests/adversarial`): without the guard, grpc.aio answers such a
request UNKNOWN and logs an ERROR traceback per request. A loopback grpc.aio server
with one unary and one server-streaming method checks both shapes, and that well-formed
requests still reach the handler.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from coderepair.coordinator.service.gate import UndecodableRequestGuard
from coderepair.protocol import rpc
from coderepair.v1 import common_pb2, worker_pb2

_UNARY = "/test.Guard/Unary"
_STREAM = "/test.Guard/Stream"
_NOT_PROTOBUF = b"\xff\xff\xff\xff\x0f garbage"


async def _unary(request: worker_pb2.RegisterRequest, context: Any) -> worker_pb2.RegisterResponse:
    return worker_pb2.RegisterResponse(worker_id=request.envelope.hex()[:8])


async def _stream(
    request: worker_pb2.RegisterRequest, context: Any
) -> AsyncIterator[worker_pb2.RegisterResponse]:
    for i in range(2):
        yield worker_pb2.RegisterResponse(worker_id=str(i))


@pytest.fixture
async def address() -> AsyncIterator[str]:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            _unary,
            request_deserializer=worker_pb2.RegisterRequest.FromString,
            response_serializer=worker_pb2.RegisterResponse.SerializeToString,
        ),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _stream,
            request_deserializer=worker_pb2.RegisterRequest.FromString,
            response_serializer=worker_pb2.RegisterResponse.SerializeToString,
        ),
    }
    server = grpc.aio.server(interceptors=[UndecodableRequestGuard()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Guard", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.mark.timeout(30)
async def test_undecodable_bytes_are_refused_as_structural(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with grpc.aio.insecure_channel(address) as channel:
        for path, stream in ((_UNARY, False), (_STREAM, True)):
            call = (channel.unary_stream if stream else channel.unary_unary)(path)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if stream:
                    async for _ in call(_NOT_PROTOBUF, timeout=5):
                        pass
                else:
                    await call(_NOT_PROTOBUF, timeout=5)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, path
            rejection = rpc.rejection_from_metadata(caught.value.trailing_metadata())
            assert rejection is not None
            assert rejection.reason == common_pb2.REJECTION_REASON_STRUCTURAL
            assert "not a" in rejection.message
        good = worker_pb2.RegisterRequest(envelope=b"\x01\x02").SerializeToString()
        answer = worker_pb2.RegisterResponse.FromString(
            await channel.unary_unary(_UNARY)(good, timeout=5)
        )
        assert answer.worker_id == "0102"
        rows = [
            worker_pb2.RegisterResponse.FromString(r)
            async for r in channel.unary_stream(_STREAM)(good, timeout=5)
        ]
        assert [r.worker_id for r in rows] == ["0", "1"]
    assert not [r for r in caplog.records if "Unexpected" in r.getMessage()]
