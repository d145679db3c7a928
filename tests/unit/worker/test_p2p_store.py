"""`ShardStore`: only verified files are served, files changed on disk stop being
served, and pruning deletes only what the store wrote."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from coderepair.worker.p2p_store import ShardStore


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_added_bytes_are_served_under_their_hash_and_size(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "store")
    data = os.urandom(1000)
    path = store.add_bytes(digest(data), data)
    assert path.read_bytes() == data
    assert store.path_for(digest(data), 1000) == path
    assert store.path_for(digest(data), 999) is None  # another size is another shard
    assert store.path_for(digest(b"other"), 5) is None
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_bytes_that_do_not_match_the_hash_are_not_stored(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    with pytest.raises(ValueError, match="refusing"):
        store.add_bytes(digest(b"a"), b"b")
    assert len(store) == 0


def test_a_file_changed_on_disk_is_no_longer_served(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    data = os.urandom(100)
    path = store.add_bytes(digest(data), data)
    path.write_bytes(os.urandom(101))
    assert store.path_for(digest(data), 100) is None
    assert len(store) == 0
    again = store.add_bytes(digest(data), data)
    again.unlink()
    assert store.path_for(digest(data), 100) is None


def test_scan_serves_only_files_named_by_their_own_hash(tmp_path: Path) -> None:
    kept = tmp_path / "partial"
    kept.mkdir()
    good, bad, unfinished = os.urandom(64), os.urandom(64), os.urandom(64)
    (kept / f"{digest(good)}.part").write_bytes(good)  # as PolicyWeights keeps downloads
    (kept / digest(bad)).write_bytes(os.urandom(64))  # name and content disagree
    (kept / f"{digest(unfinished)}.part").write_bytes(unfinished[:10])
    (kept / "notes.txt").write_text("not a shard")
    store = ShardStore(tmp_path / "store")
    assert store.scan(kept) == 1
    assert store.path_for(digest(good), 64) == kept / f"{digest(good)}.part"
    assert store.path_for(digest(bad), 64) is None
    assert store.path_for(digest(unfinished), 64) is None


def test_add_file_checks_the_expected_hash(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "store")
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc")
    assert store.add_file(path, digest(b"xyz")) is None
    assert store.path_for(digest(b"abc"), 3) is None
    assert store.add_file(path, digest(b"abc")) == digest(b"abc")
    assert store.path_for(digest(b"abc"), 3) == path


def test_prune_deletes_own_files_and_only_unindexes_others(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "store")
    old, new = b"old version", b"new version"
    own_old = store.add_bytes(digest(old), old)
    store.add_bytes(digest(new), new)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"foreign")
    store.add_file(foreign)
    assert store.prune({digest(new)}) == 2
    assert not own_old.exists()
    assert foreign.exists()  # not the store's to delete
    assert store.path_for(digest(b"foreign"), 7) is None
    assert store.path_for(digest(new), len(new)) is not None
