"""Tests for coderepair.protocol.rpc and the wire-level robustness of coderepair.v1.

Parsing protobuf checks only the wire format: random bytes either parse (often as a
message made of unknown fields) or raise google.protobuf.message.DecodeError, and a
serialization cut at a field boundary parses as a shorter message. Neither is a silent
accept of bad work: signed payloads are covered byte-for-byte by the envelope
signature, and the coordinator's structural validation checks the content (lease ids,
counts against the lease, limits) before anything is stored.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message as pb_message
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.protocol import rpc
from coderepair.protocol.errors import DecodeError
from coderepair.protocol.identity import Identity
from coderepair.protocol.rpc import PayloadDecodeError
from coderepair.v1 import admin_pb2, common_pb2, trainer_pb2, worker_pb2

# The messages a coordinator or trainer parses from untrusted peers.
UNTRUSTED_MESSAGES: list[type[pb_message.Message]] = [
    worker_pb2.RegisterRequest,
    worker_pb2.RegisterPayload,
    worker_pb2.HeartbeatPayload,
    worker_pb2.GetPolicyRequest,
    worker_pb2.LeasePayload,
    worker_pb2.SubmitRolloutsRequest,
    worker_pb2.SubmitPayload,
    worker_pb2.GetStatusRequest,
    worker_pb2.ReleasePayload,
    worker_pb2.LeaseTasksResponse,
    worker_pb2.GetPolicyResponse,
    trainer_pb2.StreamPayload,
    trainer_pb2.AckPayload,
    trainer_pb2.PublishPayload,
    trainer_pb2.RolloutRow,
    admin_pb2.BanPayload,
    admin_pb2.ListAuditsPayload,
    common_pb2.Rejection,
]


def full_submit_payload() -> worker_pb2.SubmitPayload:
    """A SubmitPayload with every kind of field set (varints, packed, floats, maps, bytes)."""
    sample = common_pb2.RolloutSample(
        task_id="humaneval/12/mutant-3",
        sample_index=3,
        seed=2**63 + 5,
        prompt_token_ids=[1, 2, 3, 50_000],
        completion_token_ids=[7, 8, 9, 2],
        behaviour_logprobs=[-0.5, -1.25, -0.0, -3.0],
        completion_text="<think>é</think>\n```\nfix\n```",
        patch="<<<<<<< SEARCH\na < b\n=======\na <= b\n>>>>>>> REPLACE\n",
        reward=0.75,
        reward_components={"tests": 1.0, "format": -0.25},
        tests_passed=3,
        tests_total=4,
        test_log_sha256="ab" * 32,
        proof=bytes(range(256)) + b"\x00\x01",
        finish_reason=common_pb2.FINISH_REASON_STOP,
        timings=common_pb2.SampleTimings(generate_ms=1200, reward_ms=300, proof_ms=40),
    )
    return worker_pb2.SubmitPayload(
        lease_id="lease-1",
        idempotency_key="0123456789abcdef0123",
        policy_version=7,
        samples=[sample, sample],
    )


FULL_SUBMIT_BYTES = full_submit_payload().SerializeToString(deterministic=True)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=512), index=st.integers(0, len(UNTRUSTED_MESSAGES) - 1))
def test_random_bytes_parse_or_raise_decode_error(data: bytes, index: int) -> None:
    message_type = UNTRUSTED_MESSAGES[index]
    try:
        parsed = message_type.FromString(data)
    except pb_message.DecodeError:
        return
    assert isinstance(parsed, message_type)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(FULL_SUBMIT_BYTES) - 1))
def test_truncated_payload_parses_shorter_or_raises_typed_error(cut: int) -> None:
    truncated = FULL_SUBMIT_BYTES[:cut]
    try:
        parsed = rpc.decode_payload(truncated, worker_pb2.SubmitPayload)
    except PayloadDecodeError as exc:
        assert isinstance(exc, DecodeError)
        assert "coderepair.v1.SubmitPayload" in str(exc)
        return
    # A cut at a field boundary is a valid, shorter message: never the original one.
    assert parsed != full_submit_payload()


@settings(max_examples=200, deadline=None)
@given(
    cut=st.integers(0, len(FULL_SUBMIT_BYTES)),
    tail=st.binary(max_size=64),
    index=st.integers(0, len(UNTRUSTED_MESSAGES) - 1),
)
def test_decode_payload_raises_only_its_typed_error(cut: int, tail: bytes, index: int) -> None:
    """Real bytes spliced with random ones, parsed as any message type."""
    message_type = UNTRUSTED_MESSAGES[index]
    try:
        parsed = rpc.decode_payload(FULL_SUBMIT_BYTES[:cut] + tail, message_type)
    except PayloadDecodeError:
        return
    assert isinstance(parsed, message_type)


def test_a_cut_inside_a_field_is_a_decode_error() -> None:
    # Lease id "lease-1" is a length-delimited field: cutting inside it cannot parse.
    with pytest.raises(PayloadDecodeError, match=r"not a valid coderepair\.v1\.SubmitPayload"):
        rpc.decode_payload(FULL_SUBMIT_BYTES[:4], worker_pb2.SubmitPayload)


def test_invalid_utf8_in_a_string_field_is_a_decode_error() -> None:
    # Field 1 (lease_id), wire type 2, length 2, bytes that are not UTF-8.
    with pytest.raises(PayloadDecodeError):
        rpc.decode_payload(b"\x0a\x02\xff\xfe", worker_pb2.SubmitPayload)


def test_full_payload_round_trips_exactly() -> None:
    parsed = rpc.decode_payload(FULL_SUBMIT_BYTES, worker_pb2.SubmitPayload)
    assert parsed == full_submit_payload()
    assert parsed.SerializeToString(deterministic=True) == FULL_SUBMIT_BYTES


# ---------------------------------------------------------------- signed RPC table


def _all_methods() -> dict[str, pb_message.Message]:
    methods = {}
    for module in (worker_pb2, trainer_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods[f"/{service.full_name}/{method.name}"] = method
    return methods


def test_signed_rpcs_are_exactly_the_methods_whose_request_is_an_envelope() -> None:
    enveloped = set()
    for path, method in _all_methods().items():
        fields = method.input_type.fields_by_number  # type: ignore[attr-defined]
        if 1 in fields and fields[1].name == "envelope":
            assert len(fields) == 1, f"{path}: an envelope request must hold nothing else"
            enveloped.add(path)
    assert enveloped == set(rpc.SIGNED_RPCS)
    # Policies are public (the manifest signature is what counts) and status is read-only.
    unsigned = set(_all_methods()) - enveloped
    assert unsigned == {
        "/coderepair.v1.WorkerService/GetPolicy",
        "/coderepair.v1.WorkerService/GetStatus",
    }


def test_purposes_are_unique_and_accepted_by_identity() -> None:
    purposes = [signed.purpose for signed in rpc.SIGNED_RPCS.values()]
    assert len(set(purposes)) == len(purposes)
    identity = Identity.generate()
    for signed in rpc.SIGNED_RPCS.values():
        assert signed.purpose == f"coderepair.v1.{signed.method.rsplit('/', 1)[1]}"
        assert signed.payload_type.DESCRIPTOR.full_name.endswith("Payload")
        envelope = identity.sign(signed.purpose, signed.payload_type().SerializeToString())
        assert envelope.purpose == signed.purpose


def test_service_names_match_the_descriptors() -> None:
    assert rpc.WORKER_SERVICE == "coderepair.v1.WorkerService"
    assert rpc.TRAINER_SERVICE == "coderepair.v1.TrainerService"
    assert rpc.ADMIN_SERVICE == "coderepair.v1.AdminService"
    assert rpc.HEALTH_SERVICE == "grpc.health.v1.Health"


# ---------------------------------------------------------------- refusals


def test_every_rejection_reason_has_a_status_code() -> None:
    reasons = common_pb2.RejectionReason.values()
    assert set(rpc.STATUS_FOR_REASON) == set(reasons)
    assert rpc.STATUS_FOR_REASON[common_pb2.REJECTION_REASON_REPLAY] is (
        grpc.StatusCode.UNAUTHENTICATED
    )
    # OK would make a refusal look like success.
    assert grpc.StatusCode.OK not in rpc.STATUS_FOR_REASON.values()


def test_rejection_metadata_round_trips() -> None:
    rejection = common_pb2.Rejection(
        reason=common_pb2.REJECTION_REASON_LEASE_EXPIRED,
        message="lease lease-1 expired at 12:00: ask for a new lease",
        task_id="t1",
        sample_index=0,
    )
    metadata: list[tuple[str, str | bytes]] = [("other", "x"), *rpc.rejection_metadata(rejection)]
    assert rpc.rejection_from_metadata(metadata) == rejection
    assert rpc.rejection_from_metadata((("other", "x"),)) is None
    assert rpc.rejection_from_metadata(None) is None


@settings(max_examples=200, deadline=None)
@given(value=st.binary(max_size=128))
def test_rejection_metadata_garbage_is_a_typed_error(value: bytes) -> None:
    try:
        parsed = rpc.rejection_from_metadata(((rpc.REJECTION_METADATA_KEY, value),))
    except PayloadDecodeError:
        return
    assert isinstance(parsed, common_pb2.Rejection)


def test_rejection_metadata_as_text_is_a_typed_error() -> None:
    with pytest.raises(PayloadDecodeError, match="-bin"):
        rpc.rejection_from_metadata(((rpc.REJECTION_METADATA_KEY, "text"),))


def test_options_carry_the_message_size_limit() -> None:
    for options in (rpc.server_options(1234), rpc.channel_options(1234)):
        as_dict = dict(options)
        assert as_dict["grpc.max_receive_message_length"] == 1234
        assert as_dict["grpc.max_send_message_length"] == 1234
    assert dict(rpc.channel_options())["grpc.max_receive_message_length"] == (
        rpc.DEFAULT_MAX_MESSAGE_BYTES
    )
