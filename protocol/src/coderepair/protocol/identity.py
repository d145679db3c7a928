"""Ed25519 identities and signed envelopes.

Every party (worker, coordinator, trainer) is an Ed25519 key. A state-changing request
travels as an `Envelope`: the payload bytes plus the signer's public key, a purpose
string (domain separation: a signature made for ``coderepair.v1.Register`` can never
be passed off as one for ``coderepair.v1.SubmitRollouts``), a timestamp, a random nonce
and the signature over all of them. `EnvelopeVerifier` rejects bad signatures, the
wrong purpose, clock skew beyond a bound and replayed nonces.

Wire format of `Envelope.to_bytes()` (big-endian, version 1)::

    magic        4 bytes  b"CREV"
    version      1 byte   1
    purpose_len  1 byte   1..128
    purpose      purpose_len bytes of ASCII
    signer       32 bytes raw Ed25519 public key
    timestamp_ms 8 bytes  unsigned, < 2**63
    nonce        16 bytes
    payload_len  4 bytes  <= MAX_PAYLOAD_BYTES
    payload      payload_len bytes
    signature    64 bytes Ed25519

Every field has a fixed size or an explicit length, and trailing bytes are an error,
so one byte string decodes to at most one envelope.

Key files are PKCS#8 PEM, created with mode 0600 in a 0700 directory and refused
(like ssh does) when group or others may access them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from coderepair.protocol.errors import DecodeError, ProtocolError, VerificationError

__all__ = [
    "ENVELOPE_MAGIC",
    "ENVELOPE_VERSION",
    "MAX_PAYLOAD_BYTES",
    "MAX_PURPOSE_BYTES",
    "NONCE_BYTES",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "BadSignature",
    "ClockSkew",
    "Envelope",
    "EnvelopeDecodeError",
    "EnvelopeVerifier",
    "Identity",
    "InsecureKeyFile",
    "KeyFileError",
    "KeyFileExists",
    "KeyFileNotFound",
    "ReplayedNonce",
    "WrongPurpose",
    "fingerprint",
    "verify_detached",
]

ENVELOPE_MAGIC = b"CREV"
ENVELOPE_VERSION = 1
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 16
MAX_PURPOSE_BYTES = 128
# gRPC's own default message limit is 4 MiB; this bound only stops a length field from
# making a decoder allocate or wait for absurd amounts of data.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
_MAX_TIMESTAMP_MS = 2**63 - 1  # fits a signed 64-bit database column
_MAX_KEY_FILE_BYTES = 64 * 1024

# Purposes are identifiers like "coderepair.v1.Register": printable, no spaces, so
# they can be logged and compared without any normalisation question.
_PURPOSE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")

# Signing-bytes prefixes: distinct from each other and from the wire magic, so a
# signature over one kind of message can never verify as another kind.
_ENVELOPE_SIGNING_PREFIX = b"coderepair/envelope/v1\x00"
_DETACHED_SIGNING_PREFIX = b"coderepair/detached/v1\x00"

_HEADER = struct.Struct(">4sBB")  # magic, version, purpose_len
_MIDDLE = struct.Struct(">32sQ16sI")  # signer, timestamp_ms, nonce, payload_len


class EnvelopeDecodeError(DecodeError):
    """Bytes are not a well-formed envelope (or an `Envelope` was built from bad fields)."""


class BadSignature(VerificationError):
    """The signature does not verify under the signer's public key."""


class WrongPurpose(VerificationError):
    """The envelope was signed for a different purpose than the one being verified."""


class ClockSkew(VerificationError):
    """The envelope's timestamp is too far in the past or the future."""


class ReplayedNonce(VerificationError):
    """The same (signer, nonce) pair was already accepted within the replay window."""


class KeyFileError(ProtocolError):
    """A key file cannot be created or loaded."""


class KeyFileNotFound(KeyFileError):
    """No key file exists at the given path."""


class KeyFileExists(KeyFileError):
    """A key file already exists where a new one was to be created."""


class InsecureKeyFile(KeyFileError):
    """The key file's permissions let group or others access it."""


