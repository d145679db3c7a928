"""The shard protocol's byte format: round trips, and a typed `PeerWireError` for every
malformed, random or truncated input."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.protocol.errors import DecodeError
from coderepair.worker.p2p_wire import (
    LENGTH_BYTES,
    MAX_SIZE,
    REQUEST_BYTES,
    PeerWireError,
    ShardRequest,
    Status,
    decode_length,
    decode_status,
    encode_answer_header,
)

DIGEST = hashlib.sha256(b"shard").hexdigest()


def test_request_round_trip_is_exactly_41_bytes() -> None:
    for probe in (False, True):
        request = ShardRequest(DIGEST, 123_456, probe=probe)
        raw = request.to_bytes()
        assert len(raw) == REQUEST_BYTES == 41
        assert raw[:32] == bytes.fromhex(DIGEST)
        assert raw[-1] == int(probe)
        assert ShardRequest.from_bytes(raw) == request


@given(st.binary(min_size=32, max_size=32), st.integers(0, MAX_SIZE), st.booleans())
@settings(max_examples=200, deadline=None)
def test_any_valid_request_round_trips(digest: bytes, size: int, probe: bool) -> None:
    request = ShardRequest(digest.hex(), size, probe)
    assert ShardRequest.from_bytes(request.to_bytes()) == request


@given(st.binary(max_size=100))
@settings(max_examples=200, deadline=None)
def test_random_request_bytes_decode_or_raise_a_typed_error(data: bytes) -> None:
    try:
        request = ShardRequest.from_bytes(data)
    except PeerWireError:
        assert len(data) != REQUEST_BYTES or data[32] >= 0x80 or data[-1] > 1
    else:
        assert request.to_bytes() == data


@given(st.binary(min_size=32, max_size=32), st.integers(0, MAX_SIZE), st.data())
@settings(max_examples=200, deadline=None)
def test_truncated_requests_are_refused(digest: bytes, size: int, data: st.DataObject) -> None:
    raw = ShardRequest(digest.hex(), size).to_bytes()
    cut = data.draw(st.integers(0, REQUEST_BYTES - 1))
    with pytest.raises(PeerWireError, match="41 bytes"):
        ShardRequest.from_bytes(raw[:cut])


def test_a_size_over_the_manifest_bound_is_refused() -> None:
    raw = bytes.fromhex(DIGEST) + (2**63).to_bytes(8, "big") + b"\x00"
    with pytest.raises(PeerWireError, match="2\\*\\*63"):
        ShardRequest.from_bytes(raw)


def test_an_unknown_mode_is_refused() -> None:
    raw = ShardRequest(DIGEST, 5).to_bytes()[:-1] + b"\x02"
    with pytest.raises(PeerWireError, match="unknown request mode 2"):
        ShardRequest.from_bytes(raw)


def test_request_decoders_reject_non_bytes_with_the_protocol_error() -> None:
    for decode in (ShardRequest.from_bytes, decode_status, decode_length):
        with pytest.raises(DecodeError):
            decode("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sha256", "size"),
    [
        ("AB" * 32, 1),
        ("ab" * 31, 1),
        ("zz" * 32, 1),
        (DIGEST, -1),
        (DIGEST, 2**63),
        (DIGEST, True),
    ],
)
def test_building_a_bad_request_is_a_value_error(sha256: str, size: int) -> None:
    with pytest.raises(ValueError):
        ShardRequest(sha256, size)


@pytest.mark.parametrize("status", list(Status))
def test_answer_headers_decode_back(status: Status) -> None:
    if status is Status.OK:
        header = encode_answer_header(status, 77)
        assert decode_status(header[:1]) is Status.OK
        assert decode_length(header[1:]) == 77
        assert len(header) == 1 + LENGTH_BYTES
    else:
        assert decode_status(encode_answer_header(status)) is status


def test_a_probe_answer_is_the_status_alone() -> None:
    assert encode_answer_header(Status.OK, probe=True) == b"\x00"


def test_answer_header_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="needs a length"):
        encode_answer_header(Status.OK)
    with pytest.raises(ValueError, match="only an OK answer to a fetch"):
        encode_answer_header(Status.NOT_FOUND, 5)


@given(st.binary(max_size=3))
@settings(max_examples=200, deadline=None)
def test_random_status_bytes_decode_or_raise_a_typed_error(data: bytes) -> None:
    try:
        status = decode_status(data)
    except PeerWireError:
        assert len(data) != 1 or data[0] not in {s.value for s in Status}
    else:
        assert bytes([status]) == data


@given(st.binary(max_size=12))
@settings(max_examples=200, deadline=None)
def test_random_length_bytes_decode_or_raise_a_typed_error(data: bytes) -> None:
    try:
        length = decode_length(data)
    except PeerWireError:
        assert len(data) != LENGTH_BYTES or data[0] >= 0x80
    else:
        assert length.to_bytes(LENGTH_BYTES, "big") == data
