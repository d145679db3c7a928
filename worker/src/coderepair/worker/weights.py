"""Taking a new policy version: fetch the shards, verify everything, apply the delta.

`PolicyWeights` holds the worker's current policy (its manifest and state dict). Given a
signed manifest and where its shards are, `PolicyWeights.apply`

1. decodes the manifest and checks it is signed by the **pinned** trainer key,
2. checks it chains onto the version held (`verify_chain`: a delta's parent must be the
   held version; a full version may replace anything of the same run),
3. fetches every shard — from a local directory, a ``file://`` URL, or HTTP(S) (the
   coordinator or a presigned S3 URL) with resume through ``Range`` and retries — and
   checks its size and SHA-256 against the manifest,
4. decodes the shards (safetensors for a full version, the delta format of
   `coderepair.trainer.publish` for a delta) and checks every record fits the held tensors,
5. only then writes: a full version replaces the state dict, a delta overwrites the
   changed elements in place, so a refused version leaves the held policy untouched,

and returns the tensors to hand to `Engine.apply_weights` (all of them for a full
version, only the changed ones for a delta). Deltas carry new values, not differences,
so the worker ends with exactly the bits the trainer published.

Every failure is a typed `ProtocolError` whose message says what to do: the manifest's
own errors (`UntrustedTrainerKey`, `ManifestSignatureError`, `ChainError`), shard errors
(`ShardHashMismatch`, `ShardSizeMismatch`, `ShardFetchError`), and decoding errors
(`DeltaDecodeError`, `CheckpointDecodeError`, `DeltaMismatchError`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
import zstandard
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from coderepair.protocol.errors import DecodeError, ProtocolError, VerificationError
from coderepair.protocol.manifest import (
    PolicyManifest,
    ShardHashMismatch,
    ShardInfo,
    ShardSizeMismatch,
    SignedManifest,
    verify_chain,
    verify_manifest,
)

__all__ = [
    "DELTA_FORMAT",
    "DELTA_MAGIC",
    "MANIFEST_NAME",
    "CheckpointDecodeError",
    "DeltaDecodeError",
    "DeltaMismatchError",
    "DeltaTensor",
    "FetchConfig",
    "PolicyWeights",
    "ShardFetchError",
    "ShardFetcher",
    "ShardSource",
    "WeightUpdate",
    "WeightsConfig",
    "decode_checkpoint",
    "decode_delta",
]

DELTA_MAGIC = b"CRDELTA\x01"
DELTA_FORMAT = "coderepair.v1.WeightDelta"
MANIFEST_NAME = "manifest.json"

MAX_DELTA_HEADER_BYTES = 64 * 1024 * 1024
MAX_DELTA_TENSORS = 1_000_000
DEFAULT_MAX_DECODED_BYTES = 16 * 1024**3
_MAX_NDIM = 16
_MAX_NUMEL = 1 << 48
_HEADER_LEN = struct.Struct("<I")
_ENTRY_KEYS = {"count", "dtype", "index_bytes", "index_width", "name", "shape", "value_bytes"}

# safetensors dtype name -> (torch dtype, bytes per element), as written by the trainer.
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

ShardSource = str | os.PathLike[str] | Mapping[str, str | Sequence[str]]
"""Where a version's shards are: its folder (a local directory, or a ``file://`` /
``http(s)://`` URL prefix under which each shard lies by its manifest name), or a mapping
from shard name to one URL or several to try in order (presigned URLs, peers)."""


class DeltaDecodeError(DecodeError):
    """Bytes are not a well-formed weight delta shard."""


class CheckpointDecodeError(DecodeError):
    """A full-checkpoint shard is not a readable safetensors file, or shards overlap."""


class DeltaMismatchError(VerificationError):
    """A delta names a tensor the held policy lacks, or one of another dtype or shape."""


class ShardFetchError(ProtocolError):
    """A shard could not be downloaded from any of its sources."""


# ---------------------------------------------------------------- configuration


class FetchConfig(BaseModel):
    """How shards are downloaded."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """Seconds without progress (connect or read) before a download attempt is retried."""
    max_attempts: int = Field(default=5, ge=1, le=100)
    """Attempts per source for network errors; each resumes where the last one stopped."""
    backoff_s: float = Field(default=0.5, ge=0, le=60)
    """Wait before the second attempt; doubled for each further one."""
    backoff_max_s: float = Field(default=10.0, ge=0, le=600)
    """Longest wait between attempts."""
    chunk_bytes: int = Field(default=1 << 20, ge=4096, le=1 << 28)
    """Bytes read from the network per write to the partial file."""


class WeightsConfig(BaseModel):
    """What a worker trusts and where it keeps partial downloads."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    trainer_key: str
    """The pinned trainer public key, 64 hex characters (from the worker's config or shown
    and stored on first join). Manifests signed by any other key are refused."""
    cache_dir: Path
    """Folder for partial downloads (named by their SHA-256, so a restart resumes them)."""
    fetch: FetchConfig = FetchConfig()
    """Download behaviour."""
    keep_downloads: bool = False
    """Keep verified shards in `cache_dir` after applying them (e.g. to serve peers)."""

    @field_validator("trainer_key")
    @classmethod
    def _hex_key(cls, value: str) -> str:
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError(
                "trainer_key must be the trainer's Ed25519 public key as 64 hex characters "
                "(as printed by the trainer / the coordinator's run summary)"
            )
        return value


