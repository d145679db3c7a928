"""The publisher: full/delta schedule, sharding, signed manifests, sinks, published dtype."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pydantic
import pytest
import torch
from safetensors.torch import load as safetensors_load

from coderepair.coordinator.storage.objects import LocalObjectStore
from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import SignedManifest, verify_manifest
from coderepair.trainer.publish import (
    MANIFEST_NAME,
    LocalDirectorySink,
    Publisher,
    PublisherConfig,
    PublishError,
    diff_tensor,
    snapshot,
    tokenizer_sha256,
)
from coderepair.worker.weights import decode_delta


def make_config(**overrides: object) -> PublisherConfig:
    fields: dict[str, object] = {
        "run_id": "run-1",
        "base_model": "tiny",
        "tokenizer_sha256": "ab" * 32,
        "full_every": 3,
        "shard_size_bytes": 4096,
        # Bit-for-bit checks against the fp32 state; bf16 publishing has its own test.
        "publish_dtype": "keep",
    }
    fields.update(overrides)
    return PublisherConfig.model_validate(fields)


def make_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    embed = torch.randn(64, 16, generator=generator)
    return {
        "embed.weight": embed,
        "layer.weight": torch.randn(16, 16, generator=generator),
        "layer.bias": torch.zeros(16),
        "lm_head.weight": embed,  # tied: same storage as embed.weight
        "steps": torch.tensor([0], dtype=torch.int64),
    }


@pytest.fixture
def identity() -> Identity:
    return Identity.generate()


def stored(root: Path, key: str) -> bytes:
    return (root / key).read_bytes()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"run_id": "../x"}, "run_id"),
        ({"full_every": 0}, "full_every"),
        ({"compression_level": 23}, "compression_level"),
        ({"shard_size_bytes": 10}, "shard_size_bytes"),
        ({"publish_dtype": "float8"}, "publish_dtype"),
        ({"key_prefix": "../up"}, "key_prefix"),
        ({"tokenizer_sha256": "XYZ"}, "tokenizer_sha256"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_config_rejects_bad_fields(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        make_config(**overrides)


def test_full_every_n_versions_and_deltas_chain_in_between(
    tmp_path: Path, identity: Identity
) -> None:
    publisher = Publisher(make_config(full_every=3), identity, LocalDirectorySink(tmp_path))
    state = make_state()
    kinds, parents = [], []
    for version in range(7):
        state["layer.bias"][version % 16] += 1.0
        published = publisher.publish(state, version)
        kinds.append(published.kind)
        parents.append(published.manifest.parent_version)
        # The stored manifest is the returned one, signed by the trainer key.
        document = stored(tmp_path, published.manifest_key)
        assert document == published.manifest_bytes
        assert verify_manifest(SignedManifest.from_bytes(document), identity.public_key)
        for shard in published.manifest.shards:
            data = stored(tmp_path, f"{published.prefix}/{shard.name}")
            assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.size, shard.sha256)
    assert kinds == ["full", "delta", "delta", "full", "delta", "delta", "full"]
    assert parents == [None, 0, 1, 2, 3, 4, 5]
    assert publisher.last_version == 6


def test_full_checkpoint_is_sharded_and_drops_tied_aliases(
    tmp_path: Path, identity: Identity
) -> None:
    publisher = Publisher(
        make_config(shard_size_bytes=4096), identity, LocalDirectorySink(tmp_path)
    )
    state = make_state()
    published = publisher.publish(state, 0)
    names = [s.name for s in published.manifest.shards]
    assert names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, 3)]
    loaded: dict[str, torch.Tensor] = {}
    for name in names:
        loaded.update(safetensors_load(stored(tmp_path, f"{published.prefix}/{name}")))
    assert sorted(loaded) == ["embed.weight", "layer.bias", "layer.weight", "steps"]
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]) and tensor.dtype == state[name].dtype
    assert published.total_elements == 64 * 16 + 16 * 16 + 16 + 1


def test_delta_holds_exactly_the_changed_elements(tmp_path: Path, identity: Identity) -> None:
    publisher = Publisher(make_config(full_every=10), identity, LocalDirectorySink(tmp_path))
    state = make_state()
    publisher.publish(state, 0)
    state["embed.weight"][3, 5] = 7.0
    state["embed.weight"][40, 0] = -1.5
    state["layer.bias"][2] = -0.0  # +0.0 -> -0.0: equal as numbers, different bits
    published = publisher.publish(state, 1)
    assert published.kind == "delta"
    assert published.changed_elements == 3
    (shard,) = published.manifest.shards
    records = {
        r.name: r for r in decode_delta(stored(tmp_path, f"{published.prefix}/{shard.name}"))
    }
    assert sorted(records) == ["embed.weight", "layer.bias"]
    assert records["embed.weight"].indices.tolist() == [3 * 16 + 5, 40 * 16]
    assert records["embed.weight"].values.tolist() == [7.0, -1.5]
    bias = records["layer.bias"].values
    assert records["layer.bias"].indices.tolist() == [2]
    assert torch.signbit(bias).tolist() == [True]


def test_unchanged_state_publishes_an_empty_delta(tmp_path: Path, identity: Identity) -> None:
    publisher = Publisher(make_config(), identity, LocalDirectorySink(tmp_path))
    state = make_state()
    publisher.publish(state, 0)
    published = publisher.publish(state, 1)
    assert (published.kind, published.changed_elements) == ("delta", 0)
    (shard,) = published.manifest.shards
    assert decode_delta(stored(tmp_path, f"{published.prefix}/{shard.name}")) == []


def test_bfloat16_publishing_sends_only_rounding_changes(
    tmp_path: Path, identity: Identity
) -> None:
    publisher = Publisher(
        make_config(publish_dtype="bfloat16"), identity, LocalDirectorySink(tmp_path)
    )
    state = make_state()
    first = publisher.publish(state, 0)
    loaded = safetensors_load(stored(tmp_path, f"{first.prefix}/{first.manifest.shards[0].name}"))
    assert {t.dtype for n, t in loaded.items() if n != "steps"} == {torch.bfloat16}
    assert loaded["steps"].dtype == torch.int64  # integers are never cast
    # A nudge far below bf16's resolution (8 mantissa bits) changes no published bit...
    state["layer.weight"].mul_(1 + 1e-6)
    assert publisher.publish(state, 1).changed_elements == 0
    # ...while a 1 % change moves every element that is not zero.
    state["layer.weight"].mul_(1.01)
    assert publisher.publish(state, 2).changed_elements == 16 * 16


def test_layout_change_forces_a_full_version(tmp_path: Path, identity: Identity) -> None:
    publisher = Publisher(make_config(full_every=100), identity, LocalDirectorySink(tmp_path))
    state = make_state()
    publisher.publish(state, 0)
    state["extra.weight"] = torch.ones(3)
    assert publisher.publish(state, 1).kind == "full"
    state["extra.weight"] = torch.ones(3, dtype=torch.float16)
    assert publisher.publish(state, 2).kind == "full"
    assert publisher.publish(state, 3).kind == "delta"


@pytest.mark.parametrize("version", [-1, True, 1.5])
def test_version_must_be_a_non_negative_int(
    tmp_path: Path, identity: Identity, version: object
) -> None:
    publisher = Publisher(make_config(), identity, LocalDirectorySink(tmp_path))
    with pytest.raises(PublishError, match="non-negative int"):
        publisher.publish(make_state(), version)  # type: ignore[arg-type]


def test_versions_only_go_up(tmp_path: Path, identity: Identity) -> None:
    publisher = Publisher(make_config(), identity, LocalDirectorySink(tmp_path))
    publisher.publish(make_state(), 5)
    with pytest.raises(PublishError, match="publish 6"):
        publisher.publish(make_state(), 5)
    with pytest.raises(PublishError, match="not above"):
        publisher.publish(make_state(), 2)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({}, "empty"),
        ({"a": [1.0]}, "not a tensor"),
        ({"a": torch.zeros(2, dtype=torch.complex64)}, "cannot carry"),
        ({"": torch.zeros(2)}, "non-empty string"),
    ],
)
def test_bad_state_dicts_are_refused(state: dict[str, object], message: str) -> None:
    with pytest.raises(PublishError, match=message):
        snapshot(state)  # type: ignore[arg-type]


def test_snapshot_owns_its_tensors() -> None:
    state = make_state()
    copy = snapshot(state)
    state["layer.bias"][0] = 99.0
    assert copy["layer.bias"][0] == 0.0


def test_diff_tensor_reports_none_when_bits_are_equal() -> None:
    a = torch.tensor([1.0, float("nan"), 0.0])
    assert diff_tensor("a", a, a.clone()) is None
    record = diff_tensor("a", a, torch.tensor([1.0, float("nan"), -0.0]))
    assert record is not None and record.indices.tolist() == [2]


def test_manifest_uses_the_clock_and_names_the_run(tmp_path: Path, identity: Identity) -> None:
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    publisher = Publisher(make_config(), identity, LocalDirectorySink(tmp_path), clock=lambda: when)
    published = publisher.publish(make_state(), 0)
    assert published.manifest.created_at == when
    assert published.prefix == "runs/run-1/v0000000000"
    assert published.manifest_key == f"runs/run-1/v0000000000/{MANIFEST_NAME}"
    assert (published.manifest.base_model, published.manifest.tokenizer_sha256) == (
        "tiny",
        "ab" * 32,
    )


def test_local_sink_refuses_unsafe_keys_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    sink = LocalDirectorySink(tmp_path)
    for key in ("../escape", "/abs", "a//b", ".hidden", "a/-opt"):
        with pytest.raises(PublishError, match="safe relative path"):
            sink.put(key, b"x")
    sink.put("a/b.bin", b"one")
    sink.put("a/b.bin", b"two")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]


def test_coordinator_object_store_is_a_sink(tmp_path: Path, identity: Identity) -> None:
    store = LocalObjectStore(tmp_path)
    published = Publisher(make_config(), identity, store).publish(make_state(), 0)
    assert store.get(published.manifest_key) == published.manifest_bytes


def test_tokenizer_hash_covers_the_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="none of the tokenizer files"):
        tokenizer_sha256(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    first = tokenizer_sha256(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"weights are not tokenizer")
    assert tokenizer_sha256(tmp_path) == first
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert tokenizer_sha256(tmp_path) != first
