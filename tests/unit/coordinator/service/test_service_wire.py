"""The wire view of SubmitPayload and the batch varint decoder, against protobuf's own
parser and encoder."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.internal import decoder, encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.coordinator.service.wire import (
    SampleView,
    SubmitView,
    VarintError,
    decode_varints,
    encode_ids,
)
from coderepair.v1 import common_pb2, worker_pb2

_U32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
_F32 = st.floats(width=32, allow_nan=False)


def _varint(value: int) -> bytes:
    out: list[bytes] = []
    encoder._VarintEncoder()(out.append, value, True)
    return b"".join(out)


def _reference(data: bytes) -> list[int]:
    """protobuf's pure-Python varint reader, one value at a time."""
    values, pos = [], 0
    while pos < len(data):
        value, pos = decoder._DecodeVarint(data, pos)
        values.append(value)
    return values


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_U32, max_size=40), max_size=6))
def test_joined_fields_decode_to_their_ids_and_counts(fields: list[list[int]]) -> None:
    blobs = [encode_ids(ids) for ids in fields]
    values, last = decode_varints(b"".join(blobs))
    assert values.tolist() == [v for ids in fields for v in ids]
    # The last-byte index splits the values back into their fields.
    ends = np.cumsum([0, *map(len, blobs)])
    assert np.diff(np.searchsorted(last, ends)).tolist() == [len(ids) for ids in fields]


def _varint_lengths(data: bytes) -> tuple[list[int], bool]:
    """The byte length of each varint in `data`, and whether the last one is cut off."""
    lengths, run = [], 0
    for byte in data:
        run += 1
        if byte < 0x80:
            lengths.append(run)
            run = 0
    return lengths, run > 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_as_protobuf_reads_them_or_raise_varint_error(data: bytes) -> None:
    lengths, cut_off = _varint_lengths(data)
    if cut_off or any(n > 5 for n in lengths):
        with pytest.raises(VarintError):
            decode_varints(data)
        return
    values, last = decode_varints(data)
    assert values.tolist() == _reference(data)
    assert last.tolist() == (np.cumsum(lengths) - 1).tolist()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x80", "cut off"),
        (b"\x01\xff", "cut off"),
        (b"\x80\x80\x80\x80\x80\x01", "6 bytes"),
    ],
)
def test_bad_varints_are_refused_with_the_reason(data: bytes, match: str) -> None:
    with pytest.raises(VarintError, match=match):
        decode_varints(data)


def test_longer_than_needed_varints_decode_to_their_value() -> None:
    # protobuf accepts them; so does the decoder (the prompt check relies on it).
    values, _ = decode_varints(b"\x85\x80\x00\x07")
    assert values.tolist() == [5, 7]


_SAMPLES = st.builds(
    common_pb2.RolloutSample,
    task_id=st.text(max_size=8),
    sample_index=_U32,
    seed=st.integers(min_value=0, max_value=(1 << 64) - 1),
    prompt_token_ids=st.lists(_U32, max_size=20),
    completion_token_ids=st.lists(_U32, max_size=20),
    behaviour_logprobs=st.lists(_F32, max_size=20),
    completion_text=st.text(max_size=20),
    reward=st.floats(allow_nan=False),
    reward_components=st.dictionaries(st.text(max_size=4), st.floats(allow_nan=False), max_size=3),
    proof=st.binary(max_size=30),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_SAMPLES, max_size=4), st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_the_view_reads_what_protobuf_reads(samples: list[object], version: int) -> None:
    payload = worker_pb2.SubmitPayload(
        lease_id="L", idempotency_key="k" * 16, policy_version=version, samples=samples
    )
    view = SubmitView.FromString(payload.SerializeToString())
    # The batch digest (a hash of the deterministic serialization) does not change.
    assert view.SerializeToString(deterministic=True) == payload.SerializeToString(
        deterministic=True
    )
    assert (view.lease_id, view.policy_version) == (payload.lease_id, payload.policy_version)
    for seen, sample in zip(view.samples, payload.samples, strict=True):
        assert decode_varints(seen.prompt_token_ids)[0].tolist() == list(sample.prompt_token_ids)
        assert seen.prompt_token_ids == encode_ids(list(sample.prompt_token_ids))
        assert decode_varints(seen.completion_token_ids)[0].tolist() == list(
            sample.completion_token_ids
        )
        logprobs = np.frombuffer(seen.behaviour_logprobs, "<f4").tolist()
        assert logprobs == list(sample.behaviour_logprobs)
        assert dict(seen.reward_components) == dict(sample.reward_components)
        assert (seen.seed, seen.proof, seen.reward) == (sample.seed, sample.proof, sample.reward)


def test_every_other_field_keeps_its_number_and_type() -> None:
    real = common_pb2.RolloutSample.DESCRIPTOR
    for field in SampleView.DESCRIPTOR.fields:
        twin = real.fields_by_name[field.name]
        assert field.number == twin.number
        if field.name.endswith(("token_ids", "logprobs")):
            assert field.type == field.TYPE_BYTES
        else:
            assert (field.type, field.is_repeated) == (twin.type, twin.is_repeated)
    assert len(SampleView.DESCRIPTOR.fields) == len(real.fields)
    assert [f.name for f in SubmitView.DESCRIPTOR.fields] == [
        f.name for f in worker_pb2.SubmitPayload.DESCRIPTOR.fields
    ]
