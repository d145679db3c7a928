"""Names, limits and wiring shared by every party that speaks coderepair's gRPC contract.

The messages and services themselves are generated from ``protocol/proto/coderepair/v1``
into ``coderepair.v1`` (``make proto``). This module adds what protoc cannot express:

- the envelope purpose string of every signed RPC (domain separation: a signature made
  for one RPC never verifies for another) and the payload message it wraps;
- default message-size and keepalive options for servers and channels;
- how a refusal travels when it is not in-band: a gRPC status code chosen from the
  `RejectionReason` plus the `Rejection` message in binary trailing metadata;
- the standard gRPC health-checking and reflection services on a ``grpc.aio`` server.

Parsing a message (``FromString`` / `decode_payload`) checks only the wire format:
unknown fields are kept for forward compatibility and missing fields read as defaults.
Whether the content makes sense (ids exist, counts match the lease, limits hold) is
the coordinator's structural validation, which answers with a `Rejection`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, NoReturn, TypeVar

import grpc
from google.protobuf import message as _message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coderepair.protocol.errors import DecodeError
from coderepair.v1 import admin_pb2, common_pb2, trainer_pb2, worker_pb2

# ---------------------------------------------------------------- service names

WORKER_SERVICE: Final[str] = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
TRAINER_SERVICE: Final[str] = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
ADMIN_SERVICE: Final[str] = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
HEALTH_SERVICE: Final[str] = health.SERVICE_NAME
REFLECTION_SERVICE: Final[str] = reflection.SERVICE_NAME

#: The three services of the contract, in the order a coordinator registers them.
CONTRACT_SERVICES: Final[tuple[str, ...]] = (WORKER_SERVICE, TRAINER_SERVICE, ADMIN_SERVICE)

# ---------------------------------------------------------------- signed RPCs

# Envelope purposes. They are part of what is signed, so changing one is a protocol
# break: old signatures stop verifying.
REGISTER_PURPOSE: Final = "coderepair.v1.Register"
HEARTBEAT_PURPOSE: Final = "coderepair.v1.Heartbeat"
LEASE_TASKS_PURPOSE: Final = "coderepair.v1.LeaseTasks"
SUBMIT_ROLLOUTS_PURPOSE: Final = "coderepair.v1.SubmitRollouts"
RELEASE_LEASE_PURPOSE: Final = "coderepair.v1.ReleaseLease"
STREAM_ROLLOUTS_PURPOSE: Final = "coderepair.v1.StreamRollouts"
ACK_CURSOR_PURPOSE: Final = "coderepair.v1.AckCursor"
PUBLISH_POLICY_PURPOSE: Final = "coderepair.v1.PublishPolicy"
LIST_WORKERS_PURPOSE: Final = "coderepair.v1.ListWorkers"
BAN_WORKER_PURPOSE: Final = "coderepair.v1.BanWorker"
UNBAN_WORKER_PURPOSE: Final = "coderepair.v1.UnbanWorker"
LIST_RUNS_PURPOSE: Final = "coderepair.v1.ListRuns"
LIST_AUDITS_PURPOSE: Final = "coderepair.v1.ListAudits"
GET_STATS_PURPOSE: Final = "coderepair.v1.GetStats"


@dataclass(frozen=True)
class SignedRpc:
    """One RPC whose request is ``bytes envelope = 1`` around a signed payload."""

    #: Full gRPC method path, as an interceptor sees it: "/coderepair.v1.WorkerService/Register".
    method: str
    #: Envelope purpose the signature must carry.
    purpose: str
    #: Message type of the envelope's payload.
    payload_type: type[_message.Message]


def _signed(service: str, name: str, purpose: str, payload: type[_message.Message]) -> SignedRpc:
    return SignedRpc(method=f"/{service}/{name}", purpose=purpose, payload_type=payload)


#: Every signed RPC of the contract by method path (GetPolicy and GetStatus are unsigned).
SIGNED_RPCS: Final[Mapping[str, SignedRpc]] = MappingProxyType(
    {
        rpc.method: rpc
        for rpc in (
            _signed(WORKER_SERVICE, "Register", REGISTER_PURPOSE, worker_pb2.RegisterPayload),
            _signed(WORKER_SERVICE, "Heartbeat", HEARTBEAT_PURPOSE, worker_pb2.HeartbeatPayload),
            _signed(WORKER_SERVICE, "LeaseTasks", LEASE_TASKS_PURPOSE, worker_pb2.LeasePayload),
            _signed(
                WORKER_SERVICE, "SubmitRollouts", SUBMIT_ROLLOUTS_PURPOSE, worker_pb2.SubmitPayload
            ),
            _signed(
                WORKER_SERVICE, "ReleaseLease", RELEASE_LEASE_PURPOSE, worker_pb2.ReleasePayload
            ),
            _signed(
                TRAINER_SERVICE,
                "StreamRollouts",
                STREAM_ROLLOUTS_PURPOSE,
                trainer_pb2.StreamPayload,
            ),
            _signed(TRAINER_SERVICE, "AckCursor", ACK_CURSOR_PURPOSE, trainer_pb2.AckPayload),
            _signed(
                TRAINER_SERVICE, "PublishPolicy", PUBLISH_POLICY_PURPOSE, trainer_pb2.PublishPayload
            ),
            _signed(
                ADMIN_SERVICE, "ListWorkers", LIST_WORKERS_PURPOSE, admin_pb2.ListWorkersPayload
            ),
            _signed(ADMIN_SERVICE, "BanWorker", BAN_WORKER_PURPOSE, admin_pb2.BanPayload),
            _signed(ADMIN_SERVICE, "UnbanWorker", UNBAN_WORKER_PURPOSE, admin_pb2.UnbanPayload),
            _signed(ADMIN_SERVICE, "ListRuns", LIST_RUNS_PURPOSE, admin_pb2.ListRunsPayload),
            _signed(ADMIN_SERVICE, "ListAudits", LIST_AUDITS_PURPOSE, admin_pb2.ListAuditsPayload),
            _signed(ADMIN_SERVICE, "GetStats", GET_STATS_PURPOSE, admin_pb2.GetStatsPayload),
        )
    }
)

# ---------------------------------------------------------------- decoding

M = TypeVar("M", bound=_message.Message)


class PayloadDecodeError(DecodeError):
    """Bytes that should hold a protobuf message are not valid wire format for it."""


def decode_payload(data: bytes, message_type: type[M]) -> M:
    """Parse ``data`` as ``message_type``; raise PayloadDecodeError if it is not one.

    Only the wire format is checked (see the module docstring): an empty byte string
    is a valid, empty message, and semantic checks belong to the caller.
    """
    try:
        return message_type.FromString(data)
    except _message.DecodeError as exc:
        raise PayloadDecodeError(
            f"{len(data)} bytes are not a valid {message_type.DESCRIPTOR.full_name} "
            f"({exc}): the sender's stubs may not match coderepair.v1, or the bytes were "
            "truncated in transit; check that both sides run the same protocol version"
        ) from exc


# ---------------------------------------------------------------- sizes and options

#: Largest message either side sends or accepts by default. A submitted batch of 64
#: samples x 4,096 completion tokens is ~7 MiB (token ids, logprobs, text, 258-byte
#: proofs per 32 tokens); a lease with inline workspaces is smaller. 32 MiB leaves room
#: for larger groups while bounding the memory one request can pin.
DEFAULT_MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024

#: Client keepalive ping interval: long-lived streams (StreamRollouts, idle leases)
#: survive NATs and load balancers that drop silent connections.
DEFAULT_KEEPALIVE_MS: Final = 30_000


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options for ``grpc.aio.server(options=...)`` matching `channel_options`."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Accept the clients' keepalive pings instead of answering GOAWAY "too_many_pings".
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", DEFAULT_KEEPALIVE_MS // 2),
    ]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options for ``grpc.aio.insecure_channel`` / ``secure_channel`` used by every party."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", DEFAULT_KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


# ---------------------------------------------------------------- refusals

#: Binary trailing-metadata key that carries a serialized `Rejection` (the "-bin"
#: suffix makes gRPC transport the value as raw bytes).
REJECTION_METADATA_KEY: Final = "coderepair-rejection-bin"

_R = common_pb2.RejectionReason

#: gRPC status code for each reason when a refusal is not answered in-band.
STATUS_FOR_REASON: Final[Mapping[int, grpc.StatusCode]] = MappingProxyType(
    {
        _R.REJECTION_REASON_UNSPECIFIED: grpc.StatusCode.UNKNOWN,
        _R.REJECTION_REASON_STRUCTURAL: grpc.StatusCode.INVALID_ARGUMENT,
        _R.REJECTION_REASON_SIGNATURE: grpc.StatusCode.UNAUTHENTICATED,
        _R.REJECTION_REASON_REPLAY: grpc.StatusCode.UNAUTHENTICATED,
        _R.REJECTION_REASON_CLOCK_SKEW: grpc.StatusCode.UNAUTHENTICATED,
        _R.REJECTION_REASON_DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
        _R.REJECTION_REASON_AUDIT_PROOF: grpc.StatusCode.FAILED_PRECONDITION,
        _R.REJECTION_REASON_AUDIT_SAMPLING: grpc.StatusCode.FAILED_PRECONDITION,
        _R.REJECTION_REASON_AUDIT_REWARD: grpc.StatusCode.FAILED_PRECONDITION,
        _R.REJECTION_REASON_STALE_POLICY: grpc.StatusCode.FAILED_PRECONDITION,
        _R.REJECTION_REASON_LEASE_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
        _R.REJECTION_REASON_UNKNOWN_LEASE: grpc.StatusCode.NOT_FOUND,
        _R.REJECTION_REASON_NOT_LEASE_OWNER: grpc.StatusCode.PERMISSION_DENIED,
        _R.REJECTION_REASON_BANNED: grpc.StatusCode.PERMISSION_DENIED,
        _R.REJECTION_REASON_NOT_REGISTERED: grpc.StatusCode.FAILED_PRECONDITION,
        _R.REJECTION_REASON_NOT_AUTHORIZED: grpc.StatusCode.PERMISSION_DENIED,
        _R.REJECTION_REASON_RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        _R.REJECTION_REASON_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
        _R.REJECTION_REASON_CONFLICT: grpc.StatusCode.ABORTED,
        _R.REJECTION_REASON_INTERNAL: grpc.StatusCode.INTERNAL,
    }
)


def rejection_metadata(rejection: common_pb2.Rejection) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying ``rejection`` (for ``context.abort(..., trailing_metadata)``)."""
    return ((REJECTION_METADATA_KEY, rejection.SerializeToString(deterministic=True)),)


