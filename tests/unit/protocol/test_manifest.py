"""Tests for coderepair.protocol.manifest: validation, signing, decoding, chains, shards."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.protocol.errors import DecodeError, VerificationError
from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import (
    MAX_MANIFEST_BYTES,
    ChainError,
    ManifestDecodeError,
    ManifestSignatureError,
    PolicyManifest,
    ShardHashMismatch,
    ShardInfo,
    ShardMissing,
    ShardSizeMismatch,
    SignedManifest,
    UntrustedTrainerKey,
    build_manifest_for_dir,
    sha256_file,
    sign_manifest,
    verify_chain,
    verify_manifest,
    verify_shard,
)

CREATED = datetime(2026, 11, 22, 4, 30, 0, 123456, tzinfo=UTC)
TOKENIZER = hashlib.sha256(b"tokenizer").hexdigest()


@pytest.fixture(scope="module")
def trainer() -> Identity:
    return Identity.generate()


def make_manifest(trainer: Identity, **overrides: Any) -> PolicyManifest:
    fields: dict[str, Any] = {
        "run_id": "run-1",
        "version": 3,
        "parent_version": 2,
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "tokenizer_sha256": TOKENIZER,
        "kind": "delta",
        "shards": (
            ShardInfo(name="delta/model.zst", size=10, sha256="ab" * 32),
            ShardInfo(name="extra.json", size=0, sha256="cd" * 32),
        ),
        "created_at": CREATED,
        "trainer_key": trainer.public_key_hex,
    }
    fields.update(overrides)
    return PolicyManifest(**fields)


@pytest.fixture(scope="module")
def signed_doc(trainer: Identity) -> bytes:
    return sign_manifest(make_manifest(trainer), trainer).to_bytes()


# ---------------------------------------------------------------- signing


def test_sign_encode_decode_verify_round_trip(trainer: Identity) -> None:
    manifest = make_manifest(trainer)
    doc = sign_manifest(manifest, trainer).to_bytes()
    decoded = SignedManifest.from_bytes(doc)
    assert verify_manifest(decoded, trainer.public_key) == manifest
    assert decoded.manifest.created_at == CREATED


def test_canonical_bytes_are_sorted_compact_utf8_json(trainer: Identity) -> None:
    manifest = make_manifest(trainer)
    raw = manifest.canonical_bytes()
    assert (
        raw
        == json.dumps(
            json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )
    assert b'"created_at":"2026-11-22T04:30:00.123456Z"' in raw
    whole_second = make_manifest(trainer, created_at=CREATED.replace(microsecond=0))
    assert b'"created_at":"2026-11-22T04:30:00.000000Z"' in whole_second.canonical_bytes()


@pytest.mark.parametrize(
    "change",
    [
        {"version": 4, "parent_version": 3},
        {"run_id": "run-2"},
        {"base_model": "other/model"},
        {"shards": (ShardInfo(name="delta/model.zst", size=10, sha256="ef" * 32),)},
        {"created_at": CREATED + timedelta(seconds=1)},
        {"kind": "full"},
    ],
)
def test_altered_manifest_fails_signature(trainer: Identity, change: dict[str, Any]) -> None:
    signed = sign_manifest(make_manifest(trainer), trainer)
    altered = SignedManifest(make_manifest(trainer, **change), signed.signature)
    with pytest.raises(ManifestSignatureError, match="does not verify"):
        verify_manifest(altered, trainer.public_key)
    with pytest.raises(ManifestSignatureError):
        verify_manifest(SignedManifest.from_bytes(altered.to_bytes()), trainer.public_key)


def test_other_trainer_key_is_untrusted(trainer: Identity) -> None:
    attacker = Identity.generate()
    forged = sign_manifest(make_manifest(attacker, trainer_key=attacker.public_key_hex), attacker)
    with pytest.raises(UntrustedTrainerKey, match="pinned key"):
        verify_manifest(forged, trainer.public_key)
    # Naming the pinned key does not help without its private half.
    signed_by_attacker = SignedManifest(
        make_manifest(trainer), attacker.sign_detached("coderepair.v1.PolicyManifest", b"x")
    )
    with pytest.raises(ManifestSignatureError):
        verify_manifest(signed_by_attacker, trainer.public_key)


def test_sign_refuses_identity_that_is_not_the_trainer_key(trainer: Identity) -> None:
    with pytest.raises(ValueError, match=r"trainer_key=identity\.public_key_hex"):
        sign_manifest(make_manifest(trainer), Identity.generate())


def test_verify_requires_a_raw_pinned_key(trainer: Identity) -> None:
    signed = sign_manifest(make_manifest(trainer), trainer)
    with pytest.raises(ValueError, match="32 raw bytes"):
        verify_manifest(signed, trainer.public_key_hex.encode())


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "delta", "parent_version": None}, "a delta needs parent_version"),
        ({"kind": "delta", "parent_version": 3}, "must be below version"),
        ({"kind": "full", "parent_version": 5}, "must be below version"),
        ({"kind": "full", "parent_version": -1}, "parent_version"),
        ({"version": -1, "parent_version": None, "kind": "full"}, "greater than or equal"),
        ({"shards": ()}, "at least 1"),
        ({"created_at": datetime(2026, 1, 1)}, "no time zone"),
        ({"created_at": datetime(1999, 1, 1, tzinfo=UTC)}, "2000..9998"),
        ({"trainer_key": "AB" * 32}, "trainer_key"),
        ({"tokenizer_sha256": "00"}, "tokenizer_sha256"),
        ({"run_id": "../etc"}, "run_id"),
        ({"base_model": " padded"}, "base_model"),
        ({"kind": "partial"}, "kind"),
        ({"version": True}, "version"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_manifests_say_what_to_change(
    trainer: Identity, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        make_manifest(trainer, **overrides)


def test_full_manifest_parent_is_optional(trainer: Identity) -> None:
    assert make_manifest(trainer, kind="full", parent_version=None).parent_version is None
    assert make_manifest(trainer, kind="full", parent_version=0).parent_version == 0


def test_created_at_is_normalised_to_utc(trainer: Identity) -> None:
    plus_two = CREATED.astimezone(timezone(timedelta(hours=2)))
    manifest = make_manifest(trainer, created_at=plus_two)
    assert manifest.created_at.utcoffset() == timedelta(0)
    assert manifest.canonical_bytes() == make_manifest(trainer).canonical_bytes()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../outside", r"'\.\.'"),
        ("a/../../b", r"'\.\.'"),
        ("/etc/passwd", "absolute"),
        ("a\\b", "backslash"),
        ("a//b", "empty"),
        ("./a", "'.'"),
        ("", "1-1024"),
        ("C:/x", "characters outside"),
        ("with space", "characters outside"),
    ],
)
def test_unsafe_shard_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        ShardInfo(name=name, size=1, sha256="00" * 32)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a.bin", "a.bin"], "appears twice"),
        (["Model.bin", "model.bin"], "case-insensitively"),
        (["part", "part/x.bin"], "file and a folder"),
    ],
)
def test_conflicting_shard_names_are_refused(
    trainer: Identity, names: list[str], message: str
) -> None:
    shards = tuple(ShardInfo(name=n, size=1, sha256="00" * 32) for n in names)
    with pytest.raises(pydantic.ValidationError, match=message):
        make_manifest(trainer, shards=shards)


# ---------------------------------------------------------------- chain rules


def test_chain_rules(trainer: Identity) -> None:
    full0 = make_manifest(trainer, version=0, parent_version=None, kind="full")
    delta1 = make_manifest(trainer, version=1, parent_version=0, kind="delta")
    delta2 = make_manifest(trainer, version=2, parent_version=1, kind="delta")
    full5 = make_manifest(trainer, version=5, parent_version=4, kind="full")

    verify_chain(None, full0)  # a full version can start from nothing
    verify_chain(full0, delta1)  # a delta on exactly its parent
    verify_chain(delta1, delta2)
    verify_chain(delta1, full5)  # a newer full version can always be taken

    refusals = [
        (None, delta1, "no version is held"),
        (full0, delta2, "delta against v1, but v0 is held"),
        (delta2, delta1, "not newer"),
        (delta1, delta1, "not newer"),
        (full5, full0, "not newer"),
        (full0, make_manifest(trainer, run_id="run-2", version=1, parent_version=0), "run"),
        (full0, make_manifest(trainer, version=1, parent_version=0, base_model="x/y"), "base"),
        (full0, make_manifest(trainer, version=9, kind="full", tokenizer_sha256="00" * 32), "tok"),
    ]
    for held, new, message in refusals:
        with pytest.raises(ChainError, match=message):
            verify_chain(held, new)


# ---------------------------------------------------------------- shards


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    assert sha256_file(write(tmp_path / "big.bin", data)) == hashlib.sha256(data).hexdigest()
    assert sha256_file(write(tmp_path / "empty", b"")) == hashlib.sha256(b"").hexdigest()


def test_verify_shard(tmp_path: Path) -> None:
    data = b"weights" * 100
    shard = ShardInfo(name="model.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    path = write(tmp_path / "model.bin", data)
    verify_shard(path, shard)

    write(path, data[:-1] + b"X")  # same size, different content
    with pytest.raises(ShardHashMismatch, match=r"shard model\.bin .* download it again"):
        verify_shard(path, shard)
    write(path, data[:-1])
    with pytest.raises(ShardSizeMismatch, match=r"shard model\.bin .* download it again"):
        verify_shard(path, shard)
    with pytest.raises(ShardMissing, match=r"model\.bin"):
        verify_shard(tmp_path / "absent.bin", shard)
    with pytest.raises(ShardMissing, match="not a regular file"):
        verify_shard(tmp_path, shard)


def test_build_manifest_for_dir(tmp_path: Path, trainer: Identity) -> None:
    write(tmp_path / "b.bin", b"bbb")
    write(tmp_path / "a" / "z.bin", b"zz")
    manifest = build_manifest_for_dir(
        tmp_path,
        run_id="run-1",
        version=0,
        base_model="m",
        tokenizer_sha256=TOKENIZER,
        kind="full",
        trainer_key=trainer.public_key,
        created_at=CREATED,
    )
    assert [(s.name, s.size) for s in manifest.shards] == [("a/z.bin", 2), ("b.bin", 3)]
    for shard in manifest.shards:
        verify_shard(tmp_path / shard.name, shard)
    assert manifest.trainer_key == trainer.public_key_hex

    only = build_manifest_for_dir(
        tmp_path,
        run_id="run-1",
        version=1,
        parent_version=0,
        base_model="m",
        tokenizer_sha256=TOKENIZER,
        kind="delta",
        trainer_key=trainer.public_key_hex,
        names=["b.bin"],
    )
    assert [s.name for s in only.shards] == ["b.bin"]
    assert only.created_at.tzinfo is not None

    write(tmp_path / "bad name.bin", b"")
    with pytest.raises(ValueError, match="characters outside"):
        build_manifest_for_dir(
            tmp_path,
            run_id="run-1",
            version=0,
            base_model="m",
            tokenizer_sha256=TOKENIZER,
            kind="full",
            trainer_key=trainer.public_key,
        )


# ---------------------------------------------------------------- decoding


def test_decode_errors_name_the_problem(signed_doc: bytes) -> None:
    doc = json.loads(signed_doc)
    pretty = json.dumps(doc, indent=2, sort_keys=True).encode()
    upper_sig = signed_doc.replace(doc["signature"].encode(), doc["signature"].upper().encode())
    cases: dict[bytes, str] = {
        pretty: "canonical form",
        upper_sig: "128 lowercase hex",
        b'{"format":1,"format":2}': "duplicate key",
        b"[]": "exactly the keys",
        json.dumps({**doc, "format": "v9"}).encode(): "format is 'v9'",
        b'{"manifest":NaN}': "NaN",
        b"[" * 100_000: "not valid",
        b"\xff\xfe": "UTF-8",
        b'{"a":' + b"9" * 5000 + b"}": "not valid",
        b"x" * (MAX_MANIFEST_BYTES + 1): "over the",
    }
    bad_manifest = {**doc, "manifest": {**doc["manifest"], "version": "3"}}
    cases[json.dumps(bad_manifest, sort_keys=True, separators=(",", ":")).encode()] = "version"
    for data, message in cases.items():
        with pytest.raises(ManifestDecodeError, match=message):
            SignedManifest.from_bytes(data)
    with pytest.raises(ManifestDecodeError, match="must be bytes"):
        SignedManifest.from_bytes(signed_doc.decode())  # type: ignore[arg-type]


def assert_rejected(data: bytes, trainer: Identity) -> None:
    """Not exactly the signed document: a typed decode error, or a decoded manifest
    that fails verification. An accept or any other exception fails the test."""
    try:
        signed = SignedManifest.from_bytes(data)
    except ManifestDecodeError:
        return
    with pytest.raises(VerificationError):
        verify_manifest(signed, trainer.public_key)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_decode_silently(trainer: Identity, data: bytes) -> None:
    assert_rejected(data, trainer)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
def test_random_json_never_decodes_silently(trainer: Identity, value: object) -> None:
    assert_rejected(json.dumps(value).encode(), trainer)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_corruptions_are_rejected(
    trainer: Identity, signed_doc: bytes, data: st.DataObject
) -> None:
    corrupted = bytearray(signed_doc)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(corrupted) - 1))
        corrupted[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(corrupted)))
    candidate = bytes(corrupted[:cut]) + data.draw(st.binary(max_size=8))
    if candidate != signed_doc:
        assert_rejected(candidate, trainer)


def test_every_truncation_is_a_decode_error(signed_doc: bytes) -> None:
    for end in range(len(signed_doc)):
        with pytest.raises(ManifestDecodeError):
            SignedManifest.from_bytes(signed_doc[:end])


def test_every_single_bit_flip_is_rejected(trainer: Identity, signed_doc: bytes) -> None:
    """Exhaustive: each one-bit corruption of a valid signed document."""
    for bit in range(len(signed_doc) * 8):
        flipped = bytearray(signed_doc)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert_rejected(bytes(flipped), trainer)


def test_error_types_share_the_protocol_bases() -> None:
    assert issubclass(ManifestDecodeError, DecodeError)
    for cls in (ManifestSignatureError, UntrustedTrainerKey, ChainError, ShardHashMismatch):
        assert issubclass(cls, VerificationError)
