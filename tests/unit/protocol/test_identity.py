"""Tests for coderepair.protocol.identity: key files, envelopes, verification."""

from __future__ import annotations

import dataclasses
import os
import pickle
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.protocol.errors import DecodeError, ProtocolError, VerificationError
from coderepair.protocol.identity import (
    ENVELOPE_MAGIC,
    MAX_PAYLOAD_BYTES,
    BadSignature,
    ClockSkew,
    Envelope,
    EnvelopeDecodeError,
    EnvelopeVerifier,
    Identity,
    InsecureKeyFile,
    KeyFileError,
    KeyFileExists,
    KeyFileNotFound,
    ReplayedNonce,
    WrongPurpose,
    verify_detached,
)

PURPOSE = "coderepair.v1.Register"
T0_MS = 1_800_000_000_000  # a fixed instant, so tests never depend on the wall clock


class FakeClock:
    """A settable clock: time is an input of the verifier, not something to wait for."""

    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.generate()


def verifier_at(ms: int, skew_s: float = 60.0) -> tuple[EnvelopeVerifier, FakeClock]:
    clock = FakeClock(ms / 1000)
    return EnvelopeVerifier(max_clock_skew_s=skew_s, clock=clock), clock


def sign_with_nonce(
    key: Ed25519PrivateKey, purpose: str, payload: bytes, ts_ms: int, nonce: bytes
) -> Envelope:
    """Sign with a chosen nonce (Identity.sign always draws a fresh one)."""
    signer = Identity(key).public_key
    unsigned = Envelope(payload, signer, purpose, ts_ms, nonce, bytes(64))
    return dataclasses.replace(unsigned, signature=key.sign(unsigned.signing_bytes()))


# ---------------------------------------------------------------- round trip


def test_sign_verify_round_trip_through_wire_bytes(identity: Identity) -> None:
    env = identity.sign(PURPOSE, b"payload \x00\xff", now_ms=T0_MS)
    decoded = Envelope.from_bytes(env.to_bytes())
    assert decoded == env
    verifier, _ = verifier_at(T0_MS)
    assert verifier.verify(decoded, purpose=PURPOSE) == b"payload \x00\xff"
    assert decoded.signer == identity.public_key
    assert len(decoded.nonce) == 16 and len(decoded.signature) == 64


def test_empty_and_large_payloads_round_trip(identity: Identity) -> None:
    for payload in (b"", os.urandom(1 << 20)):
        env = identity.sign(PURPOSE, payload, now_ms=T0_MS)
        assert Envelope.from_bytes(env.to_bytes()).payload == payload


def test_sign_uses_wall_clock_and_fresh_nonces(identity: Identity) -> None:
    a = identity.sign(PURPOSE, b"x")
    b = identity.sign(PURPOSE, b"x")
    assert a.nonce != b.nonce
    assert EnvelopeVerifier().verify(a, purpose=PURPOSE) == b"x"


def test_signing_bytes_are_deterministic_and_exclude_the_signature(identity: Identity) -> None:
    env = identity.sign(PURPOSE, b"abc", now_ms=T0_MS)
    other_sig = dataclasses.replace(env, signature=bytes(64))
    assert env.signing_bytes() == other_sig.signing_bytes()
    # Moving bytes between purpose and payload changes the signed bytes (length prefixes).
    a = dataclasses.replace(env, purpose="p.a", payload=b"bc")
    b = dataclasses.replace(env, purpose="p.ab", payload=b"c")
    assert a.signing_bytes() != b.signing_bytes()


