"""Signed policy manifests: what a policy version is, who made it, and how to check it.

The trainer publishes policy version *v* as a `PolicyManifest` (run, version, parent,
base model, tokenizer hash, kind full | delta, shard list with sizes and SHA-256),
signs it with its Ed25519 key (`sign_manifest`) and uploads the `SignedManifest`
JSON document next to the shards. A worker accepts it only if

1. the document decodes and is byte-for-byte in canonical form (`SignedManifest.from_bytes`),
2. it was signed by the trainer key the worker pinned (`verify_manifest`),
3. it chains onto the version the worker holds (`verify_chain`), and
4. every downloaded shard has the listed size and hash (`verify_shard`).

Canonical bytes are compact JSON with sorted keys in UTF-8, built field by field here
rather than by pydantic's serializer, so the signed bytes cannot change when a party
upgrades pydantic.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from coderepair.protocol.errors import DecodeError, VerificationError
from coderepair.protocol.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    BadSignature,
    Identity,
    fingerprint,
    verify_detached,
)

__all__ = [
    "MANIFEST_PURPOSE",
    "MAX_MANIFEST_BYTES",
    "MAX_SHARDS",
    "SIGNED_MANIFEST_FORMAT",
    "ChainError",
    "ManifestDecodeError",
    "ManifestSignatureError",
    "PolicyManifest",
    "ShardError",
    "ShardHashMismatch",
    "ShardInfo",
    "ShardMissing",
    "ShardSizeMismatch",
    "SignedManifest",
    "UntrustedTrainerKey",
    "build_manifest_for_dir",
    "sha256_file",
    "sign_manifest",
    "verify_chain",
    "verify_manifest",
    "verify_shard",
]

MANIFEST_PURPOSE = "coderepair.v1.PolicyManifest"
SIGNED_MANIFEST_FORMAT = "coderepair.v1.SignedManifest"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_SHARDS = 100_000
_MAX_INT = 2**63 - 1  # versions and sizes fit a signed 64-bit database column
_HASH_CHUNK = 1024 * 1024

_HEX64 = r"^[0-9a-f]{64}$"
_SIGNATURE_HEX_RE = re.compile(r"[0-9a-f]{128}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._+-]+")


class ManifestDecodeError(DecodeError):
    """Bytes are not a well-formed, canonical signed manifest document."""


class ManifestSignatureError(VerificationError):
    """The manifest's signature does not verify under its trainer key."""


class UntrustedTrainerKey(VerificationError):
    """The manifest names a trainer key other than the one pinned."""


class ChainError(VerificationError):
    """A manifest does not follow on from the version held."""


class ShardError(VerificationError):
    """A downloaded shard does not match its manifest entry."""


class ShardMissing(ShardError):
    """The shard file is absent or not a regular file."""


class ShardSizeMismatch(ShardError):
    """The shard file's size differs from the manifest."""


class ShardHashMismatch(ShardError):
    """The shard file's SHA-256 differs from the manifest."""


def _check_shard_name(name: str) -> str:
    if not 1 <= len(name) <= 1024:
        raise ValueError(f"shard name must be 1-1024 characters, got {len(name)}")
    if "\\" in name:
        raise ValueError(f"shard name {name!r} contains a backslash: use '/' between folders")
    if name.startswith("/"):
        raise ValueError(f"shard name {name!r} is absolute: make it relative to the version dir")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(
                f"shard name {name!r} has an empty, '.' or '..' path segment: name the file "
                "by its plain relative path, e.g. 'model-00001.safetensors'"
            )
        if not _SEGMENT_RE.fullmatch(segment):
            raise ValueError(
                f"shard name {name!r} has characters outside [A-Za-z0-9._+-] (and '/'): "
                "rename the file"
            )
    return name