def fingerprint(public_key: bytes) -> str:
    """Short hex fingerprint of a public key for display (first 8 bytes of its SHA-256)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def _lp(data: bytes) -> bytes:
    """Length-prefix `data` with a u64 so concatenations are unambiguous."""
    return struct.pack(">Q", len(data)) + data


def _detached_signing_bytes(purpose: str, message: bytes) -> bytes:
    return _DETACHED_SIGNING_PREFIX + _lp(purpose.encode("ascii")) + _lp(message)


def _check_purpose(purpose: object) -> str | None:
    """Return why `purpose` is unusable, or None when it is fine."""
    if not isinstance(purpose, str):
        return f"purpose must be a str, got {type(purpose).__name__}"
    if not _PURPOSE_RE.fullmatch(purpose):
        return (
            f"purpose {purpose[:40]!r} is not an identifier: use 1-{MAX_PURPOSE_BYTES} "
            "characters of [A-Za-z0-9._:/-], e.g. 'coderepair.v1.Register'"
        )
    return None


def verify_detached(public_key: bytes, purpose: str, message: bytes, signature: bytes) -> None:
    """Check a detached signature made by `Identity.sign_detached`; raise `BadSignature`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
        key.verify(signature, _detached_signing_bytes(purpose, message))
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise BadSignature(
            f"signature for purpose {purpose!r} does not verify under key "
            f"{fingerprint(public_key)}: the data was altered or signed by another key"
        ) from exc


