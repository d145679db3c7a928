"""Byte format of the peer shard protocol ``/coderepair/shard/1.0.0``.

One stream carries one request and its answer:

* request (asker → holder), exactly 41 bytes: the shard's SHA-256 digest (32 raw bytes),
  its size in bytes (unsigned 64-bit big-endian, at most 2**63 - 1, the manifest's
  bound) and a mode byte: 0 = send the shard, 1 = probe (only say whether you have it);
* answer (holder → asker): one status byte; for `Status.OK` to a fetch, the shard's
  length (unsigned 64-bit big-endian) followed by exactly that many bytes of the shard.

Probes exist because opening a stream costs py-libp2p a few hundred milliseconds on a
busy machine: an asker probes all its peers at once, then fetches from one holder, so
the time in which two workers can both find no copy and both go to the origin stays
short.

The asker knows hash and size from the trainer-signed manifest, so it reads at most the
size it asked for and checks the hash of what arrived; nothing a peer sends is trusted
before that check. This module only encodes and decodes; streams live in
`coderepair.worker.p2p`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum

from coderepair.protocol.errors import DecodeError

SHARD_PROTOCOL = "/coderepair/shard/1.0.0"
"""libp2p protocol id of the shard stream."""

DIGEST_BYTES = 32
REQUEST_BYTES = DIGEST_BYTES + 8 + 1
LENGTH_BYTES = 8
MAX_SIZE = 2**63 - 1  # same bound as the manifest's sizes (a signed 64-bit column)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_U64 = struct.Struct(">Q")


class PeerWireError(DecodeError):
    """Bytes received on the shard protocol do not follow its format."""


class Status(IntEnum):
    """First byte of an answer."""

    OK = 0
    """The shard follows (length, then bytes)."""
    NOT_FOUND = 1
    """The peer does not hold this shard and is not fetching it."""
    PENDING = 2
    """The peer is downloading this shard from the origin right now: ask again soon
    instead of downloading it from the origin too."""
    BUSY = 3
    """The peer holds the shard but all its upload slots are taken: ask another peer, or
    this one again soon."""


@dataclass(frozen=True)
class ShardRequest:
    """What an asker wants: the shard with this hash and size."""

    sha256: str
    """Lowercase hex SHA-256 of the shard."""
    size: int
    """Size in bytes, as the manifest lists it."""
    probe: bool = False
    """Only ask whether the peer has the shard (answer: status byte alone)."""

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _HEX64.fullmatch(self.sha256):
            raise ValueError(
                f"sha256 must be 64 lowercase hex characters, got {self.sha256!r}: pass the "
                "manifest's ShardInfo.sha256"
            )
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise ValueError(f"size must be an int, got {type(self.size).__name__}")
        if not 0 <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be in [0, 2**63 - 1], got {self.size}")
        if not isinstance(self.probe, bool):
            raise ValueError(f"probe must be a bool, got {type(self.probe).__name__}")

    def to_bytes(self) -> bytes:
        """The 41-byte request."""
        return bytes.fromhex(self.sha256) + _U64.pack(self.size) + bytes([int(self.probe)])

    @classmethod
    def from_bytes(cls, data: bytes) -> ShardRequest:
        """Decode a request; raise `PeerWireError` unless it is exactly 41 valid bytes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PeerWireError(f"a shard request must be bytes, got {type(data).__name__}")
        raw = bytes(data)
        if len(raw) != REQUEST_BYTES:
            raise PeerWireError(
                f"a shard request is {REQUEST_BYTES} bytes (sha256 digest, size, mode), got "
                f"{len(raw)}: the peer speaks another version of {SHARD_PROTOCOL}"
            )
        (size,) = _U64.unpack(raw[DIGEST_BYTES : DIGEST_BYTES + 8])
        if size > MAX_SIZE:
            raise PeerWireError(
                f"a shard request asks for {size} bytes, over the 2**63 - 1 bound of manifests"
            )
        mode = raw[-1]
        if mode > 1:
            raise PeerWireError(
                f"unknown request mode {mode} (0 = fetch, 1 = probe): the peer speaks another "
                f"version of {SHARD_PROTOCOL}"
            )
        return cls(sha256=raw[:DIGEST_BYTES].hex(), size=size, probe=mode == 1)


def encode_answer_header(
    status: Status, length: int | None = None, *, probe: bool = False
) -> bytes:
    """The bytes an answer starts with: the status, and the length for `Status.OK` to a
    fetch (an answer to a probe is the status alone)."""
    if status is Status.OK and not probe:
        if length is None or not 0 <= length <= MAX_SIZE:
            raise ValueError(f"an OK answer needs a length in [0, 2**63 - 1], got {length}")
        return bytes([status]) + _U64.pack(length)
    if length is not None:
        raise ValueError(f"only an OK answer to a fetch carries a length, not {status.name}")
    return bytes([status])


def decode_status(data: bytes) -> Status:
    """Decode an answer's first byte; raise `PeerWireError` on anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PeerWireError(f"an answer status must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) != 1:
        raise PeerWireError(f"an answer status is 1 byte, got {len(raw)}")
    try:
        return Status(raw[0])
    except ValueError:
        raise PeerWireError(
            f"unknown answer status {raw[0]}: the peer speaks another version of {SHARD_PROTOCOL}"
        ) from None


def decode_length(data: bytes) -> int:
    """Decode the 8-byte length after an OK status; raise `PeerWireError` if malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PeerWireError(f"an answer length must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) != LENGTH_BYTES:
        raise PeerWireError(f"an answer length is {LENGTH_BYTES} bytes, got {len(raw)}")
    (length,) = _U64.unpack(raw)
    if length > MAX_SIZE:
        raise PeerWireError(f"an answer announces {length} bytes, over the 2**63 - 1 bound")
    return length
