"""The shards a worker serves to its peers: only files whose SHA-256 it has checked.

`ShardStore` maps a shard's hash to a file. A file enters the index only after its bytes
were hashed and matched (`add_bytes` for a shard just received, `add_file` / `scan` for
files already on disk, such as `PolicyWeights`' kept downloads). The file's size and
modification time are remembered with it, so a file changed on disk after the check is
dropped from the index instead of being served. The store is shared by the asyncio side
(which adds shards) and the libp2p thread (which serves them), hence the lock.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Entry:
    path: Path
    size: int
    mtime_ns: int
    owned: bool  # written by the store itself, so `prune` may delete it


def sha256_of_file(path: Path) -> tuple[str, int]:
    """(hex SHA-256, size) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ShardStore:
    """Verified shards by SHA-256; files the store writes live in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def path_for(self, sha256: str, size: int) -> Path | None:
        """The verified file of this shard, or None (unknown, other size, or changed on disk
        since it was checked)."""
        with self._lock:
            entry = self._index.get(sha256)
        if entry is None or entry.size != size:
            return None
        try:
            stat = entry.path.stat()
        except OSError:
            self._forget(sha256, entry)
            return None
        if stat.st_size != entry.size or stat.st_mtime_ns != entry.mtime_ns:
            self._forget(sha256, entry)
            return None
        return entry.path

    def add_bytes(self, sha256: str, data: bytes) -> Path:
        """Write a shard's bytes (hashed here again) and serve them; return the file."""
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ValueError(
                f"refusing to store bytes with sha256 {digest[:16]}… as shard {sha256[:16]}…"
            )
        path = self.directory / sha256
        # Write then rename, so a peer never reads a half-written file under its hash.
        tmp = self.directory / f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        tmp.replace(path)
        self._remember(sha256, path, owned=True)
        return path

    def add_file(self, path: Path, sha256: str | None = None) -> str | None:
        """Hash a file and serve it; return its hash, or None when it does not match
        `sha256` (the file is then left alone and not served)."""
        digest, _size = sha256_of_file(Path(path))
        if sha256 is not None and digest != sha256:
            return None
        self._remember(digest, Path(path), owned=False)
        return digest

    def scan(self, directory: Path) -> int:
        """Serve the files of `directory` whose name is their own SHA-256 (optionally with a
        ``.part`` suffix, as `PolicyWeights` keeps verified downloads); hash each one and
        skip those that do not match (unfinished downloads). Return how many were added."""
        added = 0
        owned = Path(directory).resolve() == self.directory.resolve()
        for path in sorted(Path(directory).iterdir()):
            name = path.name.removesuffix(".part")
            if not _HEX64.fullmatch(name) or not path.is_file():
                continue
            digest, _size = sha256_of_file(path)
            if digest == name:
                self._remember(digest, path, owned=owned)
                added += 1
        return added

    def prune(self, keep: set[str]) -> int:
        """Stop serving every shard not in `keep`; delete the files the store wrote itself.
        Return how many shards were dropped."""
        with self._lock:
            dropped = {h: e for h, e in self._index.items() if h not in keep}
            for sha256 in dropped:
                del self._index[sha256]
        for entry in dropped.values():
            if entry.owned:
                entry.path.unlink(missing_ok=True)
        return len(dropped)

    def _remember(self, sha256: str, path: Path, *, owned: bool) -> None:
        stat = path.stat()
        with self._lock:
            self._index[sha256] = _Entry(path, stat.st_size, stat.st_mtime_ns, owned)

    def _forget(self, sha256: str, entry: _Entry) -> None:
        with self._lock:
            if self._index.get(sha256) == entry:
                del self._index[sha256]