def rejection_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> common_pb2.Rejection | None:
    """The `Rejection` in a call's trailing metadata, or None when there is none.

    Raises PayloadDecodeError when the key is present but its value is not a
    `Rejection` (a peer speaking another protocol version, or a proxy mangling bytes).
    """
    for key, value in metadata or ():
        if key != REJECTION_METADATA_KEY:
            continue
        if isinstance(value, str):
            raise PayloadDecodeError(
                f"trailing metadata {REJECTION_METADATA_KEY!r} arrived as text, not bytes: "
                "the peer (or a proxy) does not honour gRPC's '-bin' metadata convention"
            )
        return decode_payload(value, common_pb2.Rejection)
    return None


async def abort_with_rejection(context: Any, rejection: common_pb2.Rejection) -> NoReturn:
    """End the current call on a ``grpc.aio.ServicerContext`` with ``rejection``.

    The status code comes from `STATUS_FOR_REASON`, the details are the rejection's
    message, and the full `Rejection` travels in the trailing metadata.
    """
    code = STATUS_FOR_REASON.get(rejection.reason, grpc.StatusCode.UNKNOWN)
    await context.abort(code, rejection.message, rejection_metadata(rejection))
    raise AssertionError("grpc.aio context.abort() returned instead of raising")


# ---------------------------------------------------------------- health and reflection


async def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str] = CONTRACT_SERVICES
) -> health.aio.HealthServicer:
    """Add gRPC health checking and server reflection to ``server`` (before it starts).

    Every name in ``service_names`` and the overall server ("") are marked SERVING.
    Reflection lists those services plus health and reflection themselves, so
    ``grpcurl`` and ``grpc_health_probe`` work against a coordinator out of the box.
    Returns the health servicer: call ``await servicer.enter_graceful_shutdown()``
    before stopping so that load balancers drain the server first.
    """
    names = tuple(service_names)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *names):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*names, HEALTH_SERVICE, REFLECTION_SERVICE), server)
    return servicer