# ---------------------------------------------------------------- decoders


@dataclass(frozen=True)
class DeltaTensor:
    """The changed elements of one tensor: overwrite ``flat[indices] = values``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    indices: torch.Tensor
    """int64 flat indices, strictly increasing, each below the tensor's element count."""
    values: torch.Tensor
    """The new elements, of `dtype`, one per index."""


def _fail(message: str) -> DeltaDecodeError:
    return DeltaDecodeError(
        f"weight delta is malformed: {message}; the shard is corrupt or not a delta "
        "(download the version again, or take the latest full version)"
    )


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(f"{what} must be an integer in {low}..{high}, got {str(value)[:40]!r}")
    return value


def _parse_entry(entry: object) -> tuple[str, str, tuple[int, ...], int, int, int, int]:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise _fail(f"a tensor entry must be an object with exactly the keys {sorted(_ENTRY_KEYS)}")
    name = entry["name"]
    if not isinstance(name, str) or not 1 <= len(name) <= 1024:
        raise _fail("a tensor name must be a string of 1-1024 characters")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise _fail(f"tensor {name!r} has unknown dtype {str(dtype)[:20]!r}")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
        raise _fail(f"tensor {name!r} shape must be a list of at most {_MAX_NDIM} sizes")
    dims = tuple(_int(d, f"a dimension of {name!r}", 0, _MAX_NUMEL) for d in shape)
    numel = 1
    for d in dims:
        numel *= d
    if numel > _MAX_NUMEL:
        raise _fail(f"tensor {name!r} has {numel} elements, over the {_MAX_NUMEL} limit")
    count = _int(entry["count"], f"count of {name!r}", 1, max(numel, 1))
    if numel == 0:
        raise _fail(f"tensor {name!r} has no elements, so none can have changed")
    width = entry["index_width"]
    if width not in (1, 2, 4, 8) or isinstance(width, bool):
        raise _fail(f"index_width of {name!r} must be 1, 2, 4 or 8")
    index_bytes = _int(entry["index_bytes"], f"index_bytes of {name!r}", 1, 1 << 62)
    value_bytes = _int(entry["value_bytes"], f"value_bytes of {name!r}", 1, 1 << 62)
    return name, dtype, dims, count, width, index_bytes, value_bytes


def _decompress(frame: bytes, expected: int, what: str) -> bytes:
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError as exc:
        raise _fail(f"{what} is not a zstd frame ({exc})") from exc
    if declared != expected:
        raise _fail(f"{what} declares {declared} bytes, the header implies {expected}")
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = decompressor.decompress(frame)
    except zstandard.ZstdError as exc:
        raise _fail(f"{what} does not decompress ({exc})") from exc
    except MemoryError as exc:
        raise _fail(f"{what} is too large to decompress in this machine's memory") from exc
    if not decompressor.eof or decompressor.unused_data or len(out) != expected:
        raise _fail(f"{what} is truncated or followed by stray bytes")
    return out


