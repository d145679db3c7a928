"""The object store: rollout Parquet files and policy shards, in a directory or on S3.

Keys are relative, slash-separated paths of safe characters (`runs/r1/batches/ab.parquet`)
checked by `check_key` before any I/O, so no key can climb out of the store's root, name
a hidden file, or differ between the two backends.

`LocalObjectStore` writes atomically: a temporary file in the same directory is written,
fsynced and renamed over the key, and the directory is fsynced, so a reader (or a
restart after `kill -9` or a power cut) sees either the whole old object or the whole
new one, never a torn file. `S3ObjectStore` gets the same from S3's atomic PUT.
"""

from __future__ import annotations

import abc
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from coderepair.protocol.errors import ProtocolError

__all__ = [
    "InvalidKeyError",
    "LocalObjectStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "ObjectStoreError",
    "S3ObjectStore",
    "check_key",
]

MAX_KEY_LENGTH = 512  # also the width of batches.object_key
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,127}")


class ObjectStoreError(ProtocolError):
    """The object store refused or failed an operation."""


class InvalidKeyError(ObjectStoreError):
    """A key is not a safe relative path."""


class ObjectNotFoundError(ObjectStoreError):
    """No object is stored under the key."""


def check_key(key: object) -> str:
    """Return `key` if it is a valid object key, else raise `InvalidKeyError`.

    Valid: at most 512 characters; segments separated by single "/"; each segment 1-128
    characters of [A-Za-z0-9._=-], not starting with "." or "-" (so no "..", no hidden
    files, no option-like names).
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"an object key is a str, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"object key must have 1 to {MAX_KEY_LENGTH} characters, got {len(key)}"
        )
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidKeyError(
                f"object key {key!r} has an invalid segment {segment!r}: use segments of "
                "[A-Za-z0-9._=-] separated by single '/', not starting with '.' or '-'"
            )
    return key


class ObjectStore(abc.ABC):
    """Where the coordinator keeps blobs. Implementations are thread-safe."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any object there, atomically."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; `ObjectNotFoundError` when there is none."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    @abc.abstractmethod
    def url(self, key: str, expires_s: int) -> str:
        """A URL a worker can GET the object from, valid for at least `expires_s`."""


class LocalObjectStore(ObjectStore):
    """Objects as files under `root` (the embedded default)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = self.root.joinpath(*check_key(key).split("/"))
        # check_key already forbids "..": this guards against a symlink planted inside.
        if not path.resolve().is_relative_to(self.root):
            raise InvalidKeyError(f"object key {key!r} resolves outside the store's root")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise _prefix_clash(key) from exc
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(path)
        except IsADirectoryError as exc:
            tmp.unlink(missing_ok=True)
            raise _prefix_clash(key) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}") from exc
        except IsADirectoryError as exc:
            raise ObjectNotFoundError(f"{key!r} is a prefix of other keys, not an object") from exc
        except NotADirectoryError as exc:
            raise ObjectNotFoundError(f"no object {key!r}: a prefix of it is an object") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)

    def url(self, key: str, expires_s: int) -> str:
        # Local files never expire; workers on the same machine read them directly.
        return self._path(key).as_uri()


def _prefix_clash(key: str) -> ObjectStoreError:
    return ObjectStoreError(
        f"object key {key!r} clashes with a stored key: in a directory store one key cannot "
        "be both an object and the prefix of another (a/b and a/b/c); choose distinct paths"
    )


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable (POSIX: the directory entry lives in the directory).
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3ObjectStore(ObjectStore):
    """Objects in an S3(-compatible) bucket through a boto3 client.

    The client is passed in (made with `boto3.client("s3", endpoint_url=...)`), so
    credentials, region and endpoint come from the operator's usual AWS configuration.
    `prefix` places all keys under a folder of a shared bucket.
    """

    def __init__(self, bucket: str, client: Any, prefix: str = "") -> None:
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.client = client
        self.prefix = prefix

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, key: str, action: str) -> ObjectStoreError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFoundError(f"no object {key!r} in s3://{self.bucket}")
        return ObjectStoreError(
            f"S3 {action} of {key!r} in bucket {self.bucket!r} failed ({code or exc}): check "
            "the bucket exists and the credentials may access it"
        )

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key, "PUT") from exc

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body: bytes = response["Body"].read()
            return body
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key, "GET") from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, key, "HEAD")
            if isinstance(error, ObjectNotFoundError):
                return False
            raise error from exc
        return True

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key, "DELETE") from exc

    def url(self, key: str, expires_s: int) -> str:
        if not 1 <= expires_s <= 7 * 24 * 3600:
            raise ObjectStoreError(
                f"presigned URLs live 1 s to 7 days (S3's limit), asked for {expires_s} s"
            )
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_s,
        )
        return url
