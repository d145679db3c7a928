"""Publishing policy versions: signed full checkpoints and sparse deltas in an object store.

The trainer hands `Publisher.publish` its state dict and a version number. The publisher

1. snapshots the tensors at the published dtype (tied aliases dropped, see `snapshot`),
2. writes either a **full** checkpoint (sharded safetensors, every `full_every` versions
   and whenever there is nothing to diff against) or a **delta** against the version it
   published last,
3. uploads the shards through an `ObjectSink`, then the signed manifest
   (`coderepair.protocol.manifest`) last, so that a visible manifest always has its shards,
4. returns the signed manifest bytes, which the caller announces (PublishPolicy).

A delta stores, per tensor that changed, the flat indices of the elements whose bits
changed and their **new values**, not differences: a worker overwrites those elements and
holds exactly the bits the trainer published, with no floating-point arithmetic that could
round differently on another machine. Comparing bits of the *published* tensors (after the
cast to `publish_dtype`) is what makes deltas sparse at small learning rates: AdamW moves
nearly every fp32 weight every step, but few of them cross a bf16 rounding boundary.

Delta shard format, version 1 (all integers little-endian; decoded by
`coderepair.worker.weights.decode_delta`)::

    magic        8 bytes   b"CRDELTA\\x01"
    header_len   u32
    header       header_len bytes of UTF-8 JSON:
                 {"format": "coderepair.v1.WeightDelta",
                  "tensors": [{"name": str, "dtype": "F32"|"BF16"|..., "shape": [int, ...],
                               "count": int, "index_width": 1|2|4|8,
                               "index_bytes": int, "value_bytes": int}, ...]}
    sections     per tensor, in header order: index_bytes of one zstd frame, then
                 value_bytes of one zstd frame; nothing after the last section.

The index frame holds `count` unsigned integers of `index_width` bytes: the first changed
flat index, then the gaps between consecutive ones (each >= 1), so runs of changes become
runs of small numbers that zstd shrinks to almost nothing. The value frame holds the
`count` new values as raw bytes of the dtype, byte-shuffled (all first bytes, then all
second bytes, ...), which groups the sign/exponent bytes of floats together and compresses
far better than interleaved values. Unchanged tensors are not listed; every listed tensor
has `count >= 1`. Each frame declares its decompressed size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import zstandard
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import save as safetensors_save

from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import PolicyManifest, ShardInfo, sign_manifest

__all__ = [
    "DELTA_FORMAT",
    "DELTA_MAGIC",
    "DTYPE_CODES",
    "MANIFEST_NAME",
    "DeltaRecord",
    "LocalDirectorySink",
    "ObjectSink",
    "PublishError",
    "PublishedVersion",
    "Publisher",
    "PublisherConfig",
    "diff_tensor",
    "encode_delta",
    "snapshot",
    "tokenizer_sha256",
]

DELTA_MAGIC = b"CRDELTA\x01"
DELTA_FORMAT = "coderepair.v1.WeightDelta"
MANIFEST_NAME = "manifest.json"
"""Name of the signed manifest inside a version's prefix (next to its shards)."""

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""Dtypes a delta can carry, by their safetensors names."""

# Comparing and gathering raw bits goes through an integer view of the same width.
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PUBLISH_DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_KEY_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,127}")
_HEADER_LEN = struct.Struct("<I")
# Files whose bytes define how text becomes token ids (hashed into every manifest).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


class PublishError(ProtocolError):
    """A version cannot be published as asked (bad state dict, version order, sink)."""


# ---------------------------------------------------------------- object sinks


class ObjectSink(Protocol):
    """Where published files go. `coderepair.coordinator.storage.objects.ObjectStore`
    (local directory or S3) satisfies this as it is; the trainer does not import it, so
    the trainer distribution does not depend on the coordinator."""

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` (a relative '/'-separated path), atomically."""