def _decode_indices(raw: bytes, width: int, count: int, numel: int, name: str) -> torch.Tensor:
    gaps = np.frombuffer(raw, dtype=f"<u{width}").astype(np.uint64)
    if count > 1 and int(gaps[1:].min()) == 0:
        raise _fail(f"indices of {name!r} are not strictly increasing")
    if int(gaps.max()) >= numel:
        raise _fail(f"an index of {name!r} is beyond its {numel} elements")
    # Each gap < numel, but their sum could still wrap int64: bound it in float first.
    if float(gaps.sum(dtype=np.float64)) >= numel + 1:
        raise _fail(f"indices of {name!r} run beyond its {numel} elements")
    indices = np.cumsum(gaps.astype(np.int64))
    if int(indices[-1]) >= numel:
        raise _fail(f"indices of {name!r} run beyond its {numel} elements")
    return torch.from_numpy(indices)


def _decode_values(raw: bytes, dtype: str, count: int, name: str) -> torch.Tensor:
    torch_dtype, itemsize = _DTYPES[dtype]
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, count)
    interleaved = np.array(planes.T, order="C").reshape(-1)  # a writable copy
    if dtype == "BOOL" and int(interleaved.max()) > 1:
        raise _fail(f"values of bool tensor {name!r} must be 0 or 1")
    bits = torch.from_numpy(interleaved.view(f"<{'u' if itemsize == 1 else 'i'}{itemsize}"))
    return bits.view(torch_dtype)