@dataclass(frozen=True, repr=False)
class Envelope:
    """A signed, timestamped, nonced payload. Build one with `Identity.sign`."""

    payload: bytes
    signer: bytes
    purpose: str
    timestamp_ms: int
    nonce: bytes
    signature: bytes

    def __post_init__(self) -> None:
        problem = self._field_problem()
        if problem is not None:
            raise EnvelopeDecodeError(f"malformed envelope: {problem}")

    def _field_problem(self) -> str | None:
        for name, size in (
            ("signer", PUBLIC_KEY_BYTES),
            ("nonce", NONCE_BYTES),
            ("signature", SIGNATURE_BYTES),
        ):
            value = getattr(self, name)
            if not isinstance(value, bytes):
                return f"{name} must be bytes, got {type(value).__name__}"
            if len(value) != size:
                return f"{name} must be {size} bytes, got {len(value)}"
        if not isinstance(self.payload, bytes):
            return f"payload must be bytes, got {type(self.payload).__name__}"
        if len(self.payload) > MAX_PAYLOAD_BYTES:
            return f"payload is {len(self.payload)} bytes, over the {MAX_PAYLOAD_BYTES} limit"
        purpose_problem = _check_purpose(self.purpose)
        if purpose_problem is not None:
            return purpose_problem
        ts = self.timestamp_ms
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= _MAX_TIMESTAMP_MS:
            return f"timestamp_ms must be an int in [0, 2**63), got {ts!r}"
        return None

    def __repr__(self) -> str:
        # Payloads can be megabytes; show sizes and the signer's fingerprint only.
        return (
            f"Envelope(purpose={self.purpose!r}, signer={fingerprint(self.signer)}, "
            f"timestamp_ms={self.timestamp_ms}, payload={len(self.payload)} bytes)"
        )

    def signing_bytes(self) -> bytes:
        """The exact bytes the signature covers: every field but the signature."""
        return (
            _ENVELOPE_SIGNING_PREFIX
            + _lp(self.purpose.encode("ascii"))
            + _lp(self.signer)
            + struct.pack(">Q", self.timestamp_ms)
            + _lp(self.nonce)
            + _lp(self.payload)
        )

    def to_bytes(self) -> bytes:
        """Encode in the versioned binary wire format described in the module docstring."""
        purpose = self.purpose.encode("ascii")
        return b"".join(
            (
                _HEADER.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, len(purpose)),
                purpose,
                _MIDDLE.pack(self.signer, self.timestamp_ms, self.nonce, len(self.payload)),
                self.payload,
                self.signature,
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Decode `to_bytes()` output; raise `EnvelopeDecodeError` on anything malformed."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise EnvelopeDecodeError(f"envelope must be bytes, got {type(data).__name__}")
        buf = bytes(data)
        if len(buf) < _HEADER.size:
            raise EnvelopeDecodeError(
                f"envelope truncated: {len(buf)} bytes is shorter than its {_HEADER.size}-byte "
                "header"
            )
        magic, version, purpose_len = _HEADER.unpack_from(buf, 0)
        if magic != ENVELOPE_MAGIC:
            raise EnvelopeDecodeError(
                f"not an envelope: magic is {magic!r}, expected {ENVELOPE_MAGIC!r}"
            )
        if version != ENVELOPE_VERSION:
            raise EnvelopeDecodeError(
                f"envelope version {version} is not supported (this build reads version "
                f"{ENVELOPE_VERSION}): upgrade coderepair-protocol on the older side"
            )
        if not 1 <= purpose_len <= MAX_PURPOSE_BYTES:
            raise EnvelopeDecodeError(
                f"purpose length {purpose_len} is outside 1..{MAX_PURPOSE_BYTES}"
            )
        offset = _HEADER.size
        fixed_end = offset + purpose_len + _MIDDLE.size
        if len(buf) < fixed_end:
            raise EnvelopeDecodeError(
                f"envelope truncated: {len(buf)} bytes, its fixed fields need {fixed_end}"
            )
        try:
            purpose = buf[offset : offset + purpose_len].decode("ascii")
        except UnicodeDecodeError as exc:
            raise EnvelopeDecodeError("envelope purpose is not ASCII") from exc
        signer, timestamp_ms, nonce, payload_len = _MIDDLE.unpack_from(buf, offset + purpose_len)
        if payload_len > MAX_PAYLOAD_BYTES:
            raise EnvelopeDecodeError(
                f"payload length {payload_len} is over the {MAX_PAYLOAD_BYTES}-byte limit"
            )
        expected = fixed_end + payload_len + SIGNATURE_BYTES
        if len(buf) != expected:
            what = "truncated" if len(buf) < expected else "followed by trailing bytes"
            raise EnvelopeDecodeError(
                f"envelope {what}: {len(buf)} bytes, its length fields say {expected}"
            )
        payload = buf[fixed_end : fixed_end + payload_len]
        signature = buf[fixed_end + payload_len :]
        # The constructor re-checks purpose charset and timestamp range.
        return cls(
            payload=payload,
            signer=signer,
            purpose=purpose,
            timestamp_ms=timestamp_ms,
            nonce=nonce,
            signature=signature,
        )


class Identity:
    """An Ed25519 private key. Its repr and str show only the public fingerprint."""

    __slots__ = ("_private_key", "_public_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (not saved anywhere)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Load a key file, refusing one that group or others may access."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise KeyFileNotFound(
                f"no key file at {path}: create one with Identity.create (the CLIs do this "
                "on first use)"
            ) from exc
        except OSError as exc:
            raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from exc
        try:
            # fstat on the open descriptor: the mode checked is the mode of what is read.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"key file {path} is not a regular file")
            if os.name == "posix" and st.st_mode & 0o077:
                raise InsecureKeyFile(
                    f"permissions {stat.S_IMODE(st.st_mode):04o} for key file {path} are too "
                    f"open: a private key must be readable by its owner only. Run "
                    f"`chmod 600 {path}`"
                )
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(_MAX_KEY_FILE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > _MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"key file {path} is over {_MAX_KEY_FILE_BYTES} bytes: not a key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(
                f"key file {path} is not an unencrypted PKCS#8 PEM private key: restore it "
                "from a backup or move it away to create a new identity"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> Identity:
        """Generate a key and write it to a new file (mode 0600); never overwrite one."""
        path = Path(path)
        identity = cls.generate()
        pem = identity._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_new_secret_file(path, pem)
        return identity

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at `path`, creating it first if there is none."""
        try:
            return cls.load(path)
        except KeyFileNotFound:
            pass
        try:
            return cls.create(path)
        except KeyFileExists:
            # Another process created it between our two calls: use theirs.
            return cls.load(path)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public_key

    @property
    def public_key_hex(self) -> str:
        """The public key as 64 lowercase hex characters."""
        return self._public_key.hex()

    @property
    def key_id(self) -> str:
        """Short hex fingerprint of the public key, for display."""
        return fingerprint(self._public_key)

    def __repr__(self) -> str:
        return f"Identity(key_id={self.key_id})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        # Pickling would copy the private key into queues, caches and crash dumps.
        raise TypeError("Identity cannot be pickled: load it from its key file instead")

    def sign(self, purpose: str, payload: bytes, *, now_ms: int | None = None) -> Envelope:
        """Sign `payload` for `purpose` with the current (or given) time and a fresh nonce."""
        problem = _check_purpose(purpose)
        if problem is not None:
            raise ValueError(problem)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(
                f"payload is {len(payload)} bytes, over MAX_PAYLOAD_BYTES={MAX_PAYLOAD_BYTES}"
            )
        timestamp_ms = int(time.time() * 1000) if now_ms is None else now_ms
        unsigned = Envelope(
            payload=bytes(payload),
            signer=self._public_key,
            purpose=purpose,
            timestamp_ms=timestamp_ms,
            nonce=secrets.token_bytes(NONCE_BYTES),
            signature=bytes(SIGNATURE_BYTES),
        )
        signature = self._private_key.sign(unsigned.signing_bytes())
        return Envelope(
            payload=unsigned.payload,
            signer=unsigned.signer,
            purpose=purpose,
            timestamp_ms=timestamp_ms,
            nonce=unsigned.nonce,
            signature=signature,
        )

    def sign_detached(self, purpose: str, message: bytes) -> bytes:
        """A 64-byte signature over (purpose, message), for documents that carry no
        timestamp or nonce (policy manifests). Check it with `verify_detached`."""
        problem = _check_purpose(purpose)
        if problem is not None:
            raise ValueError(problem)
        return self._private_key.sign(_detached_signing_bytes(purpose, message))


def _write_new_secret_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600, atomically, failing if `path` exists.

    The bytes go to a temporary file created 0600 (O_EXCL, so never someone else's file)
    and are fsynced; a hard link then publishes them under the final name, which is
    atomic and never replaces an existing file. Readers thus see no file or a whole one.
    """
    parent = path.parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        raise KeyFileExists(
            f"a key file already exists at {path}: load it, or move it away to create a new one"
        )
    tmp = parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            with os.fdopen(fd, "wb", closefd=False) as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise KeyFileExists(
                f"a key file already exists at {path}: load it, or move it away to create a new one"
            ) from exc
        except OSError:
            # Filesystems without hard links: create the final name exclusively instead
            # (a crash mid-write could leave a partial file, which `load` then rejects).
            _write_exclusive(path, data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(parent)


def _write_exclusive(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileExists(f"a key file already exists at {path}") from exc
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    # Makes the new directory entry durable; not possible on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class EnvelopeVerifier:
    """Verifies envelopes: signature, purpose, clock skew, replay. Thread-safe.

    Replay cache bound: an envelope passes the skew check only while the verifier's
    clock is within ``max_clock_skew_s`` of its timestamp. An envelope accepted at
    time t has a timestamp >= t - skew, so from t + 2 x skew on it (and any envelope
    with that timestamp) fails the skew check on its own. Remembering each accepted
    (signer, nonce) for 2 x skew after acceptance therefore catches every replay, and
    the cache never holds more than (accepted envelopes per second) x 2 x skew entries.
    Only envelopes whose signature verified enter the cache, so forged traffic cannot
    grow it. (A wall clock stepped forward and back by more than the window could
    expire entries early; run NTP in slew mode.)
    """

    def __init__(
        self, max_clock_skew_s: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        if not max_clock_skew_s > 0:
            raise ValueError(f"max_clock_skew_s must be > 0, got {max_clock_skew_s}")
        self._skew_s = float(max_clock_skew_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[bytes, bytes], float] = {}  # (signer, nonce) -> expiry
        self._expiries: deque[tuple[float, tuple[bytes, bytes]]] = deque()

    @property
    def max_clock_skew_s(self) -> float:
        return self._skew_s

    def cache_size(self) -> int:
        """Number of remembered (signer, nonce) pairs (for metrics)."""
        with self._lock:
            return len(self._seen)

    def verify(self, envelope: Envelope, *, purpose: str) -> bytes:
        """Return the payload if `envelope` is valid for `purpose`, else raise a
        `VerificationError` subclass. Cheap checks run first; the nonce is recorded
        only once everything else passed."""
        if envelope.purpose != purpose:
            raise WrongPurpose(
                f"envelope was signed for {envelope.purpose!r} but is used for {purpose!r}: "
                f"sign the request with purpose {purpose!r}"
            )
        now = self._clock()
        offset_s = envelope.timestamp_ms / 1000.0 - now
        if abs(offset_s) > self._skew_s:
            direction = "in the future" if offset_s > 0 else "in the past"
            raise ClockSkew(
                f"envelope timestamp is {abs(offset_s):.1f} s {direction} (allowed: "
                f"{self._skew_s:g} s): sync the signer's clock (NTP) and sign a fresh request"
            )
        try:
            key = Ed25519PublicKey.from_public_bytes(envelope.signer)
            key.verify(envelope.signature, envelope.signing_bytes())
        except (InvalidSignature, ValueError) as exc:
            raise BadSignature(
                f"signature of {envelope.purpose} envelope from {fingerprint(envelope.signer)} "
                "does not verify: the request was altered or not signed by that key"
            ) from exc
        cache_key = (envelope.signer, envelope.nonce)
        with self._lock:
            self._prune(now)
            expiry = self._seen.get(cache_key)
            if expiry is not None and expiry >= now:
                raise ReplayedNonce(
                    f"nonce {envelope.nonce.hex()} from {fingerprint(envelope.signer)} was "
                    "already used: every request needs a fresh signature (Identity.sign)"
                )
            expiry = now + 2 * self._skew_s
            self._seen[cache_key] = expiry
            self._expiries.append((expiry, cache_key))
        return envelope.payload

    def _prune(self, now: float) -> None:
        # Expiries are appended in clock order, so the oldest are at the left. If the
        # clock stepped back, pruning just waits for the out-of-order entry: never early.
        while self._expiries and self._expiries[0][0] < now:
            expiry, key = self._expiries.popleft()
            if self._seen.get(key) == expiry:
                del self._seen[key]