def test_repr_shows_no_key_material(identity: Identity) -> None:
    raw = identity._private_key.private_bytes(  # white-box: the secret we must not leak
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    for text in (repr(identity), str(identity), f"{identity}"):
        assert raw.hex() not in text and identity.key_id in text
    env = identity.sign(PURPOSE, b"secret-payload", now_ms=T0_MS)
    assert "secret-payload" not in repr(env)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(identity)


# ---------------------------------------------------------------- rejection


@pytest.mark.parametrize(
    "change",
    [
        {"payload": b"tampered"},
        {"timestamp_ms": T0_MS + 1},
        {"nonce": bytes(16)},
        {"signer": Identity.generate().public_key},
    ],
    ids=["payload", "timestamp", "nonce", "signer"],
)
def test_tampered_field_is_a_bad_signature(identity: Identity, change: dict[str, object]) -> None:
    env = identity.sign(PURPOSE, b"original", now_ms=T0_MS)
    verifier, _ = verifier_at(T0_MS)
    with pytest.raises(BadSignature, match="does not verify"):
        verifier.verify(dataclasses.replace(env, **change), purpose=PURPOSE)  # type: ignore[arg-type]


def test_tampered_signature_is_rejected(identity: Identity) -> None:
    env = identity.sign(PURPOSE, b"x", now_ms=T0_MS)
    verifier, _ = verifier_at(T0_MS)
    for i in (0, 31, 32, 63):
        sig = bytearray(env.signature)
        sig[i] ^= 0x01
        with pytest.raises(BadSignature):
            verifier.verify(dataclasses.replace(env, signature=bytes(sig)), purpose=PURPOSE)


def test_tampered_purpose(identity: Identity) -> None:
    env = identity.sign(PURPOSE, b"x", now_ms=T0_MS)
    forged = dataclasses.replace(env, purpose="coderepair.v1.SubmitRollouts")
    verifier, _ = verifier_at(T0_MS)
    with pytest.raises(WrongPurpose, match="signed for"):
        verifier.verify(env, purpose="coderepair.v1.SubmitRollouts")
    with pytest.raises(BadSignature):
        verifier.verify(forged, purpose="coderepair.v1.SubmitRollouts")


@pytest.mark.parametrize("offset_ms", [-60_001, 60_001, -(10**9), 10**9])
def test_clock_skew_beyond_bound_is_rejected(identity: Identity, offset_ms: int) -> None:
    env = identity.sign(PURPOSE, b"x", now_ms=T0_MS + offset_ms)
    verifier, _ = verifier_at(T0_MS)
    direction = "future" if offset_ms > 0 else "past"
    with pytest.raises(ClockSkew, match=direction):
        verifier.verify(env, purpose=PURPOSE)


@pytest.mark.parametrize("offset_ms", [-60_000, -59_999, 0, 59_999, 60_000])
def test_clock_skew_within_bound_is_accepted(identity: Identity, offset_ms: int) -> None:
    env = identity.sign(PURPOSE, b"x", now_ms=T0_MS + offset_ms)
    verifier, _ = verifier_at(T0_MS)
    assert verifier.verify(env, purpose=PURPOSE) == b"x"


def test_verifier_rejects_non_positive_skew() -> None:
    with pytest.raises(ValueError, match="max_clock_skew_s"):
        EnvelopeVerifier(max_clock_skew_s=0)


# ---------------------------------------------------------------- replay


def test_replay_is_rejected(identity: Identity) -> None:
    env = identity.sign(PURPOSE, b"x", now_ms=T0_MS)
    verifier, clock = verifier_at(T0_MS)
    verifier.verify(env, purpose=PURPOSE)
    clock.now_s += 30
    with pytest.raises(ReplayedNonce, match="already used"):
        verifier.verify(env, purpose=PURPOSE)


def test_nonce_reuse_within_window_is_rejected_even_with_a_new_timestamp() -> None:
    key = Ed25519PrivateKey.generate()
    nonce = os.urandom(16)
    verifier, clock = verifier_at(T0_MS)
    verifier.verify(sign_with_nonce(key, PURPOSE, b"a", T0_MS, nonce), purpose=PURPOSE)
    clock.now_s += 100  # past the first envelope's skew, inside the 2 x skew memory
    later = sign_with_nonce(key, PURPOSE, b"b", int(clock.now_s * 1000), nonce)
    with pytest.raises(ReplayedNonce):
        verifier.verify(later, purpose=PURPOSE)


def test_nonce_reuse_after_window_is_accepted_and_cache_shrinks() -> None:
    key = Ed25519PrivateKey.generate()
    nonce = os.urandom(16)
    verifier, clock = verifier_at(T0_MS, skew_s=60)
    verifier.verify(sign_with_nonce(key, PURPOSE, b"a", T0_MS, nonce), purpose=PURPOSE)
    assert verifier.cache_size() == 1
    clock.now_s += 2 * 60 + 1
    later = sign_with_nonce(key, PURPOSE, b"b", int(clock.now_s * 1000), nonce)
    assert verifier.verify(later, purpose=PURPOSE) == b"b"
    assert verifier.cache_size() == 1  # the old entry was pruned, the new one recorded
    # And the original envelope itself is still refused, now by the skew check.
    with pytest.raises(ClockSkew):
        verifier.verify(sign_with_nonce(key, PURPOSE, b"a", T0_MS, nonce), purpose=PURPOSE)


def test_same_nonce_from_different_signers_is_not_a_replay() -> None:
    nonce = os.urandom(16)
    verifier, _ = verifier_at(T0_MS)
    for _ in range(2):
        env = sign_with_nonce(Ed25519PrivateKey.generate(), PURPOSE, b"x", T0_MS, nonce)
        verifier.verify(env, purpose=PURPOSE)


def test_forged_envelopes_do_not_enter_the_replay_cache(identity: Identity) -> None:
    env = identity.sign(PURPOSE, b"x", now_ms=T0_MS)
    verifier, _ = verifier_at(T0_MS)
    with pytest.raises(BadSignature):
        verifier.verify(dataclasses.replace(env, payload=b"y"), purpose=PURPOSE)
    assert verifier.cache_size() == 0
    assert verifier.verify(env, purpose=PURPOSE) == b"x"


def test_concurrent_replays_accept_exactly_once(identity: Identity) -> None:
    env = identity.sign(PURPOSE, b"x", now_ms=T0_MS)
    verifier, _ = verifier_at(T0_MS)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        try:
            verifier.verify(env, purpose=PURPOSE)
            outcomes.append("ok")
        except ReplayedNonce:
            outcomes.append("replay")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["replay"] * 7


# ---------------------------------------------------------------- detached signatures


def test_detached_signatures_are_domain_separated(identity: Identity) -> None:
    sig = identity.sign_detached("coderepair.v1.PolicyManifest", b"doc")
    verify_detached(identity.public_key, "coderepair.v1.PolicyManifest", b"doc", sig)
    with pytest.raises(BadSignature):
        verify_detached(identity.public_key, "coderepair.v1.Other", b"doc", sig)
    with pytest.raises(BadSignature):
        verify_detached(identity.public_key, "coderepair.v1.PolicyManifest", b"doc2", sig)
    # An envelope's signature never verifies as a detached one over its payload.
    env = identity.sign(PURPOSE, b"doc", now_ms=T0_MS)
    with pytest.raises(BadSignature):
        verify_detached(identity.public_key, PURPOSE, b"doc", env.signature)


def test_sign_refuses_bad_purpose_and_oversize_payload(identity: Identity) -> None:
    for purpose in ("", "has space", "é", "x" * 200):
        with pytest.raises(ValueError, match="purpose"):
            identity.sign(purpose, b"x")
    with pytest.raises(ValueError, match="MAX_PAYLOAD_BYTES"):
        identity.sign(PURPOSE, bytes(MAX_PAYLOAD_BYTES + 1))


# ---------------------------------------------------------------- key files


def test_create_writes_mode_0600_in_a_0700_dir(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "worker.key"
    created = Identity.create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert Identity.load(path).public_key == created.public_key
    assert b"PRIVATE KEY" in path.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["worker.key"]  # no temp file left


def test_create_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "worker.key"
    first = Identity.create(path)
    with pytest.raises(KeyFileExists, match="already exists"):
        Identity.create(path)
    assert Identity.load(path).public_key == first.public_key


def test_load_or_create_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "worker.key"
    first = Identity.load_or_create(path)
    assert Identity.load_or_create(path).public_key == first.public_key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o607])