def decode_delta(
    data: bytes,
    *,
    expected: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> list[DeltaTensor]:
    """Decode one delta shard (format: `coderepair.trainer.publish`).

    `expected` (name -> dtype and shape of the held tensors) is checked against the header
    before anything is decompressed: a mismatch raises `DeltaMismatchError`. Malformed
    bytes always raise `DeltaDecodeError`; nothing else escapes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _fail(f"expected bytes, got {type(data).__name__}")
    buf = bytes(data)
    fixed = len(DELTA_MAGIC) + _HEADER_LEN.size
    if len(buf) < fixed or not buf.startswith(DELTA_MAGIC):
        raise _fail(f"it does not start with the magic bytes {DELTA_MAGIC!r}")
    (header_len,) = _HEADER_LEN.unpack_from(buf, len(DELTA_MAGIC))
    if header_len > min(MAX_DELTA_HEADER_BYTES, len(buf) - fixed):
        raise _fail(f"header length {header_len} runs past the {len(buf)}-byte shard")
    try:
        header = json.loads(buf[fixed : fixed + header_len].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _fail(f"header is not UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict) or set(header) != {"format", "tensors"}:
        raise _fail("header must be an object with exactly the keys 'format' and 'tensors'")
    if header["format"] != DELTA_FORMAT:
        raise _fail(
            f"format is {str(header['format'])[:60]!r}, expected {DELTA_FORMAT!r} (a newer "
            "trainer may need a newer coderepair-worker)"
        )
    entries = header["tensors"]
    if not isinstance(entries, list) or len(entries) > MAX_DELTA_TENSORS:
        raise _fail(f"'tensors' must be a list of at most {MAX_DELTA_TENSORS} entries")
    parsed = [_parse_entry(e) for e in entries]
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise _fail("a tensor is listed twice")
    body = sum(p[5] + p[6] for p in parsed)
    if fixed + header_len + body != len(buf):
        raise _fail(
            f"sections add up to {fixed + header_len + body} bytes but the shard has {len(buf)}"
        )
    decoded = sum(p[3] * (p[4] + _DTYPES[p[1]][1]) for p in parsed)
    if decoded > max_decoded_bytes:
        raise _fail(f"it would decode to {decoded} bytes, over the {max_decoded_bytes} limit")
    if expected is not None:
        for name, dtype, shape, *_ in parsed:
            _check_fits(name, _DTYPES[dtype][0], shape, expected)
    out = []
    offset = fixed + header_len
    for name, dtype, shape, count, width, index_bytes, value_bytes in parsed:
        numel = math.prod(shape)
        raw_idx = _decompress(buf[offset : offset + index_bytes], count * width, f"{name} indices")
        offset += index_bytes
        itemsize = _DTYPES[dtype][1]
        raw_val = _decompress(
            buf[offset : offset + value_bytes], count * itemsize, f"{name} values"
        )
        offset += value_bytes
        out.append(
            DeltaTensor(
                name=name,
                dtype=_DTYPES[dtype][0],
                shape=shape,
                indices=_decode_indices(raw_idx, width, count, numel, name),
                values=_decode_values(raw_val, dtype, count, name),
            )
        )
    return out


def _check_fits(
    name: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    held: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
) -> None:
    if name not in held:
        raise DeltaMismatchError(
            f"the delta changes {name!r}, which the held policy does not have: it was made "
            "for another model; fetch the latest full version"
        )
    held_dtype, held_shape = held[name]
    if (dtype, shape) != (held_dtype, held_shape):
        raise DeltaMismatchError(
            f"the delta has {name!r} as {dtype} {list(shape)}, the held policy as "
            f"{held_dtype} {list(held_shape)}: fetch the latest full version"
        )


def decode_checkpoint(data: bytes) -> dict[str, torch.Tensor]:
    """Decode one safetensors shard of a full checkpoint; `CheckpointDecodeError` if not."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CheckpointDecodeError(f"expected bytes, got {type(data).__name__}")
    try:
        tensors: dict[str, torch.Tensor] = safetensors_load(bytes(data))
    except (SafetensorError, ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise CheckpointDecodeError(
            f"checkpoint shard is not a readable safetensors file ({str(exc)[:200]}): "
            "download the version again"
        ) from exc
    except MemoryError as exc:
        raise CheckpointDecodeError(
            "checkpoint shard is too large for this machine's memory"
        ) from exc
    return tensors


# ---------------------------------------------------------------- fetching


def _verify_bytes(data: bytes, shard: ShardInfo, origin: str) -> None:
    if len(data) != shard.size:
        raise ShardSizeMismatch(
            f"shard {shard.name} from {origin} is {len(data)} bytes but the manifest says "
            f"{shard.size}: the copy is incomplete; fetch it again"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise ShardHashMismatch(
            f"shard {shard.name} from {origin} has sha256 {digest[:16]}… but the manifest "
            f"says {shard.sha256[:16]}…: the copy is corrupt or was tampered with; fetch it "
            "again, from another source if this one keeps serving it"
        )


class _Retry(Exception):
    """A download attempt failed in a way worth retrying (network, 5xx)."""


class ShardFetcher:
    """Gets a shard's verified bytes from a path, ``file://`` or HTTP(S) URL."""

    def __init__(
        self,
        config: FetchConfig,
        cache_dir: Path,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.partial_dir = Path(cache_dir) / "partial"
        self._sleep = sleep

    def partial_path(self, shard: ShardInfo) -> Path:
        """Where a download of `shard` accumulates (named by its hash, so only the same
        bytes are ever resumed)."""
        return self.partial_dir / f"{shard.sha256}.part"

    def fetch(self, shard: ShardInfo, sources: Sequence[str]) -> bytes:
        """The shard's bytes from the first source that serves them intact."""
        if not sources:
            raise ShardFetchError(f"no source given for shard {shard.name}")
        errors: list[ProtocolError] = []
        for source in sources:
            try:
                return self._fetch_one(shard, source)
            except (ShardFetchError, ShardHashMismatch, ShardSizeMismatch) as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        reasons = "; ".join(str(e) for e in errors)
        raise ShardFetchError(f"every source of shard {shard.name} failed: {reasons}")

    def _fetch_one(self, shard: ShardInfo, source: str) -> bytes:
        scheme = urllib.parse.urlsplit(source).scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch_http(shard, source)
        if scheme == "file":
            path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path))
        elif not scheme or (len(scheme) == 1 and os.name == "nt"):  # C:\... on Windows
            path = Path(source)
        else:
            raise ShardFetchError(
                f"cannot fetch shard {shard.name} from {source!r}: only local paths, file:// "
                "and http(s):// URLs are supported"
            )
        try:
            with path.open("rb") as handle:
                data = handle.read(shard.size + 1)
        except OSError as exc:
            raise ShardFetchError(
                f"cannot read shard {shard.name} at {path}: {exc.strerror or exc}; check the "
                "weights folder the worker was pointed at"
            ) from exc
        _verify_bytes(data, shard, str(path))
        return data

    def _fetch_http(self, shard: ShardInfo, url: str) -> bytes:
        part = self.partial_path(shard)
        part.parent.mkdir(parents=True, exist_ok=True)
        shown = urllib.parse.urlsplit(url)._replace(query="").geturl()  # no presigned secrets
        # A second full download after a hash mismatch: a resumed file may have spliced a
        # stale or corrupted first part; a fresh one tells a corrupt source from bad luck.
        for fresh in (False, True):
            if fresh:
                part.unlink(missing_ok=True)
            self._download(shard, url, part, shown)
            data = part.read_bytes()
            try:
                _verify_bytes(data, shard, shown)
            except ShardHashMismatch:
                part.unlink(missing_ok=True)
                if fresh:
                    raise
                continue
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    def _download(self, shard: ShardInfo, url: str, part: Path, shown: str) -> None:
        cfg = self.config
        last: Exception | None = None
        for attempt in range(cfg.max_attempts):
            if attempt:
                self._sleep(min(cfg.backoff_s * 2 ** (attempt - 1), cfg.backoff_max_s))
            have = part.stat().st_size if part.exists() else 0
            if have > shard.size:
                part.unlink()
                have = 0
            if have == shard.size:
                return
            try:
                self._attempt(shard, url, part, have)
            except _Retry as exc:
                last = exc
                continue
            if part.stat().st_size == shard.size:
                return
            last = _Retry(f"connection closed at byte {part.stat().st_size} of {shard.size}")
        raise ShardFetchError(
            f"could not download shard {shard.name} from {shown} in {cfg.max_attempts} "
            f"attempts (last error: {last}): check the network; the partial download is kept "
            "and resumes on the next try"
        )

    def _attempt(self, shard: ShardInfo, url: str, part: Path, have: int) -> None:
        headers = {"Range": f"bytes={have}-"} if have else {}
        request = urllib.request.Request(url, headers=headers)
        try:
            response: Any = urllib.request.urlopen(request, timeout=self.config.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416:  # our partial file is not a prefix of this object
                part.unlink(missing_ok=True)
                raise _Retry("the server refused the resume range") from exc
            if exc.code >= 500 or exc.code in (408, 429):
                raise _Retry(f"HTTP {exc.code}") from exc
            raise ShardFetchError(
                f"the server refused shard {shard.name} with HTTP {exc.code} {exc.reason}: "
                "the URL may have expired (ask the coordinator for fresh URLs) or the version "
                "was deleted (fetch the latest manifest)"
            ) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _Retry(str(exc)) from exc
        with response:
            mode = "ab"
            if have and response.status != 206:
                mode = "wb"  # the server ignored Range and sends the whole object
            elif have and not _range_starts_at(response.headers.get("Content-Range"), have):
                part.unlink(missing_ok=True)
                raise _Retry("the server answered a different range than asked")
            written = 0 if mode == "wb" else have
            try:
                with part.open(mode) as out:
                    while chunk := response.read(self.config.chunk_bytes):
                        written += len(chunk)
                        if written > shard.size:
                            break
                        out.write(chunk)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retry(f"transfer interrupted: {exc}") from exc
            if written > shard.size:
                part.unlink(missing_ok=True)
                raise ShardSizeMismatch(
                    f"shard {shard.name} is longer than the manifest's "
                    f"{shard.size} bytes: the source serves another file; fetch the latest "
                    "manifest"
                )


def _range_starts_at(content_range: str | None, start: int) -> bool:
    if not content_range or not content_range.startswith("bytes "):
        return False
    first = content_range[len("bytes ") :].split("-", 1)[0]
    return first.isdigit() and int(first) == start


def _sources(source: ShardSource, name: str) -> list[str]:
    if isinstance(source, Mapping):
        urls = source.get(name)
        if urls is None:
            raise ShardFetchError(
                f"no URL given for shard {name}: the coordinator's shard list does not match "
                "the manifest; fetch the policy info again"
            )
        return [urls] if isinstance(urls, str) else list(urls)
    base = os.fspath(source)
    if "://" in base:
        return [base.rstrip("/") + "/" + urllib.parse.quote(name)]
    return [str(Path(base).joinpath(*name.split("/")))]


# ---------------------------------------------------------------- the held policy


@dataclass(frozen=True)
class WeightUpdate:
    """The result of taking one version."""

    manifest: PolicyManifest
    tensors: Mapping[str, torch.Tensor]
    """For `Engine.apply_weights`: every tensor (full) or only the changed ones (delta).
    These are the worker's held tensors: engines copy from them and must not keep them."""
    changed_elements: int
    download_bytes: int

    @property
    def kind(self) -> Literal["full", "delta"]:
        return self.manifest.kind


class PolicyWeights:
    """The policy a worker holds: its manifest and state dict. Not thread-safe."""

    def __init__(
        self,
        config: WeightsConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._pinned = bytes.fromhex(config.trainer_key)
        self._fetcher = ShardFetcher(config.fetch, config.cache_dir, sleep=sleep)
        self._held: PolicyManifest | None = None
        self._state: dict[str, torch.Tensor] = {}

    @property
    def held(self) -> PolicyManifest | None:
        """The manifest of the version held, None before the first full version."""
        return self._held

    @property
    def state_dict(self) -> Mapping[str, torch.Tensor]:
        """The held tensors (read-only mapping; do not modify the tensors)."""
        return MappingProxyType(self._state)

    def apply(self, manifest_bytes: bytes, source: ShardSource) -> WeightUpdate:
        """Verify, fetch and take the version `manifest_bytes` describes (see module doc)."""
        manifest = verify_manifest(SignedManifest.from_bytes(manifest_bytes), self._pinned)
        verify_chain(self._held, manifest)
        blobs = [
            self._fetcher.fetch(shard, _sources(source, shard.name)) for shard in manifest.shards
        ]
        download = sum(len(b) for b in blobs)
        if manifest.kind == "full":
            state: dict[str, torch.Tensor] = {}
            for shard, blob in zip(manifest.shards, blobs, strict=True):
                tensors = decode_checkpoint(blob)
                overlap = state.keys() & tensors.keys()
                if overlap:
                    raise CheckpointDecodeError(
                        f"shard {shard.name} repeats tensor {sorted(overlap)[0]!r} of an "
                        "earlier shard: the version is malformed; report it to the operator"
                    )
                state.update(tensors)
            self._state, self._held = state, manifest
            self._cleanup(manifest)
            return WeightUpdate(
                manifest=manifest,
                tensors=MappingProxyType(state),
                changed_elements=sum(t.numel() for t in state.values()),
                download_bytes=download,
            )
        layout = {n: (t.dtype, tuple(t.shape)) for n, t in self._state.items()}
        records: list[DeltaTensor] = []
        for shard, blob in zip(manifest.shards, blobs, strict=True):
            for record in decode_delta(blob, expected=layout):
                if any(r.name == record.name for r in records):
                    raise DeltaDecodeError(
                        f"shard {shard.name} repeats tensor {record.name!r}: the version is "
                        "malformed; fetch the latest full version"
                    )
                records.append(record)
        # Everything decoded and checked: from here on nothing can fail half-way.
        for record in records:
            flat = self._state[record.name].view(-1)
            view = _BITS_VIEW[flat.element_size()]
            flat.view(view)[record.indices] = record.values.view(view)
        self._held = manifest
        self._cleanup(manifest)
        return WeightUpdate(
            manifest=manifest,
            tensors=MappingProxyType({r.name: self._state[r.name] for r in records}),
            changed_elements=sum(int(r.indices.numel()) for r in records),
            download_bytes=download,
        )

    def apply_dir(self, version_dir: str | os.PathLike[str]) -> WeightUpdate:
        """Take the version stored in a local folder (its manifest.json and shards)."""
        path = Path(version_dir) / MANIFEST_NAME
        try:
            manifest_bytes = path.read_bytes()
        except OSError as exc:
            raise ShardFetchError(
                f"cannot read {path}: {exc.strerror or exc}; point the worker at a version "
                "folder written by the trainer's publisher"
            ) from exc
        return self.apply(manifest_bytes, version_dir)

    def _cleanup(self, manifest: PolicyManifest) -> None:
        if self.config.keep_downloads:
            return
        for shard in manifest.shards:
            self._fetcher.partial_path(shard).unlink(missing_ok=True)