class ShardInfo(BaseModel):
    """One file of a policy version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        description="Path of the file relative to the version's directory, '/'-separated; "
        "segments of [A-Za-z0-9._+-], no '.', '..' or absolute paths."
    )
    size: int = Field(ge=0, le=_MAX_INT, strict=True, description="File size in bytes.")
    sha256: str = Field(pattern=_HEX64, description="SHA-256 of the file, lowercase hex.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return _check_shard_name(value)


class PolicyManifest(BaseModel):
    """Policy version `version` of run `run_id`, as published by the trainer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Training run identifier: 1-128 characters of [A-Za-z0-9._-].",
    )
    version: int = Field(ge=0, le=_MAX_INT, strict=True, description="Policy version number.")
    parent_version: int | None = Field(
        default=None,
        ge=0,
        strict=True,
        description="Version this one derives from: required for a delta (the version the "
        "delta applies to); optional for a full checkpoint. Must be below `version`.",
    )
    base_model: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$",
        description="Base model id (e.g. a Hugging Face repo id): printable ASCII, no "
        "leading or trailing spaces.",
    )
    tokenizer_sha256: str = Field(
        pattern=_HEX64, description="SHA-256 of the tokenizer files, lowercase hex."
    )
    kind: Literal["full", "delta"] = Field(
        description="'full': complete weights; 'delta': changes against `parent_version`."
    )
    shards: tuple[ShardInfo, ...] = Field(
        min_length=1, max_length=MAX_SHARDS, description="Files making up this version."
    )
    created_at: datetime = Field(description="When the trainer made this version (UTC).")
    trainer_key: str = Field(
        pattern=_HEX64, description="The trainer's Ed25519 public key, 64 lowercase hex chars."
    )

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                "created_at has no time zone: pass an aware UTC time, e.g. "
                "datetime.now(timezone.utc)"
            )
        if not 2000 <= value.year <= 9998:
            raise ValueError(f"created_at year {value.year} is outside 2000..9998")
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _consistent(self) -> PolicyManifest:
        if self.kind == "delta" and self.parent_version is None:
            raise ValueError(
                "a delta needs parent_version (the version it applies to): set it, or "
                "publish kind='full'"
            )
        if self.parent_version is not None and self.parent_version >= self.version:
            raise ValueError(
                f"parent_version {self.parent_version} must be below version {self.version}"
            )
        seen: set[str] = set()
        for shard in self.shards:
            folded = shard.name.casefold()
            if folded in seen:
                raise ValueError(
                    f"shard name {shard.name!r} appears twice (names are compared "
                    "case-insensitively, as on macOS and Windows): give each file its own name"
                )
            seen.add(folded)
        for shard in self.shards:
            parts = shard.name.casefold().split("/")
            for depth in range(1, len(parts)):
                if "/".join(parts[:depth]) in seen:
                    raise ValueError(
                        f"shard {shard.name!r} lies inside another shard's path "
                        f"{'/'.join(parts[:depth])!r}: a name cannot be a file and a folder"
                    )
        return self

    def canonical_dict(self) -> dict[str, Any]:
        """The manifest as plain JSON values, exactly as signed."""
        return {
            "base_model": self.base_model,
            "created_at": _format_utc(self.created_at),
            "kind": self.kind,
            "parent_version": self.parent_version,
            "run_id": self.run_id,
            "shards": [{"name": s.name, "sha256": s.sha256, "size": s.size} for s in self.shards],
            "tokenizer_sha256": self.tokenizer_sha256,
            "trainer_key": self.trainer_key,
            "version": self.version,
        }

    def canonical_bytes(self) -> bytes:
        """Compact, sorted-key UTF-8 JSON: the bytes the trainer's signature covers."""
        return _canonical_json(self.canonical_dict())


