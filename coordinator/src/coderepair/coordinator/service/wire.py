"""A view of `SubmitPayload` that keeps its token fields as the wire's bytes.

The coordinator ingests every token every worker generates. Parsed as `SubmitPayload`,
a 64-sample batch becomes about 40,000 Python ints and floats that validation, the
digests and the Parquet encoder each walk again; on this project's 2-core reference
machine that was a third of the time a submit held the GIL. `SubmitView` is the same
message read with another schema: `prompt_token_ids`, `completion_token_ids` and
`behaviour_logprobs` are declared `bytes`. proto3 packs repeated scalars into one
length-delimited record, the same wire type as `bytes`, so the view holds each field's
packed encoding as it arrived (little-endian float32 for logprobs, varints for ids), and
`decode_varints` turns the whole batch's ids into one numpy array at once.

The view is derived at import from the protocol's own descriptors, so it cannot drift
from `coderepair.v1`: every other field, number and type is the real one. What it reads
differently from the real parser, and why that is safe:

- A packed field a sender split into several records (legal, and written by no
  encoder in practice) is read as its last record; an unpacked one (also legal, never
  written for proto3) lands in unknown fields and reads as empty. Either way what the
  coordinator checks is what it stores and trains on, the signature covers the bytes
  as sent, and such a batch fails the checks against its lease (the prompt, one logprob
  per token) with a message that says so.
- Re-serialized (`SerializeToString(deterministic=True)`) a view gives the same bytes
  as the parsed `SubmitPayload` would: bytes and packed fields encode alike. The batch
  digest that answers retries is therefore unchanged.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from coderepair.v1 import common_pb2, worker_pb2

__all__ = [
    "PACKED_AS_BYTES",
    "SampleView",
    "SubmitView",
    "VarintError",
    "decode_varints",
    "encode_ids",
]

#: The RolloutSample fields the view reads as bytes.
PACKED_AS_BYTES: Final = ("prompt_token_ids", "completion_token_ids", "behaviour_logprobs")
_PACKAGE = "coderepair.coordinator.wireview"
_MAX_VARINT_BYTES = 5  # a uint32


def _view_types() -> tuple[Any, Any]:
    common = descriptor_pb2.FileDescriptorProto()
    common_pb2.DESCRIPTOR.CopyToProto(common)
    worker = descriptor_pb2.FileDescriptorProto()
    worker_pb2.DESCRIPTOR.CopyToProto(worker)
    view = descriptor_pb2.FileDescriptorProto(
        name="coderepair/coordinator/wireview.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=[common.name],
    )
    sample = view.message_type.add()
    sample.CopyFrom(next(m for m in common.message_type if m.name == "RolloutSample"))
    sample.name = "SampleView"
    found = set()
    for field in sample.field:
        if field.name in PACKED_AS_BYTES:
            found.add(field.name)
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            field.label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            field.ClearField("options")
        # Nested types (the reward_components map entry) move with the message.
        prefix = ".coderepair.v1.RolloutSample."
        if field.type_name.startswith(prefix):
            field.type_name = f".{_PACKAGE}.SampleView." + field.type_name[len(prefix) :]
    if found != set(PACKED_AS_BYTES):  # the protocol renamed a field: update the tuple
        raise RuntimeError(f"RolloutSample lacks {sorted(set(PACKED_AS_BYTES) - found)}")
    payload = view.message_type.add()
    payload.CopyFrom(next(m for m in worker.message_type if m.name == "SubmitPayload"))
    payload.name = "SubmitView"
    for field in payload.field:
        if field.type_name == ".coderepair.v1.RolloutSample":
            field.type_name = f".{_PACKAGE}.SampleView"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(common)
    pool.Add(view)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.SubmitView")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.SampleView")),
    )


SubmitView, SampleView = _view_types()
"""`SubmitPayload`, and its `RolloutSample`, with the token fields as packed bytes."""


class VarintError(ValueError):
    """Bytes that are not a sequence of whole uint32 varints."""


def decode_varints(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The uint32 varints in `data`, concatenated packed fields, in one pass.

    Returns (values as uint64, the index in `data` of each value's last byte); the second
    lets a caller count the values of each field it joined (`np.searchsorted`). Raises
    `VarintError` when the bytes end inside a varint or one is longer than a uint32's
    five bytes (protobuf allows ten for a uint32 and drops the high bits; no encoder
    writes those, and a token id never needs them).
    """
    raw = np.frombuffer(data, np.uint8)
    if raw.size == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    last = np.flatnonzero(raw < 0x80)
    if last.size == 0 or last[-1] != raw.size - 1:
        raise VarintError(f"the last varint of {raw.size} bytes is cut off")
    first = np.empty_like(last)
    first[0] = 0
    first[1:] = last[:-1] + 1
    lengths = last - first + 1
    longest = int(lengths.max())
    if longest > _MAX_VARINT_BYTES:
        raise VarintError(f"a varint of {longest} bytes: a uint32 takes at most 5")
    values = (raw[first] & 0x7F).astype(np.uint64)
    for k in range(1, longest):
        more = lengths > k
        part = (raw[first[more] + k] & 0x7F).astype(np.uint64)
        values[more] |= part << np.uint64(7 * k)
    return values, last


def encode_ids(ids: list[int]) -> bytes:
    """The packed encoding protobuf writes for `ids` as a repeated uint32 field."""
    sample = common_pb2.RolloutSample(prompt_token_ids=ids)
    view = SampleView.FromString(sample.SerializeToString())
    encoded: bytes = view.prompt_token_ids
    return encoded
