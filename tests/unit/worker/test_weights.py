"""Taking policy versions on a worker: decoders (with hypothesis), verification, application.

Valid deltas come from the trainer's real publisher, so these tests also pin the format
the two sides share. HTTP fetching is tested against a real server in
tests/integration/test_weight_chain.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pydantic
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import (
    ChainError,
    ManifestDecodeError,
    ShardHashMismatch,
    ShardSizeMismatch,
    UntrustedTrainerKey,
)
from coderepair.trainer.publish import (
    DELTA_MAGIC,
    LocalDirectorySink,
    PublishedVersion,
    Publisher,
    PublisherConfig,
    diff_tensor,
    encode_delta,
)
from coderepair.worker.weights import (
    CheckpointDecodeError,
    DeltaDecodeError,
    DeltaMismatchError,
    PolicyWeights,
    ShardFetchError,
    WeightsConfig,
    decode_checkpoint,
    decode_delta,
)

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def random_tensor(dtype: torch.dtype, numel: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0,
        256,
        (numel * torch.tensor([], dtype=dtype).element_size(),),
        dtype=torch.uint8,
        generator=generator,
    )
    if dtype == torch.bool:
        return (raw % 2).view(torch.bool)
    return raw.view(dtype)


def valid_delta() -> bytes:
    old = torch.zeros(300)
    new = old.clone()
    new[[0, 7, 8, 299]] = torch.tensor([1.0, -2.0, 3.5, 4.0])
    half = torch.zeros(5, 4, dtype=torch.bfloat16)
    half_new = half.clone()
    half_new[4, 3] = 1.0
    records = [diff_tensor("a", old, new), diff_tensor("b", half, half_new)]
    return encode_delta([r for r in records if r is not None], compression_level=3)


VALID_DELTA = valid_delta()


# ---------------------------------------------------------------- the delta decoder


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    numel=st.integers(1, 3000),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_delta_round_trips_every_dtype_bit_exactly(
    dtype: torch.dtype, numel: int, seed: int, data: st.DataObject
) -> None:
    old = random_tensor(dtype, numel, seed)
    if data.draw(st.booleans(), label="dense"):
        new = random_tensor(dtype, numel, seed + 1)  # nearly every element changes
    else:
        new = old.clone()
        changed = data.draw(st.sets(st.integers(0, numel - 1), min_size=1, max_size=64))
        new[torch.tensor(sorted(changed))] = random_tensor(dtype, len(changed), seed + 1)
    record = diff_tensor("t", old, new)
    if record is None:  # every drawn value happened to equal the old one
        assert torch.equal(old, new)
        return
    (decoded,) = decode_delta(encode_delta([record], compression_level=1))
    applied = old.clone()
    applied.view(-1)[decoded.indices] = decoded.values
    assert decoded.dtype == dtype
    assert torch.equal(applied.view(torch.uint8), new.view(torch.uint8))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_a_decode_error(blob: bytes) -> None:
    with pytest.raises(DeltaDecodeError):
        decode_delta(blob)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_after_the_magic_are_a_decode_error(tail: bytes) -> None:
    with pytest.raises(DeltaDecodeError):
        decode_delta(DELTA_MAGIC + tail)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(VALID_DELTA) - 1))
def test_truncated_deltas_are_a_decode_error(length: int) -> None:
    with pytest.raises(DeltaDecodeError):
        decode_delta(VALID_DELTA[:length])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(VALID_DELTA) - 1), st.integers(1, 255))
def test_flipped_bytes_decode_or_raise_a_decode_error(position: int, xor: int) -> None:
    damaged = bytearray(VALID_DELTA)
    damaged[position] ^= xor
    try:
        decoded = decode_delta(bytes(damaged))
    except DeltaDecodeError:
        return
    # A flip inside a value can decode: the manifest's SHA-256 is what catches it.
    for record in decoded:
        assert record.indices.numel() == record.values.numel()
        assert int(record.indices.max()) < torch.Size(record.shape).numel()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=8)
    ),
    max_leaves=20,
)
entry_keys = ["count", "dtype", "index_bytes", "index_width", "name", "shape", "value_bytes"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.lists(
        st.fixed_dictionaries({k: json_values for k in entry_keys})
        | st.fixed_dictionaries(
            {
                "count": st.integers(-2, 2**50),
                "dtype": st.sampled_from(["F32", "BF16", "BOOL", "X"]),
                "index_bytes": st.integers(-1, 64),
                "index_width": st.sampled_from([0, 1, 2, 3, 8, True]),
                "name": st.text(max_size=4),
                "shape": st.lists(st.integers(-1, 2**30), max_size=3),
                "value_bytes": st.integers(-1, 64),
            }
        ),
        min_size=1,  # an empty list with no body is a valid, empty delta
        max_size=3,
    ),
    body=st.binary(max_size=128),
)
def test_structured_garbage_is_a_decode_error(entries: list[object], body: bytes) -> None:
    header = json.dumps({"format": "coderepair.v1.WeightDelta", "tensors": entries}).encode()
    blob = DELTA_MAGIC + struct.pack("<I", len(header)) + header + body
    with pytest.raises(DeltaDecodeError):
        decode_delta(blob)


def frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def handmade(entry: dict[str, object], index: bytes, values: bytes) -> bytes:
    header = json.dumps({"format": "coderepair.v1.WeightDelta", "tensors": [entry]}).encode()
    return DELTA_MAGIC + struct.pack("<I", len(header)) + header + index + values


@pytest.mark.parametrize(
    ("gaps", "values", "message"),
    [
        (b"\x01\x00", b"\x00\x00\x00\x00\x00\x00\x00\x00", "strictly increasing"),
        (b"\x09\x01", b"\x00" * 8, "beyond"),
        (b"\x05\x05", b"\x00" * 8, "run beyond"),
    ],
)
def test_bad_indices_are_named(gaps: bytes, values: bytes, message: str) -> None:
    index_frame, value_frame = frame(gaps), frame(values)
    entry = {
        "count": 2,
        "dtype": "F32",
        "index_bytes": len(index_frame),
        "index_width": 1,
        "name": "t",
        "shape": [8],
        "value_bytes": len(value_frame),
    }
    with pytest.raises(DeltaDecodeError, match=message):
        decode_delta(handmade(entry, index_frame, value_frame))


def test_bool_values_must_be_zero_or_one() -> None:
    index_frame, value_frame = frame(b"\x00"), frame(b"\x02")
    entry = {
        "count": 1,
        "dtype": "BOOL",
        "index_bytes": len(index_frame),
        "index_width": 1,
        "name": "mask",
        "shape": [4],
        "value_bytes": len(value_frame),
    }
    with pytest.raises(DeltaDecodeError, match="0 or 1"):
        decode_delta(handmade(entry, index_frame, value_frame))


def test_stray_bytes_after_a_frame_are_refused() -> None:
    index_frame, value_frame = frame(b"\x00") + b"\x00", frame(b"\x00" * 4)
    entry = {
        "count": 1,
        "dtype": "F32",
        "index_bytes": len(index_frame),
        "index_width": 1,
        "name": "t",
        "shape": [4],
        "value_bytes": len(value_frame),
    }
    with pytest.raises(DeltaDecodeError, match="stray bytes"):
        decode_delta(handmade(entry, index_frame, value_frame))


def test_decode_size_limit_is_enforced() -> None:
    with pytest.raises(DeltaDecodeError, match="limit"):
        decode_delta(VALID_DELTA, max_decoded_bytes=10)


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        ({"b": (torch.bfloat16, (5, 4))}, "does not have"),
        ({"a": (torch.float32, (301,)), "b": (torch.bfloat16, (5, 4))}, "as torch.float32"),
        ({"a": (torch.float16, (300,)), "b": (torch.bfloat16, (5, 4))}, "full version"),
    ],
)
def test_delta_must_fit_the_held_tensors(
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]], message: str
) -> None:
    with pytest.raises(DeltaMismatchError, match=message):
        decode_delta(VALID_DELTA, expected=expected)


# ---------------------------------------------------------------- the checkpoint decoder


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_checkpoint_bytes_are_a_decode_error(blob: bytes) -> None:
    with pytest.raises(CheckpointDecodeError):
        decode_checkpoint(blob)


# ---------------------------------------------------------------- PolicyWeights


@pytest.fixture
def trainer() -> Identity:
    return Identity.generate()


class Chain:
    """A store with a published chain: v0 full, v1 and v2 deltas, v3 full."""

    def __init__(self, root: Path, identity: Identity) -> None:
        self.root = root
        config = PublisherConfig(
            run_id="r",
            base_model="m",
            tokenizer_sha256="0" * 64,
            full_every=3,
            publish_dtype="keep",  # the held weights are compared with these fp32 states
        )
        publisher = Publisher(config, identity, LocalDirectorySink(root))
        self.states: list[dict[str, torch.Tensor]] = []
        self.versions: list[PublishedVersion] = []
        state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.zeros(2)}
        for version in range(4):
            state["w"][version % 3, version] += 0.5
            self.versions.append(publisher.publish(state, version))
            self.states.append({k: v.clone() for k, v in state.items()})

    def dir(self, version: int) -> Path:
        return self.root / self.versions[version].prefix

    def shard(self, version: int) -> Path:
        return self.dir(version) / self.versions[version].manifest.shards[0].name


@pytest.fixture
def chain(tmp_path: Path, trainer: Identity) -> Chain:
    return Chain(tmp_path / "store", trainer)


def worker(tmp_path: Path, key: Identity) -> PolicyWeights:
    return PolicyWeights(WeightsConfig(trainer_key=key.public_key_hex, cache_dir=tmp_path / "c"))


def assert_holds(weights: PolicyWeights, state: dict[str, torch.Tensor]) -> None:
    assert sorted(weights.state_dict) == sorted(state)
    for name, tensor in state.items():
        assert weights.state_dict[name].dtype == tensor.dtype
        assert torch.equal(weights.state_dict[name], tensor)


def test_config_requires_a_hex_trainer_key(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="64 hex characters"):
        WeightsConfig(trainer_key="not-a-key", cache_dir=tmp_path)
    key = "AB" * 32
    assert WeightsConfig(trainer_key=key, cache_dir=tmp_path).trainer_key == key.lower()


def test_worker_follows_the_chain(tmp_path: Path, chain: Chain, trainer: Identity) -> None:
    weights = worker(tmp_path, trainer)
    kinds = []
    for version in range(4):
        update = weights.apply_dir(chain.dir(version))
        kinds.append(update.kind)
        assert weights.held == chain.versions[version].manifest
        assert_holds(weights, chain.states[version])
    assert kinds == ["full", "delta", "delta", "full"]


def test_delta_update_names_only_changed_tensors(
    tmp_path: Path, chain: Chain, trainer: Identity
) -> None:
    weights = worker(tmp_path, trainer)
    weights.apply_dir(chain.dir(0))
    update = weights.apply_dir(chain.dir(1))
    assert sorted(update.tensors) == ["w"]
    assert update.changed_elements == 1
    assert update.download_bytes == chain.versions[1].shard_bytes


def test_a_late_worker_starts_from_a_full_version(
    tmp_path: Path, chain: Chain, trainer: Identity
) -> None:
    weights = worker(tmp_path, trainer)
    with pytest.raises(ChainError, match="fetch the latest full version first"):
        weights.apply_dir(chain.dir(1))
    weights.apply_dir(chain.dir(3))
    assert_holds(weights, chain.states[3])


def test_a_skipped_delta_breaks_the_chain_and_changes_nothing(
    tmp_path: Path, chain: Chain, trainer: Identity
) -> None:
    weights = worker(tmp_path, trainer)
    weights.apply_dir(chain.dir(0))
    with pytest.raises(ChainError, match="delta against v1, but v0 is held"):
        weights.apply_dir(chain.dir(2))
    assert weights.held == chain.versions[0].manifest
    assert_holds(weights, chain.states[0])


def test_a_manifest_from_another_key_is_refused(tmp_path: Path, chain: Chain) -> None:
    weights = worker(tmp_path, Identity.generate())
    with pytest.raises(UntrustedTrainerKey, match="re-pin"):
        weights.apply_dir(chain.dir(0))
    assert weights.held is None


def test_an_altered_manifest_is_refused(tmp_path: Path, chain: Chain, trainer: Identity) -> None:
    document = (chain.dir(0) / "manifest.json").read_bytes()
    with pytest.raises(ManifestDecodeError):
        worker(tmp_path, trainer).apply(
            document.replace(b'"version":0', b'"version": 0'), chain.dir(0)
        )


def test_a_corrupted_shard_is_refused_and_changes_nothing(
    tmp_path: Path, chain: Chain, trainer: Identity
) -> None:
    weights = worker(tmp_path, trainer)
    weights.apply_dir(chain.dir(0))
    shard = chain.shard(1)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardHashMismatch, match="corrupt or was tampered with"):
        weights.apply_dir(chain.dir(1))
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(ShardSizeMismatch, match="incomplete"):
        weights.apply_dir(chain.dir(1))
    assert weights.held == chain.versions[0].manifest
    assert_holds(weights, chain.states[0])


def test_missing_shards_and_sources_are_fetch_errors(
    tmp_path: Path, chain: Chain, trainer: Identity
) -> None:
    weights = worker(tmp_path, trainer)
    manifest = (chain.dir(0) / "manifest.json").read_bytes()
    with pytest.raises(ShardFetchError, match="no URL given"):
        weights.apply(manifest, {})
    with pytest.raises(ShardFetchError, match="only local paths"):
        weights.apply(manifest, "ftp://example.invalid/v0")
    with pytest.raises(ShardFetchError, match="cannot read"):
        weights.apply(manifest, tmp_path / "nowhere")
    with pytest.raises(ShardFetchError, match="cannot read"):
        weights.apply_dir(tmp_path / "nowhere")
    # A mapping with several sources falls back to the next one.
    names = [s.name for s in chain.versions[0].manifest.shards]
    sources = {n: [str(tmp_path / "nowhere" / n), str(chain.dir(0) / n)] for n in names}
    assert weights.apply(manifest, sources).kind == "full"


def test_every_failure_is_a_protocol_error() -> None:
    for error in (
        DeltaDecodeError,
        CheckpointDecodeError,
        DeltaMismatchError,
        ShardFetchError,
    ):
        assert issubclass(error, ProtocolError)
