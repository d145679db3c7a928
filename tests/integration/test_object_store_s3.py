"""`S3ObjectStore` with boto3 against a real S3-compatible HTTP server (moto's server
mode on loopback; see conftest.py): objects round-trip, missing objects and unsafe keys
get typed errors, and presigned URLs are fetched with plain urllib."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from coderepair.coordinator.storage.objects import (
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectStoreError,
    S3ObjectStore,
)
from coderepair.protocol.rollout import RolloutRecord, read_parquet, to_parquet_bytes

BucketFactory = Callable[[], tuple[Any, str]]


def test_put_get_exists_delete(s3_bucket: BucketFactory) -> None:
    client, bucket = s3_bucket()
    store = S3ObjectStore(bucket, client, prefix="coordinator")
    assert not store.exists("runs/r1/a.parquet")
    store.put("runs/r1/a.parquet", b"one")
    store.put("runs/r1/a.parquet", b"two")
    assert store.get("runs/r1/a.parquet") == b"two"
    assert store.exists("runs/r1/a.parquet")
    # The prefix places the object under a folder of the bucket.
    raw = client.get_object(Bucket=bucket, Key="coordinator/runs/r1/a.parquet")
    assert raw["Body"].read() == b"two"
    store.delete("runs/r1/a.parquet")
    store.delete("runs/r1/a.parquet")
    with pytest.raises(ObjectNotFoundError, match="no object"):
        store.get("runs/r1/a.parquet")


def test_presigned_url_serves_the_object_over_http(s3_bucket: BucketFactory) -> None:
    client, bucket = s3_bucket()
    store = S3ObjectStore(bucket, client)
    payload = bytes(range(256)) * 100
    store.put("shards/model-00001.safetensors", payload)
    url = store.url("shards/model-00001.safetensors", 300)
    assert url.startswith("http://127.0.0.1:") and "Signature" in url
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read() == payload
    # (moto does not check signatures, so a tampered URL cannot be tested here.)
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(store.url("shards/absent", 300), timeout=30)
    assert missing.value.code == 404
    with pytest.raises(ObjectStoreError, match="7 days"):
        store.url("shards/model-00001.safetensors", 0)


def test_rollout_parquet_round_trips_through_s3(s3_bucket: BucketFactory) -> None:
    client, bucket = s3_bucket()
    record = RolloutRecord(
        task_id="t1", lease_id="l1", run_id="r1", worker_key="ab" * 32, policy_version=3,
        sample_index=1, seed=9, prompt_ids=[1], completion_ids=[2, 3],
        behaviour_logprobs=[-0.1, -0.2], completion_text="y", patch="p", reward=1.0,
        reward_components={"tests": 1.0}, reward_spec_hash="c" * 64,
        test_log_sha256="d" * 64, proof=b"\x02" * 516, timings={}, created_at_ms=5,
    )  # fmt: skip
    store = S3ObjectStore(bucket, client)
    store.put("runs/r1/batches/b.parquet", to_parquet_bytes([record]))
    assert read_parquet(store.get("runs/r1/batches/b.parquet")) == [record]


def test_unsafe_keys_and_missing_buckets_get_typed_errors(
    s3_bucket: BucketFactory,
) -> None:
    client, bucket = s3_bucket()
    store = S3ObjectStore(bucket, client)
    with pytest.raises(InvalidKeyError):
        store.put("../escape", b"x")
    missing = S3ObjectStore(bucket + "-missing", client)
    with pytest.raises(ObjectStoreError, match="NoSuchBucket"):
        missing.put("a", b"x")
    with pytest.raises(InvalidKeyError):
        S3ObjectStore(bucket, client, prefix="/abs")
