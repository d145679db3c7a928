"""Rollout records: validation on construction and the Parquet round trip."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coderepair.protocol.errors import DecodeError
from coderepair.protocol.rollout import (
    ROLLOUT_SCHEMA,
    ROLLOUT_SCHEMA_VERSION,
    RolloutDecodeError,
    RolloutRecord,
    RolloutSchemaError,
    from_parquet_bytes,
    read_parquet,
    to_parquet_bytes,
    write_parquet,
)

HEX = "ab" * 32


def _record(**changes: object) -> RolloutRecord:
    fields: dict[str, object] = {
        "task_id": "humaneval/12/mut-3",
        "lease_id": "lease-1",
        "run_id": "run-a",
        "worker_key": HEX,
        "policy_version": 4,
        "sample_index": 2,
        "seed": 2**64 - 1,
        "prompt_ids": [1, 2, 3],
        "completion_ids": [7, 8],
        "behaviour_logprobs": [-0.5, -1.25],
        "completion_text": "<think>x</think>",
        "patch": "",
        "reward": -1.0,
        "reward_components": {"malformed": -1.0},
        "reward_spec_hash": "0" * 64,
        "test_log_sha256": "f" * 64,
        "proof": b"\x00\x01",
        "timings": {"generate": 1.5, "verify": 0.25},
        "created_at_ms": 1_790_000_000_000,
    }
    fields.update(changes)
    return RolloutRecord(**fields)  # type: ignore[arg-type]


def test_schema_names_match_record_fields() -> None:
    assert ROLLOUT_SCHEMA.names == [f.name for f in dataclasses.fields(RolloutRecord)]
    assert ROLLOUT_SCHEMA.metadata[b"coderepair.rollout.schema_version"] == b"1"
    assert issubclass(RolloutSchemaError, DecodeError)
    assert issubclass(RolloutDecodeError, DecodeError)


def test_round_trip_bytes_and_path(tmp_path: Path) -> None:
    records = [_record(), _record(sample_index=3, completion_ids=[], behaviour_logprobs=[])]
    assert from_parquet_bytes(to_parquet_bytes(records)) == records
    path = tmp_path / "batch.parquet"
    write_parquet(records, path)
    assert read_parquet(path) == records
    assert read_parquet(str(path)) == records
    stream = io.BytesIO()
    write_parquet(records, stream)
    assert read_parquet(stream.getvalue()) == records
    assert from_parquet_bytes(to_parquet_bytes([])) == []


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"behaviour_logprobs": [-0.5]}, "one logprob per completion token"),
        ({"prompt_ids": []}, "must not be empty"),
        ({"prompt_ids": [1, -2]}, "item 1"),
        ({"completion_ids": [7, 2**31]}, "item 1"),
        ({"completion_ids": [7, True]}, "item 1"),
        ({"behaviour_logprobs": [-0.5, float("nan")]}, "finite"),
        ({"behaviour_logprobs": [-0.5, 0.5]}, "<= 0"),
        ({"worker_key": "AB" * 32}, "64 lowercase hex"),
        ({"reward_spec_hash": "00"}, "64 lowercase hex"),
        ({"test_log_sha256": None}, "64 lowercase hex"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"sample_index": 2**32}, "sample_index"),
        ({"policy_version": "4"}, "must be an int"),
        ({"task_id": ""}, "must not be empty"),
        ({"reward": float("inf")}, "finite"),
        ({"reward_components": {"x": "1"}}, "must be a number"),
        ({"reward_components": {1: 1.0}}, "keys"),
        ({"timings": {"generate": -1.0}}, ">= 0"),
        ({"proof": "00"}, "must be bytes"),
        ({"created_at_ms": 1.5}, "must be an int"),
        ({"prompt_ids": (1, 2)}, "must be a list"),
    ],
)
def test_invalid_records_raise_schema_error(changes: dict[str, object], match: str) -> None:
    with pytest.raises(RolloutSchemaError, match=match):
        _record(**changes)


def test_write_rejects_non_records() -> None:
    with pytest.raises(RolloutSchemaError, match="not a RolloutRecord"):
        to_parquet_bytes([_record(), {"task_id": "x"}])  # type: ignore[list-item]


# ---------------------------------------------------------------- round trip, generated


_hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
_name = st.text(min_size=1, max_size=20)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_ids = st.lists(st.integers(0, 2**31 - 1), max_size=30)


@st.composite
def records(draw: st.DrawFn) -> RolloutRecord:
    completion = draw(_ids)
    return RolloutRecord(
        task_id=draw(_name),
        lease_id=draw(_name),
        run_id=draw(_name),
        worker_key=draw(_hex64),
        policy_version=draw(st.integers(0, 2**63 - 1)),
        sample_index=draw(st.integers(0, 2**32 - 1)),
        seed=draw(st.integers(0, 2**64 - 1)),
        prompt_ids=draw(_ids.filter(bool)),
        completion_ids=completion,
        behaviour_logprobs=draw(
            st.lists(
                st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
                min_size=len(completion),
                max_size=len(completion),
            )
        ),
        completion_text=draw(st.text(max_size=100)),
        patch=draw(st.text(max_size=100)),
        reward=draw(_floats),
        reward_components=draw(st.dictionaries(_name, _floats, max_size=4)),
        reward_spec_hash=draw(_hex64),
        test_log_sha256=draw(_hex64),
        proof=draw(st.binary(max_size=300)),
        timings=draw(st.dictionaries(_name, st.floats(0.0, 1e6), max_size=4)),
        created_at_ms=draw(st.integers(0, 2**63 - 1)),
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), max_size=4))
def test_round_trip_generated(batch: list[RolloutRecord]) -> None:
    assert from_parquet_bytes(to_parquet_bytes(batch)) == batch


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), min_size=1, max_size=4), st.lists(st.integers(0, 3), max_size=12))
def test_rows_sharing_one_prompt_list_round_trip(
    distinct: list[RolloutRecord], picks: list[int]
) -> None:
    """Rows whose records hold the very same prompt list (as check_batch builds a task's
    G records) are written by converting that prompt once: the file still reads back
    as the records, in order, each with its own prompt."""
    batch = list(distinct)
    for i, pick in enumerate(picks):
        owner = distinct[pick % len(distinct)]
        # Another record object, holding the owner's prompt list itself.
        batch.append(dataclasses.replace(batch[i % len(batch)], prompt_ids=owner.prompt_ids))
    assert from_parquet_bytes(to_parquet_bytes(batch)) == batch


# ---------------------------------------------------------------- bad input


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_raise_decode_error(data: bytes) -> None:
    with pytest.raises(RolloutDecodeError):
        from_parquet_bytes(data)


_VALID = to_parquet_bytes([_record(), _record(sample_index=5)])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_VALID) - 1))
def test_truncated_files_raise_decode_error(cut: int) -> None:
    with pytest.raises(RolloutDecodeError):
        from_parquet_bytes(_VALID[:cut])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(1, 255))
def test_corrupted_files_never_leak_other_errors(offset: int, flip: int) -> None:
    data = bytearray(_VALID)
    data[offset] ^= flip
    try:
        got = from_parquet_bytes(bytes(data))
    except RolloutDecodeError:
        return
    # A flip in a region Parquet does not check (e.g. padding or a string's bytes) may
    # still decode; whatever comes out must then be valid records.
    assert all(isinstance(r, RolloutRecord) for r in got)


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_foreign_schemas_are_rejected() -> None:
    foreign = pa.table({"a": [1, 2], "b": ["x", "y"]})
    with pytest.raises(RolloutDecodeError, match="schema version None"):
        from_parquet_bytes(_parquet(foreign))
    # Right columns, no version stamp.
    table = pq.read_table(pa.BufferReader(_VALID))
    with pytest.raises(RolloutDecodeError, match="schema version"):
        from_parquet_bytes(_parquet(table.replace_schema_metadata(None)))
    # A future version.
    future = {b"coderepair.rollout.schema_version": b"2"}
    with pytest.raises(RolloutDecodeError, match="incompatible release"):
        from_parquet_bytes(_parquet(table.replace_schema_metadata(future)))
    # Our version stamp on other columns.
    stamped = foreign.replace_schema_metadata(
        {b"coderepair.rollout.schema_version": ROLLOUT_SCHEMA_VERSION.encode()}
    )
    with pytest.raises(RolloutDecodeError, match="columns do not match"):
        from_parquet_bytes(_parquet(stamped))
    # A column of another type (seed as int64 instead of uint64).
    retyped = table.set_column(
        table.schema.get_field_index("seed"),
        pa.field("seed", pa.int64(), nullable=False),
        pa.array([1, 2], pa.int64()),
    ).replace_schema_metadata(table.schema.metadata)
    with pytest.raises(RolloutDecodeError, match="columns do not match"):
        from_parquet_bytes(_parquet(retyped))


def test_invalid_rows_in_a_valid_file_are_rejected() -> None:
    # Same schema, but a row whose lengths disagree (written around the record checks).
    row = _record().to_row()
    row["behaviour_logprobs"] = [-0.5]
    table = pa.Table.from_pylist([row], schema=ROLLOUT_SCHEMA)
    with pytest.raises(RolloutDecodeError, match=r"row 0 .*one logprob per completion token"):
        from_parquet_bytes(_parquet(table))
    row = _record().to_row()
    row["timings"] = [("generate", 1.0), ("generate", 2.0)]
    table = pa.Table.from_pylist([row], schema=ROLLOUT_SCHEMA)
    with pytest.raises(RolloutDecodeError, match="duplicate key"):
        from_parquet_bytes(_parquet(table))


def test_bad_sources() -> None:
    with pytest.raises(RolloutDecodeError, match="path or bytes"):
        read_parquet(12)  # type: ignore[arg-type]
    with pytest.raises(RolloutDecodeError):
        read_parquet(Path("/nonexistent/rollouts.parquet"))


_ITEMS = st.one_of(
    st.integers(-5, 2**31 + 5),
    st.sampled_from([0, 2**31 - 1, 2**31, -1, True, False]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=2),
    st.none(),
)


def _valid_token(tok: object) -> bool:
    return type(tok) is int and 0 <= tok <= 2**31 - 1


def _valid_logprob(lp: object) -> bool:
    return type(lp) in (int, float) and math.isfinite(lp) and lp <= 1e-3  # type: ignore[arg-type,operator]


@given(st.lists(_ITEMS, max_size=8))
def test_token_ids_are_accepted_exactly_when_every_item_is_an_id_in_range(
    ids: list[object],
) -> None:
    # The fast path (C loops) and the naming loop must agree on every input.
    logprobs = [-0.5] * len(ids)
    if all(_valid_token(t) for t in ids):
        _record(completion_ids=ids, behaviour_logprobs=logprobs)
    else:
        with pytest.raises(RolloutSchemaError, match=r"completion_ids.*item"):
            _record(completion_ids=ids, behaviour_logprobs=logprobs)


@given(st.lists(_ITEMS, max_size=8))
def test_logprobs_are_accepted_exactly_when_every_item_is_finite_and_at_most_zero(
    logprobs: list[object],
) -> None:
    ids = [5] * len(logprobs)
    if all(_valid_logprob(lp) for lp in logprobs):
        _record(completion_ids=ids, behaviour_logprobs=logprobs)
    else:
        with pytest.raises(RolloutSchemaError, match="behaviour_logprobs"):
            _record(completion_ids=ids, behaviour_logprobs=logprobs)