class LocalDirectorySink:
    """Objects as files under `root`, each written to a temporary file and renamed into
    place, so a reader never sees a half-written shard or manifest."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file a key is stored in."""
        segments = key.split("/")
        if not all(_KEY_SEGMENT.fullmatch(s) for s in segments):
            raise PublishError(
                f"object key {key!r} is not a safe relative path: use segments of "
                "[A-Za-z0-9._=-] separated by single '/', not starting with '.' or '-'"
            )
        return self.root.joinpath(*segments)

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------- configuration


class PublisherConfig(BaseModel):
    """How a run publishes its policy versions."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    run_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """Training run identifier (1-128 characters of [A-Za-z0-9._-]); part of every key."""
    base_model: str = Field(min_length=1, max_length=256)
    """Base model id written into every manifest (e.g. a Hugging Face repo id)."""
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the tokenizer files (`tokenizer_sha256(model_dir)`), lowercase hex."""
    full_every: int = Field(default=10, ge=1, le=1_000_000)
    """Publish a full checkpoint every this many versions (1: always full). A worker that
    falls behind or joins late needs the last full version plus the deltas after it."""
    compression_level: int = Field(default=3, ge=1, le=22)
    """zstd level for delta sections (3 is fast; 19 squeezes ~10% more, ~20x slower)."""
    shard_size_bytes: int = Field(default=512 * 1024 * 1024, ge=4096)
    """Target size of one shard file; a single tensor larger than this gets its own shard."""
    publish_dtype: Literal["keep", "float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of published floating-point tensors (default 'bfloat16'). The trainer keeps
    fp32 master weights; workers get them rounded to bf16, as GPU inference runs them
    anyway. bf16 halves full checkpoints and makes deltas sparse at RL learning rates
    (bench/trainer.py: 127x smaller than a full checkpoint over 20 steps): AdamW moves
    nearly every fp32 element every step, so fp32 deltas ('keep') are only ~1.1x
    smaller. 'keep' publishes the tensors as trained. Integer and bool tensors are never
    cast."""
    key_prefix: str = "runs"
    """Object-store folder under which `<run_id>/v<version>/` prefixes are created."""

    @field_validator("key_prefix")
    @classmethod
    def _safe_prefix(cls, value: str) -> str:
        if not all(_KEY_SEGMENT.fullmatch(s) for s in value.split("/")):
            raise ValueError(
                f"key_prefix {value!r} must be '/'-separated segments of [A-Za-z0-9._=-] "
                "not starting with '.' or '-', e.g. 'runs' or 'prod/runs'"
            )
        return value


# ---------------------------------------------------------------- snapshots


def tokenizer_sha256(model_dir: str | os.PathLike[str]) -> str:
    """SHA-256 over the tokenizer files present in a model directory (name and bytes)."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    found = False
    for name in _TOKENIZER_FILES:
        path = root / name
        if path.is_file():
            data = path.read_bytes()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
            found = True
    if not found:
        raise PublishError(
            f"{root} holds none of the tokenizer files {list(_TOKENIZER_FILES)}: pass the "
            "directory the tokenizer was saved to (save_pretrained)"
        )
    return digest.hexdigest()


def snapshot(
    state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """CPU, contiguous, owned copies of `state_dict`, floats cast to `dtype` if given.

    Names that alias an earlier tensor's storage (tied input and output embeddings) are
    dropped, as `save_pretrained` does: the worker's model ties them again on load, and
    safetensors refuses shared storage.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not name:
            raise PublishError(f"state dict key {name!r} is not a non-empty string")
        if not isinstance(tensor, torch.Tensor):
            raise PublishError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in DTYPE_CODES:
            raise PublishError(
                f"{name!r} has dtype {tensor.dtype}, which deltas cannot carry (supported: "
                f"{sorted(DTYPE_CODES.values())}): cast it before publishing"
            )
        alias = (
            tensor.untyped_storage().data_ptr(),
            int(tensor.storage_offset()),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if tensor.numel() > 0 and alias in seen:
            continue
        seen.add(alias)
        value = tensor.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[name] = value.to("cpu", copy=True).contiguous()
    if not out:
        raise PublishError("the state dict is empty: nothing to publish")
    return out


def _layout(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def _pack(sizes: Mapping[str, int], shard_size: int) -> list[list[str]]:
    """Group names, in order, into shards of at most `shard_size` bytes (greedy)."""
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes.items():
        if current and used + size > shard_size:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current or not groups:
        groups.append(current)
    return groups


# ---------------------------------------------------------------- encoders


def _encode_full(
    tensors: Mapping[str, torch.Tensor], shard_size: int, metadata: dict[str, str]
) -> list[tuple[str, bytes]]:
    groups = _pack({n: t.numel() * t.element_size() for n, t in tensors.items()}, shard_size)
    files = []
    for i, names in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        files.append((name, safetensors_save({n: tensors[n] for n in names}, metadata)))
    return files


@dataclass(frozen=True)
class DeltaRecord:
    """One changed tensor of a delta: where its bits changed and what they are now."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    indices: np.ndarray  # int64, strictly increasing flat indices
    values: np.ndarray  # the new elements' raw bits, one integer per element


def diff_tensor(name: str, old: torch.Tensor, new: torch.Tensor) -> DeltaRecord | None:
    """The elements of `new` whose bits differ from `old` (same dtype and shape), or None."""
    view = _BITS_VIEW[new.element_size()]
    new_bits = new.reshape(-1).view(view)
    # Bits, not values: -0.0 vs 0.0 and NaN payloads are changes a worker must copy too.
    mask = old.reshape(-1).view(view) != new_bits
    indices = torch.nonzero(mask).reshape(-1)
    if indices.numel() == 0:
        return None
    return DeltaRecord(
        name=name,
        dtype=DTYPE_CODES[new.dtype],
        shape=tuple(new.shape),
        indices=indices.numpy(),
        values=new_bits[indices].numpy(),
    )


def _index_width(max_gap: int) -> int:
    for width in (1, 2, 4):
        if max_gap < 1 << (8 * width):
            return width
    return 8


def encode_delta(records: list[DeltaRecord], compression_level: int) -> bytes:
    """One delta shard (format in the module docstring) holding `records`."""
    compressor = zstandard.ZstdCompressor(level=compression_level, write_content_size=True)
    entries = []
    sections: list[bytes] = []
    for record in records:
        gaps = np.diff(record.indices, prepend=np.int64(0))
        width = _index_width(int(gaps.max()))
        index_frame = compressor.compress(gaps.astype(f"<u{width}").tobytes())
        itemsize = record.values.dtype.itemsize
        raw = np.ascontiguousarray(record.values).astype(record.values.dtype.newbyteorder("<"))
        shuffled = raw.view(np.uint8).reshape(-1, itemsize).T.tobytes()
        value_frame = compressor.compress(shuffled)
        entries.append(
            {
                "count": len(record.indices),
                "dtype": record.dtype,
                "index_bytes": len(index_frame),
                "index_width": width,
                "name": record.name,
                "shape": list(record.shape),
                "value_bytes": len(value_frame),
            }
        )
        sections += (index_frame, value_frame)
    header = json.dumps(
        {"format": DELTA_FORMAT, "tensors": entries}, sort_keys=True, separators=(",", ":")
    ).encode()
    return b"".join([DELTA_MAGIC, _HEADER_LEN.pack(len(header)), header, *sections])


def _encode_delta_shards(
    old: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
    shard_size: int,
    level: int,
) -> tuple[list[tuple[str, bytes]], int]:
    records = [r for n, t in new.items() if (r := diff_tensor(n, old[n], t)) is not None]
    # Shard by an estimate (8-byte index + value per element) before compression.
    sizes = {r.name: len(r.indices) * (8 + r.values.dtype.itemsize) for r in records}
    by_name = {r.name: r for r in records}
    groups = _pack(sizes, shard_size)
    files = []
    for i, names in enumerate(groups, start=1):
        name = f"delta-{i:05d}-of-{len(groups):05d}.crdelta"
        files.append((name, encode_delta([by_name[n] for n in names], level)))
    return files, sum(len(r.indices) for r in records)


# ---------------------------------------------------------------- the publisher


@dataclass(frozen=True)
class PublishedVersion:
    """What one `Publisher.publish` call stored."""

    manifest: PolicyManifest
    manifest_bytes: bytes
    """The signed manifest document: announce these bytes (PublishPolicy)."""
    prefix: str
    """Object-store folder of the version; the manifest is `<prefix>/manifest.json`."""
    shard_bytes: int
    """Bytes of all shards of this version (what a worker downloads)."""
    changed_elements: int
    """Elements whose published bits differ from the previous version (all, when full)."""
    total_elements: int
    """Elements in the published state dict."""

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def kind(self) -> Literal["full", "delta"]:
        return self.manifest.kind

    @property
    def manifest_key(self) -> str:
        return f"{self.prefix}/{MANIFEST_NAME}"


class Publisher:
    """Publishes successive versions of one run; keeps the last published tensors to diff.

    Not thread-safe: the training loop calls `publish` once per version. A new Publisher
    (after a restart) has nothing to diff against, so its first version is always full.
    """

    def __init__(
        self,
        config: PublisherConfig,
        identity: Identity,
        sink: ObjectSink,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config
        self._identity = identity
        self._sink = sink
        self._clock = clock or (lambda: datetime.now(UTC))
        self._dtype = _PUBLISH_DTYPES[config.publish_dtype]
        self._last: dict[str, torch.Tensor] | None = None
        self._last_version: int | None = None
        self._deltas_since_full = 0

    @property
    def last_version(self) -> int | None:
        """The version published last by this publisher (None before the first)."""
        return self._last_version

    def prefix(self, version: int) -> str:
        """Object-store folder of `version` (zero-padded so keys sort by version)."""
        return f"{self.config.key_prefix}/{self.config.run_id}/v{version:010d}"

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> PublishedVersion:
        """Upload `state_dict` as `version` (full or delta, see the class) and sign it."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise PublishError(f"version must be a non-negative int, got {version!r}")
        if self._last_version is not None and version <= self._last_version:
            raise PublishError(
                f"version {version} is not above the last published version "
                f"{self._last_version}: versions only go up; publish {self._last_version + 1}"
            )
        tensors = snapshot(state_dict, self._dtype)
        previous = self._last
        full = (
            previous is None
            or self._deltas_since_full + 1 >= self.config.full_every
            or _layout(previous) != _layout(tensors)  # new names/shapes: nothing to diff
        )
        total = sum(t.numel() for t in tensors.values())
        if full:
            metadata = {"format": "pt", "run_id": self.config.run_id, "version": str(version)}
            files = _encode_full(tensors, self.config.shard_size_bytes, metadata)
            changed = total
        else:
            assert previous is not None
            files, changed = _encode_delta_shards(
                previous, tensors, self.config.shard_size_bytes, self.config.compression_level
            )
        prefix = self.prefix(version)
        for name, data in files:
            self._sink.put(f"{prefix}/{name}", data)
        manifest = PolicyManifest(
            run_id=self.config.run_id,
            version=version,
            parent_version=self._last_version,
            base_model=self.config.base_model,
            tokenizer_sha256=self.config.tokenizer_sha256,
            kind="full" if full else "delta",
            shards=tuple(
                ShardInfo(name=n, size=len(d), sha256=hashlib.sha256(d).hexdigest())
                for n, d in files
            ),
            created_at=self._clock(),
            trainer_key=self._identity.public_key_hex,
        )
        manifest_bytes = sign_manifest(manifest, self._identity).to_bytes()
        # Last: once the manifest is visible, every shard it names is already stored.
        self._sink.put(f"{prefix}/{MANIFEST_NAME}", manifest_bytes)
        self._last, self._last_version = tensors, version
        self._deltas_since_full = 0 if full else self._deltas_since_full + 1
        return PublishedVersion(
            manifest=manifest,
            manifest_bytes=manifest_bytes,
            prefix=prefix,
            shard_bytes=sum(len(d) for _, d in files),
            changed_elements=changed,
            total_elements=total,
        )
