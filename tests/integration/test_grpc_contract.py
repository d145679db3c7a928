"""The gRPC contract over a real grpc.aio server on loopback.

The servicers here are tiny in-test implementations of a few methods (the real
coordinator is its own package); they use the real signed envelopes
(coderepair.protocol.identity), the real payload decoding and refusal helpers of
coderepair.protocol.rpc, and the standard health and reflection services. What is
checked is the wire contract: that messages round-trip through gRPC unchanged, that
refusals reach the client as a status code plus a typed `Rejection`, and that the
standard services answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coderepair.protocol import rpc
from coderepair.protocol.errors import DecodeError, ProtocolError, VerificationError
from coderepair.protocol.identity import (
    ClockSkew,
    Envelope,
    EnvelopeVerifier,
    Identity,
    ReplayedNonce,
    fingerprint,
)
from coderepair.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    trainer_pb2,
    trainer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

# Small enough that the oversize test is cheap, large enough for every round trip here.
TEST_MAX_MESSAGE_BYTES = 256 * 1024


def _reason_for(exc: ProtocolError) -> common_pb2.RejectionReason:
    if isinstance(exc, ReplayedNonce):
        return common_pb2.REJECTION_REASON_REPLAY
    if isinstance(exc, ClockSkew):
        return common_pb2.REJECTION_REASON_CLOCK_SKEW
    if isinstance(exc, VerificationError):
        return common_pb2.REJECTION_REASON_SIGNATURE
    return common_pb2.REJECTION_REASON_STRUCTURAL


class _Verifier:
    """Envelope checks shared by the in-test servicers: bytes -> (signer, payload)."""

    def __init__(self) -> None:
        self._verifier = EnvelopeVerifier(max_clock_skew_s=30.0)

    async def open(self, envelope_bytes: bytes, method: str, context: Any) -> tuple[bytes, Any]:
        signed = rpc.SIGNED_RPCS[method]
        try:
            envelope = Envelope.from_bytes(envelope_bytes)
            payload = self._verifier.verify(envelope, purpose=signed.purpose)
            return envelope.signer, rpc.decode_payload(payload, signed.payload_type)
        except (DecodeError, VerificationError) as exc:
            rejection = common_pb2.Rejection(reason=_reason_for(exc), message=str(exc))
            await rpc.abort_with_rejection(context, rejection)


class TinyWorkerService(worker_pb2_grpc.WorkerServiceServicer):
    """Register, GetPolicy and SubmitRollouts, the way the coordinator answers them."""

    def __init__(self, verifier: _Verifier) -> None:
        self._verifier = verifier
        self._batches: dict[tuple[bytes, str], worker_pb2.SubmitRolloutsResponse] = {}

    async def Register(
        self, request: worker_pb2.RegisterRequest, context: Any
    ) -> worker_pb2.RegisterResponse:
        signer, payload = await self._verifier.open(
            request.envelope, "/coderepair.v1.WorkerService/Register", context
        )
        assert isinstance(payload, worker_pb2.RegisterPayload)
        return worker_pb2.RegisterResponse(
            worker_id=fingerprint(signer),
            state=common_pb2.WORKER_STATE_ACTIVE,
            heartbeat_interval_ms=10_000,
            runs=[
                common_pb2.RunSummary(
                    run_id="run-a", group_size=payload.capabilities.max_concurrent_samples
                )
            ],
        )

    async def GetPolicy(
        self, request: worker_pb2.GetPolicyRequest, context: Any
    ) -> worker_pb2.GetPolicyResponse:
        if not request.HasField("version"):
            await rpc.abort_with_rejection(
                context,
                common_pb2.Rejection(
                    reason=common_pb2.REJECTION_REASON_STRUCTURAL,
                    message="this test server needs an explicit version",
                ),
            )
        first = request.have_version + 1 if request.HasField("have_version") else 1
        return worker_pb2.GetPolicyResponse(
            chain=[
                common_pb2.PolicyInfo(run_id=request.run_id, version=v)
                for v in range(first, request.version + 1)
            ]
        )

    async def SubmitRollouts(
        self, request: worker_pb2.SubmitRolloutsRequest, context: Any
    ) -> worker_pb2.SubmitRolloutsResponse:
        signer, payload = await self._verifier.open(
            request.envelope, "/coderepair.v1.WorkerService/SubmitRollouts", context
        )
        assert isinstance(payload, worker_pb2.SubmitPayload)
        known = self._batches.get((signer, payload.idempotency_key))
        if known is not None:
            replay = worker_pb2.SubmitRolloutsResponse()
            replay.CopyFrom(known)
            replay.replayed_response = True
            return replay
        if not payload.samples:
            return worker_pb2.SubmitRolloutsResponse(
                accepted=False,
                rejection=common_pb2.Rejection(
                    reason=common_pb2.REJECTION_REASON_STRUCTURAL,
                    message="the batch holds no samples: submit group_size samples per task",
                ),
            )
        # The batch id is a digest of what the server decoded: the client recomputes it
        # from what it sent, so equality proves the round trip changed nothing.
        digest = hashlib.sha256(payload.SerializeToString(deterministic=True)).hexdigest()
        response = worker_pb2.SubmitRolloutsResponse(
            accepted=True, batch_id=digest, audit_pending=True
        )
        self._batches[(signer, payload.idempotency_key)] = response
        return response


class TinyTrainerService(trainer_pb2_grpc.TrainerServiceServicer):
    """StreamRollouts: three rows after the requested cursor."""

    def __init__(self, verifier: _Verifier) -> None:
        self._verifier = verifier

    async def StreamRollouts(
        self, request: trainer_pb2.StreamRolloutsRequest, context: Any
    ) -> AsyncIterator[trainer_pb2.RolloutRow]:
        _, payload = await self._verifier.open(
            request.envelope, "/coderepair.v1.TrainerService/StreamRollouts", context
        )
        assert isinstance(payload, trainer_pb2.StreamPayload)
        for offset in range(1, 4):
            yield trainer_pb2.RolloutRow(
                cursor=payload.after_cursor + offset,
                run_id=payload.run_id,
                group_size=3,
                policy_version=max(payload.min_policy_version, 2),
                sample=sample(index=offset - 1),
            )


def sample(index: int = 0) -> common_pb2.RolloutSample:
    return common_pb2.RolloutSample(
        task_id="humaneval/0/mutant-1",
        sample_index=index,
        seed=2**64 - 1,
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=[4, 5, 6, 2],
        behaviour_logprobs=[-0.125, -2.5, -0.0, -1e-7],
        completion_text="<think>ü</think>",
        reward=-1.0,
        reward_components={"format": -1.0},
        proof=b"\x00\xff" * 129,
        finish_reason=common_pb2.FINISH_REASON_LENGTH,
    )


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(options=rpc.server_options(TEST_MAX_MESSAGE_BYTES))
    verifier = _Verifier()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(TinyWorkerService(verifier), server)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TinyTrainerService(verifier), server)
    # The admin service is registered unimplemented: its methods answer UNIMPLEMENTED.
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin_pb2_grpc.AdminServiceServicer(), server)
    health_servicer = await rpc.add_health_and_reflection(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=rpc.channel_options()
    ) as chan:
        yield chan
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=None)


async def test_health_answers_serving_for_the_server_and_each_service(
    channel: grpc.aio.Channel,
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", *rpc.CONTRACT_SERVICES):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def _reflect(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([request]))
    responses = [response async for response in call]
    assert len(responses) == 1
    return responses[0]


async def test_reflection_lists_the_three_services_and_serves_their_files(
    channel: grpc.aio.Channel,
) -> None:
    listed = await _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {service.name for service in listed.list_services_response.service}
    assert set(rpc.CONTRACT_SERVICES) <= names
    assert {rpc.HEALTH_SERVICE, rpc.REFLECTION_SERVICE} <= names

    files = await _reflect(
        channel,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=rpc.WORKER_SERVICE),
    )
    assert files.file_descriptor_response.file_descriptor_proto, "no descriptor for the service"


async def test_register_round_trips_a_signed_payload(channel: grpc.aio.Channel) -> None:
    identity = Identity.generate()
    payload = worker_pb2.RegisterPayload(
        display_name="volunteer",
        client_version="0.1.0",
        capabilities=common_pb2.WorkerCapabilities(engine="hf", max_concurrent_samples=8),
    )
    envelope = identity.sign(rpc.REGISTER_PURPOSE, payload.SerializeToString())
    response = await worker_pb2_grpc.WorkerServiceStub(channel).Register(
        worker_pb2.RegisterRequest(envelope=envelope.to_bytes())
    )
    assert response.worker_id == fingerprint(identity.public_key)
    assert response.state == common_pb2.WORKER_STATE_ACTIVE
    assert [run.group_size for run in response.runs] == [8]


@pytest.mark.parametrize(
    ("make_envelope", "code", "reason"),
    [
        (
            lambda ident: ident.sign(rpc.HEARTBEAT_PURPOSE, b"").to_bytes(),
            grpc.StatusCode.UNAUTHENTICATED,
            common_pb2.REJECTION_REASON_SIGNATURE,
        ),
        (
            lambda ident: ident.sign(rpc.REGISTER_PURPOSE, b"", now_ms=1).to_bytes(),
            grpc.StatusCode.UNAUTHENTICATED,
            common_pb2.REJECTION_REASON_CLOCK_SKEW,
        ),
        (
            lambda ident: ident.sign(rpc.REGISTER_PURPOSE, b"\x0a\x05ab").to_bytes(),
            grpc.StatusCode.INVALID_ARGUMENT,
            common_pb2.REJECTION_REASON_STRUCTURAL,
        ),
        (
            lambda ident: b"not an envelope",
            grpc.StatusCode.INVALID_ARGUMENT,
            common_pb2.REJECTION_REASON_STRUCTURAL,
        ),
    ],
    ids=["wrong-purpose", "clock-skew", "truncated-payload", "garbage-envelope"],
)
async def test_refusals_arrive_as_status_and_typed_rejection(
    channel: grpc.aio.Channel, make_envelope: Any, code: grpc.StatusCode, reason: int
) -> None:
    request = worker_pb2.RegisterRequest(envelope=make_envelope(Identity.generate()))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await worker_pb2_grpc.WorkerServiceStub(channel).Register(request)
    assert err.value.code() == code
    rejection = rpc.rejection_from_metadata(err.value.trailing_metadata())
    assert rejection is not None
    assert rejection.reason == reason
    assert rejection.message == err.value.details()


async def test_a_replayed_envelope_is_refused(channel: grpc.aio.Channel) -> None:
    envelope = Identity.generate().sign(rpc.REGISTER_PURPOSE, b"").to_bytes()
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    await stub.Register(worker_pb2.RegisterRequest(envelope=envelope))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Register(worker_pb2.RegisterRequest(envelope=envelope))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    rejection = rpc.rejection_from_metadata(err.value.trailing_metadata())
    assert rejection is not None and rejection.reason == common_pb2.REJECTION_REASON_REPLAY


async def test_submit_round_trips_samples_and_is_idempotent(channel: grpc.aio.Channel) -> None:
    identity = Identity.generate()
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    payload = worker_pb2.SubmitPayload(
        lease_id="lease-1",
        idempotency_key="key-0123456789abcdef",
        policy_version=3,
        samples=[sample(0), sample(1)],
    )
    payload_bytes = payload.SerializeToString(deterministic=True)

    async def submit() -> worker_pb2.SubmitRolloutsResponse:
        # A retry re-signs the same payload: new nonce, same idempotency key.
        envelope = identity.sign(rpc.SUBMIT_ROLLOUTS_PURPOSE, payload_bytes)
        request = worker_pb2.SubmitRolloutsRequest(envelope=envelope.to_bytes())
        response: worker_pb2.SubmitRolloutsResponse = await stub.SubmitRollouts(request)
        return response

    first = await submit()
    assert first.accepted and first.audit_pending and not first.replayed_response
    assert first.batch_id == hashlib.sha256(payload_bytes).hexdigest()
    assert not first.HasField("rejection")

    retry = await submit()
    assert retry.replayed_response
    assert retry.batch_id == first.batch_id


async def test_an_invalid_batch_is_refused_in_band(channel: grpc.aio.Channel) -> None:
    payload = worker_pb2.SubmitPayload(lease_id="lease-1", idempotency_key="empty-batch-0001")
    envelope = Identity.generate().sign(rpc.SUBMIT_ROLLOUTS_PURPOSE, payload.SerializeToString())
    response = await worker_pb2_grpc.WorkerServiceStub(channel).SubmitRollouts(
        worker_pb2.SubmitRolloutsRequest(envelope=envelope.to_bytes())
    )
    assert not response.accepted
    assert response.rejection.reason == common_pb2.REJECTION_REASON_STRUCTURAL
    assert "group_size" in response.rejection.message


async def test_get_policy_optional_fields_keep_their_presence(channel: grpc.aio.Channel) -> None:
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    full = await stub.GetPolicy(worker_pb2.GetPolicyRequest(run_id="run-a", version=3))
    assert [info.version for info in full.chain] == [1, 2, 3]
    # have_version = 0 is a value, not "absent": presence survives the wire.
    delta = await stub.GetPolicy(
        worker_pb2.GetPolicyRequest(run_id="run-a", version=3, have_version=2)
    )
    assert [info.version for info in delta.chain] == [3]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetPolicy(worker_pb2.GetPolicyRequest(run_id="run-a"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stream_rollouts_from_a_cursor(channel: grpc.aio.Channel) -> None:
    payload = trainer_pb2.StreamPayload(run_id="run-a", after_cursor=41, follow=False)
    envelope = Identity.generate().sign(rpc.STREAM_ROLLOUTS_PURPOSE, payload.SerializeToString())
    call = trainer_pb2_grpc.TrainerServiceStub(channel).StreamRollouts(
        trainer_pb2.StreamRolloutsRequest(envelope=envelope.to_bytes())
    )
    rows = [row async for row in call]
    assert [row.cursor for row in rows] == [42, 43, 44]
    assert [row.sample for row in rows] == [sample(0), sample(1), sample(2)]
    assert rows[0].sample.behaviour_logprobs[3] == pytest.approx(-1e-7, rel=1e-6)


async def test_unimplemented_admin_methods_say_so(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin_pb2_grpc.AdminServiceStub(channel).GetStats(admin_pb2.GetStatsRequest())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_oversized_requests_are_refused_by_the_transport(
    channel: grpc.aio.Channel,
) -> None:
    request = worker_pb2.SubmitRolloutsRequest(envelope=b"\x00" * (TEST_MAX_MESSAGE_BYTES + 1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await worker_pb2_grpc.WorkerServiceStub(channel).SubmitRollouts(request)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