def test_load_refuses_key_files_open_to_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "worker.key"
    Identity.create(path)
    path.chmod(mode)
    with pytest.raises(InsecureKeyFile, match=f"chmod 600 {path}"):
        Identity.load(path)
    path.chmod(0o600)
    Identity.load(path)


def test_load_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(KeyFileNotFound, match="no key file"):
        Identity.load(tmp_path / "missing.key")
    garbage = tmp_path / "garbage.key"
    fd = os.open(garbage, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(KeyFileError, match="PKCS#8"):
        Identity.load(garbage)
    ec = tmp_path / "ec.key"
    pem = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(ec, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        Identity.load(ec)
    with pytest.raises(KeyFileError, match="not a regular file"):
        Identity.load(tmp_path)


# ---------------------------------------------------------------- decoding


def test_decode_errors_name_the_problem(identity: Identity) -> None:
    wire = identity.sign(PURPOSE, b"payload", now_ms=T0_MS).to_bytes()
    cases = {
        b"XXXX" + wire[4:]: "magic",
        wire[:4] + b"\x02" + wire[5:]: "version 2",
        wire[:5] + b"\x00" + wire[6:]: "purpose length",
        wire + b"\x00": "trailing",
        wire[:-1]: "truncated",
        wire[:3]: "truncated",
    }
    for data, message in cases.items():
        with pytest.raises(EnvelopeDecodeError, match=message):
            Envelope.from_bytes(data)
    with pytest.raises(EnvelopeDecodeError, match="must be bytes"):
        Envelope.from_bytes("text")  # type: ignore[arg-type]


def test_oversize_payload_length_is_refused_before_reading(identity: Identity) -> None:
    wire = bytearray(identity.sign(PURPOSE, b"", now_ms=T0_MS).to_bytes())
    length_at = 6 + len(PURPOSE) + 32 + 8 + 16
    wire[length_at : length_at + 4] = (MAX_PAYLOAD_BYTES + 1).to_bytes(4, "big")
    with pytest.raises(EnvelopeDecodeError, match="over the"):
        Envelope.from_bytes(bytes(wire))


def test_envelope_constructor_checks_fields() -> None:
    good = {
        "payload": b"",
        "signer": bytes(32),
        "purpose": PURPOSE,
        "timestamp_ms": 0,
        "nonce": bytes(16),
        "signature": bytes(64),
    }
    bad: list[dict[str, object]] = [
        {"signer": bytes(31)},
        {"nonce": bytes(17)},
        {"signature": bytes(63)},
        {"payload": "str"},
        {"purpose": ""},
        {"timestamp_ms": -1},
        {"timestamp_ms": 2**63},
        {"timestamp_ms": True},
    ]
    Envelope(**good)  # type: ignore[arg-type]
    for change in bad:
        with pytest.raises(EnvelopeDecodeError):
            Envelope(**{**good, **change})  # type: ignore[arg-type]


def assert_rejected(data: bytes, purpose: str = PURPOSE) -> None:
    """Bytes that are not exactly a valid envelope: typed decode error, or a decoded
    envelope that fails verification. Anything else (accept, other exception) fails."""
    try:
        env = Envelope.from_bytes(data)
    except EnvelopeDecodeError:
        return
    verifier, _ = verifier_at(T0_MS)
    with pytest.raises(VerificationError):
        verifier.verify(env, purpose=purpose)


@pytest.fixture(scope="module")
def valid_wire(identity: Identity) -> bytes:
    return identity.sign(PURPOSE, b"some rollout batch bytes", now_ms=T0_MS).to_bytes()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_decode_silently(data: bytes) -> None:
    assert_rejected(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_behind_a_valid_header(data: bytes) -> None:
    assert_rejected(ENVELOPE_MAGIC + b"\x01" + data)


def test_every_truncation_is_a_decode_error(valid_wire: bytes) -> None:
    for end in range(len(valid_wire)):
        with pytest.raises(EnvelopeDecodeError):
            Envelope.from_bytes(valid_wire[:end])


def test_every_single_bit_flip_is_rejected(valid_wire: bytes) -> None:
    """Exhaustive: each of the len*8 one-bit corruptions of a valid envelope."""
    for bit in range(len(valid_wire) * 8):
        flipped = bytearray(valid_wire)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert_rejected(bytes(flipped))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_corruptions_are_rejected(valid_wire: bytes, data: st.DataObject) -> None:
    corrupted = bytearray(valid_wire)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(corrupted) - 1))
        corrupted[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(corrupted)))
    candidate = bytes(corrupted[:cut]) + data.draw(st.binary(max_size=8))
    if candidate == valid_wire:
        return
    assert_rejected(candidate)


def test_error_types_share_the_protocol_bases() -> None:
    assert issubclass(EnvelopeDecodeError, DecodeError)
    for cls in (BadSignature, WrongPurpose, ClockSkew, ReplayedNonce):
        assert issubclass(cls, VerificationError)
    assert issubclass(KeyFileError, ProtocolError)