def _format_utc(value: datetime) -> str:
    v = value.astimezone(UTC)
    # Always six fractional digits so that one instant has exactly one spelling.
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:"
        f"{v.second:02d}.{v.microsecond:06d}Z"
    )


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class SignedManifest:
    """A manifest with the trainer's detached Ed25519 signature over its canonical bytes."""

    manifest: PolicyManifest
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.manifest, PolicyManifest):
            raise ManifestDecodeError(
                f"manifest must be a PolicyManifest, got {type(self.manifest).__name__}"
            )
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise ManifestDecodeError(f"signature must be {SIGNATURE_BYTES} bytes")

    def to_bytes(self) -> bytes:
        """The JSON document stored next to the shards (canonical: compact, sorted keys)."""
        return _canonical_json(
            {
                "format": SIGNED_MANIFEST_FORMAT,
                "manifest": self.manifest.canonical_dict(),
                "signature": self.signature.hex(),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedManifest:
        """Decode `to_bytes()` output; raise `ManifestDecodeError` on anything malformed.

        The input must equal the canonical encoding of what it decodes to, so a document
        has exactly one accepted spelling: no re-ordered keys, whitespace or escapes.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ManifestDecodeError(f"manifest must be bytes, got {type(data).__name__}")
        raw = bytes(data)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestDecodeError(
                f"manifest document is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit"
            )
        try:
            doc = json.loads(
                raw.decode("utf-8"),
                object_pairs_hook=_no_duplicate_keys,
                parse_constant=_reject_constant,
            )
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ManifestDecodeError(f"manifest document is not valid UTF-8 JSON: {exc}") from exc
        if not isinstance(doc, dict) or set(doc) != {"format", "manifest", "signature"}:
            raise ManifestDecodeError(
                "manifest document must be an object with exactly the keys 'format', "
                "'manifest' and 'signature'"
            )
        if doc["format"] != SIGNED_MANIFEST_FORMAT:
            raise ManifestDecodeError(
                f"manifest format is {str(doc['format'])[:60]!r}, expected "
                f"{SIGNED_MANIFEST_FORMAT!r}: upgrade coderepair-protocol if it is newer"
            )
        sig_hex = doc["signature"]
        if not isinstance(sig_hex, str) or not _SIGNATURE_HEX_RE.fullmatch(sig_hex):
            raise ManifestDecodeError("manifest signature must be 128 lowercase hex characters")
        try:
            manifest = PolicyManifest.model_validate(doc["manifest"])
        except pydantic.ValidationError as exc:
            raise ManifestDecodeError(f"invalid policy manifest: {exc}") from exc
        except (ValueError, TypeError, OverflowError) as exc:  # defence in depth
            raise ManifestDecodeError(f"invalid policy manifest: {exc}") from exc
        signed = cls(manifest=manifest, signature=bytes.fromhex(sig_hex))
        if signed.to_bytes() != raw:
            raise ManifestDecodeError(
                "manifest document is not in canonical form (compact JSON, sorted keys, "
                "created_at as YYYY-MM-DDTHH:MM:SS.ffffffZ): it was altered after signing; "
                "download it again from the trainer's store"
            )
        return signed


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:40]!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a manifest")


def sign_manifest(manifest: PolicyManifest, identity: Identity) -> SignedManifest:
    """Sign `manifest` with the trainer's identity (which must be its `trainer_key`)."""
    if manifest.trainer_key != identity.public_key_hex:
        raise ValueError(
            f"manifest.trainer_key is {manifest.trainer_key[:16]}… but the signing identity is "
            f"{identity.key_id}: build the manifest with trainer_key=identity.public_key_hex"
        )
    signature = identity.sign_detached(MANIFEST_PURPOSE, manifest.canonical_bytes())
    return SignedManifest(manifest=manifest, signature=signature)


def verify_manifest(signed: SignedManifest, pinned_trainer_key: bytes) -> PolicyManifest:
    """Return the manifest if it is signed by the pinned trainer key.

    Raises `UntrustedTrainerKey` when the manifest names another key and
    `ManifestSignatureError` when the signature does not verify.
    """
    if not isinstance(pinned_trainer_key, bytes) or len(pinned_trainer_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"pinned_trainer_key must be {PUBLIC_KEY_BYTES} raw bytes")
    manifest = signed.manifest
    if manifest.trainer_key != pinned_trainer_key.hex():
        raise UntrustedTrainerKey(
            f"manifest {manifest.run_id} v{manifest.version} names trainer key "
            f"{fingerprint(bytes.fromhex(manifest.trainer_key))}, but the pinned key is "
            f"{fingerprint(pinned_trainer_key)}: if the operator rotated the trainer key, "
            "re-pin the new one; otherwise this source is not the trainer"
        )
    try:
        verify_detached(
            pinned_trainer_key, MANIFEST_PURPOSE, manifest.canonical_bytes(), signed.signature
        )
    except BadSignature as exc:
        raise ManifestSignatureError(
            f"signature of manifest {manifest.run_id} v{manifest.version} does not verify "
            "under the pinned trainer key: it was altered; download it again"
        ) from exc
    return manifest


def verify_chain(held: PolicyManifest | None, new: PolicyManifest) -> None:
    """Check that `new` may replace the version held; raise `ChainError` if not.

    Rules:
    1. When nothing is held, only a full version can be taken (a delta has nothing to
       apply to).
    2. `new` belongs to the same run (`run_id`) as the held version.
    3. `new.version` is greater than the held version: no rollback, no re-application.
    4. A delta must have `parent_version` equal to the held version: it encodes the
       change from exactly that version.
    5. Within a run, `base_model` and `tokenizer_sha256` never change (token ids in
       rollouts would otherwise mean different things).
    6. A full version satisfying 2, 3 and 5 can always be taken, whatever its parent.
    """
    if held is None:
        if new.kind == "delta":
            raise ChainError(
                f"{new.run_id} v{new.version} is a delta against v{new.parent_version}, but no "
                "version is held: fetch the latest full version first"
            )
        return
    if new.run_id != held.run_id:
        raise ChainError(
            f"manifest is for run {new.run_id!r} but the held policy is from run "
            f"{held.run_id!r}: start from a full version of the new run"
        )
    if new.version <= held.version:
        raise ChainError(
            f"{new.run_id} v{new.version} is not newer than the held v{held.version}: "
            "refusing to go back or re-apply a version"
        )
    if new.base_model != held.base_model or new.tokenizer_sha256 != held.tokenizer_sha256:
        raise ChainError(
            f"{new.run_id} v{new.version} changes the base model or tokenizer of the run "
            f"(held v{held.version}): a run keeps one base model and tokenizer"
        )
    if new.kind == "delta" and new.parent_version != held.version:
        raise ChainError(
            f"{new.run_id} v{new.version} is a delta against v{new.parent_version}, but "
            f"v{held.version} is held: fetch the latest full version instead"
        )


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file as lowercase hex, read in 1 MiB chunks."""
    return _hash_file(Path(path))[0]


def verify_shard(path: str | os.PathLike[str], shard: ShardInfo) -> None:
    """Check a downloaded file against its manifest entry (size first: it is free)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ShardMissing(f"shard {shard.name} is missing at {path}: download it") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ShardMissing(f"shard {shard.name} at {path} is not a regular file")
    if st.st_size != shard.size:
        raise ShardSizeMismatch(
            f"shard {shard.name} is {st.st_size} bytes but the manifest says {shard.size}: "
            "the download is incomplete or corrupt; delete it and download it again"
        )
    digest, size = _hash_file(path)
    if size != shard.size:
        raise ShardSizeMismatch(
            f"shard {shard.name} changed size while being hashed ({size} bytes, manifest says "
            f"{shard.size}): delete it and download it again"
        )
    if digest != shard.sha256:
        raise ShardHashMismatch(
            f"shard {shard.name} has sha256 {digest[:16]}… but the manifest says "
            f"{shard.sha256[:16]}…: the file is corrupt or was tampered with; delete it and "
            "download it again"
        )


def build_manifest_for_dir(
    directory: str | os.PathLike[str],
    *,
    run_id: str,
    version: int,
    base_model: str,
    tokenizer_sha256: str,
    kind: Literal["full", "delta"],
    trainer_key: bytes | str,
    parent_version: int | None = None,
    created_at: datetime | None = None,
    names: Sequence[str] | None = None,
) -> PolicyManifest:
    """Hash the shard files in `directory` and build their manifest.

    `names` lists the shard files (relative, '/'-separated); by default every regular
    file under `directory`, in sorted order. Raises pydantic's ValidationError (a
    ValueError) when a field or a file name is not acceptable.
    """
    root = Path(directory)
    if names is None:
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    shards = []
    for name in names:
        digest, size = _hash_file(root / _check_shard_name(name))
        shards.append(ShardInfo(name=name, size=size, sha256=digest))
    return PolicyManifest(
        run_id=run_id,
        version=version,
        parent_version=parent_version,
        base_model=base_model,
        tokenizer_sha256=tokenizer_sha256,
        kind=kind,
        shards=tuple(shards),
        created_at=created_at if created_at is not None else datetime.now(UTC),
        trainer_key=trainer_key.hex() if isinstance(trainer_key, bytes) else trainer_key,
    )
