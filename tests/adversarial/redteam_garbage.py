"""Garbage and oversized payloads: requests no honest worker sends, as raw bytes.

`garbage_requests` takes one honest batch for a real lease and breaks it every way a
hostile or broken client could: bytes that are no protobuf, envelopes that do not
verify, requests past the message limit, fields out of range. Each is sent as the raw
``SubmitRolloutsRequest`` bytes; none may be stored, and the coordinator must keep
answering afterwards. The fuzz suite (`test_redteam_fuzz`) does the same at random.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator
from typing import Any

from coderepair.protocol import rpc
from coderepair.protocol.identity import Identity
from coderepair.v1 import common_pb2, worker_pb2

_SUBMIT = f"/{rpc.WORKER_SERVICE}/SubmitRollouts"


def _request(identity: Identity, payload: worker_pb2.SubmitPayload | bytes) -> bytes:
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    envelope = identity.sign(rpc.SIGNED_RPCS[_SUBMIT].purpose, data).to_bytes()
    return worker_pb2.SubmitRolloutsRequest(envelope=envelope).SerializeToString()


def _payload(lease: common_pb2.Lease, samples: list[Any]) -> worker_pb2.SubmitPayload:
    out = worker_pb2.SubmitPayload(
        lease_id=lease.lease_id,
        idempotency_key=uuid.uuid4().hex,
        policy_version=lease.policy_version,
    )
    for sample in samples:
        out.samples.add().CopyFrom(sample)
    return out


def _broken(lease: common_pb2.Lease, samples: list[Any], what: str) -> worker_pb2.SubmitPayload:
    payload = _payload(lease, samples)
    first = payload.samples[0]
    if what == "NaN reward":
        first.reward = math.nan
    elif what == "infinite logprob":
        first.behaviour_logprobs[0] = -math.inf
    elif what == "positive logprob":
        first.behaviour_logprobs[0] = 5.0
    elif what == "missing sample":
        del payload.samples[-1]
    elif what == "extra sample":
        payload.samples.add().CopyFrom(first)
    elif what == "sample index out of range":
        first.sample_index = 1 << 30
    elif what == "proof of the wrong size":
        first.proof = first.proof[:-1]
    elif what == "completion past max_new_tokens":
        first.completion_token_ids.extend([5] * 5000)
        first.behaviour_logprobs.extend([-1.0] * 5000)
    elif what == "2 MiB completion text":
        first.completion_text = "x" * (2 << 20)
    elif what == "reward outside the spec":
        first.reward = 1e9
        first.reward_components.clear()
        first.reward_components["pass"] = 1e9
    elif what == "10k reward components":
        for i in range(10_000):
            first.reward_components[f"c{i}"] = 0.0
    elif what == "unknown task":
        first.task_id = "t" * 4096
    elif what == "bad idempotency key":
        payload.idempotency_key = "../../etc/passwd"
    elif what == "lease id of 1 MiB":
        payload.lease_id = "L" * (1 << 20)
    elif what == "empty batch":
        del payload.samples[:]
    elif what == "future policy version":
        payload.policy_version = 1 << 40
    return payload


BROKEN = (
    "NaN reward",
    "infinite logprob",
    "positive logprob",
    "missing sample",
    "extra sample",
    "sample index out of range",
    "proof of the wrong size",
    "completion past max_new_tokens",
    "2 MiB completion text",
    "reward outside the spec",
    "10k reward components",
    "unknown task",
    "bad idempotency key",
    "lease id of 1 MiB",
    "empty batch",
    "future policy version",
)


def garbage_requests(
    identity: Identity, lease: common_pb2.Lease, samples: list[Any]
) -> Iterator[tuple[str, bytes]]:
    """(what, raw request bytes) pairs; none of them may be stored."""
    yield "random bytes", os.urandom(4096)
    yield "empty request", b""
    yield (
        "envelope of random bytes",
        worker_pb2.SubmitRolloutsRequest(envelope=os.urandom(512)).SerializeToString(),
    )
    yield "signed random payload", _request(identity, os.urandom(2048))
    good = _request(identity, _payload(lease, samples))
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0xFF  # one flipped bit inside the signed payload
    yield "tampered signed bytes", bytes(tampered)
    other = Identity.generate()
    yield "signed by an unregistered key", _request(other, _payload(lease, samples))
    yield (
        "wrong purpose",
        worker_pb2.SubmitRolloutsRequest(
            envelope=identity.sign(rpc.REGISTER_PURPOSE, b"\x00").to_bytes()
        ).SerializeToString(),
    )
    yield (
        "request past the message limit",
        _request(identity, b"\x00" * (rpc.DEFAULT_MAX_MESSAGE_BYTES + 4096)),
    )
    for what in BROKEN:
        yield what, _request(identity, _broken(lease, samples, what))
