"""The local-directory object store and object key validation."""

from __future__ import annotations

import tempfile
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.coordinator.storage.objects import (
    InvalidKeyError,
    LocalObjectStore,
    ObjectNotFoundError,
    ObjectStoreError,
    check_key,
)
from coderepair.protocol.rollout import RolloutRecord, read_parquet, to_parquet_bytes


def test_put_get_exists_delete_round_trip(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    assert not store.exists("runs/r1/a.parquet")
    store.put("runs/r1/a.parquet", b"one")
    store.put("runs/r1/a.parquet", b"two")  # replaces
    assert store.get("runs/r1/a.parquet") == b"two"
    assert store.exists("runs/r1/a.parquet")
    store.delete("runs/r1/a.parquet")
    store.delete("runs/r1/a.parquet")  # deleting twice is fine
    with pytest.raises(ObjectNotFoundError, match="no object"):
        store.get("runs/r1/a.parquet")
    store.put("p/q", b"x")
    with pytest.raises(ObjectNotFoundError, match="prefix"):
        store.get("p")
    # No temporary file is left behind by the atomic writes.
    assert sorted(p.name for p in (tmp_path / "objects" / "runs" / "r1").iterdir()) == []


def test_url_serves_the_object(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put("shards/model.safetensors", b"\x00weights")
    with urllib.request.urlopen(store.url("shards/model.safetensors", 60)) as response:
        assert response.read() == b"\x00weights"


def test_rollout_parquet_survives_the_store(tmp_path: Path) -> None:
    record = RolloutRecord(
        task_id="t1", lease_id="l1", run_id="r1", worker_key="ab" * 32, policy_version=0,
        sample_index=0, seed=7, prompt_ids=[1, 2], completion_ids=[3], behaviour_logprobs=[-0.5],
        completion_text="x", patch="", reward=-1.0, reward_components={"format": -1.0},
        reward_spec_hash="c" * 64, test_log_sha256="d" * 64, proof=b"\x01" * 258,
        timings={"generate": 0.1}, created_at_ms=1,
    )  # fmt: skip
    store = LocalObjectStore(tmp_path)
    store.put("runs/r1/batches/b1.parquet", to_parquet_bytes([record]))
    assert read_parquet(store.get("runs/r1/batches/b1.parquet")) == [record]


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "a//b", "a/../b", "..", ".hidden", "a/.git/x", "-rf", "a b", "a\\b", "é", "a/"],
)
def test_unsafe_keys_are_refused(tmp_path: Path, key: str) -> None:
    store = LocalObjectStore(tmp_path)
    with pytest.raises(InvalidKeyError):
        store.put(key, b"x")
    with pytest.raises(InvalidKeyError):
        check_key(key)


def test_a_planted_symlink_cannot_lead_outside_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    store = LocalObjectStore(root)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidKeyError, match="outside"):
        store.put("link/x", b"x")
    assert not (outside / "x").exists()


@settings(max_examples=200, deadline=None)
@given(key=st.one_of(st.text(max_size=80), st.binary(max_size=20), st.integers(), st.none()))
def test_check_key_accepts_only_safe_relative_paths(key: object) -> None:
    try:
        checked = check_key(key)
    except InvalidKeyError:
        return
    root = Path("/srv/objects")
    assert isinstance(checked, str)
    assert root.joinpath(*checked.split("/")).resolve().is_relative_to(root)
    assert not any(part.startswith(".") for part in checked.split("/"))


@settings(max_examples=100, deadline=None)
@given(
    segments=st.lists(
        st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,20}", fullmatch=True), min_size=1, max_size=5
    ),
    data=st.binary(max_size=300),
)
def test_any_valid_key_round_trips(segments: list[str], data: bytes) -> None:
    with tempfile.TemporaryDirectory() as root:
        store = LocalObjectStore(root)
        key = "/".join(segments)
        store.put(key, data)
        assert store.get(key) == data
        store.delete(key)
        assert not store.exists(key)


def test_a_key_cannot_be_both_an_object_and_a_prefix(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put("a/b", b"x")
    with pytest.raises(ObjectStoreError, match="clashes"):
        store.put("a", b"y")
    with pytest.raises(ObjectStoreError, match="clashes"):
        store.put("a/b/c", b"y")
    with pytest.raises(ObjectNotFoundError):
        store.get("a/b/c")
    assert store.get("a/b") == b"x"
