"""The rollout record: one scored completion, and its Parquet form in the object store.

A `RolloutRecord` is what the coordinator accepts and the trainer learns from. It checks
itself on construction (types, ranges, lengths that must agree), so an invalid record
cannot exist in memory, whoever built it. Parquet files carry `ROLLOUT_SCHEMA` with its
version in the schema metadata; `read_parquet` accepts exactly that schema and turns every
failure — random bytes, a truncated file, another table, an invalid row — into
`RolloutDecodeError`, never a pyarrow exception.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from coderepair.protocol.errors import DecodeError

__all__ = [
    "ROLLOUT_SCHEMA",
    "ROLLOUT_SCHEMA_VERSION",
    "RolloutDecodeError",
    "RolloutRecord",
    "RolloutSchemaError",
    "from_parquet_bytes",
    "read_parquet",
    "rollout_table",
    "shared_prompts",
    "table_parquet_bytes",
    "to_parquet_bytes",
    "write_parquet",
    "write_table",
]

ROLLOUT_SCHEMA_VERSION = "1"
_VERSION_KEY = b"coderepair.rollout.schema_version"
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Token ids are stored as int32 (every real vocabulary fits).
_MAX_TOKEN_ID = (1 << 31) - 1
_MAX_U64 = (1 << 64) - 1
_MAX_I64 = (1 << 63) - 1
# float32 log_softmax of a near-certain token can round a hair above 0.
_LOGPROB_SLACK = 1e-3


def _non_null(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _float_map() -> pa.MapType:
    return pa.map_(pa.string(), _non_null("value", pa.float64()))


ROLLOUT_SCHEMA: pa.Schema = pa.schema(
    [
        _non_null("task_id", pa.string()),
        _non_null("lease_id", pa.string()),
        _non_null("run_id", pa.string()),
        _non_null("worker_key", pa.string()),
        _non_null("policy_version", pa.int64()),
        _non_null("sample_index", pa.int64()),
        _non_null("seed", pa.uint64()),
        _non_null("prompt_ids", pa.list_(_non_null("item", pa.int32()))),
        _non_null("completion_ids", pa.list_(_non_null("item", pa.int32()))),
        _non_null("behaviour_logprobs", pa.list_(_non_null("item", pa.float64()))),
        _non_null("completion_text", pa.string()),
        _non_null("patch", pa.string()),
        _non_null("reward", pa.float64()),
        _non_null("reward_components", _float_map()),
        _non_null("reward_spec_hash", pa.string()),
        _non_null("test_log_sha256", pa.string()),
        _non_null("proof", pa.binary()),
        _non_null("timings", _float_map()),
        _non_null("created_at_ms", pa.int64()),
    ],
    metadata={_VERSION_KEY: ROLLOUT_SCHEMA_VERSION.encode()},
)


_COLUMNS = tuple(f.name for f in ROLLOUT_SCHEMA)
_MAP_COLUMNS = ("reward_components", "timings")


class RolloutSchemaError(DecodeError):
    """A rollout record's fields are missing, mistyped, out of range or inconsistent."""


class RolloutDecodeError(DecodeError):
    """Bytes or a file are not a valid rollout Parquet file of this schema version."""


def _fail(name: str, problem: str) -> RolloutSchemaError:
    return RolloutSchemaError(f"rollout field {name!r}: {problem}")


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(name, f"must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _fail(name, f"must lie in [{lo}, {hi}], got {value}")


def _check_str(name: str, value: object, *, non_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise _fail(name, f"must be a str, got {type(value).__name__}")
    if non_empty and not value:
        raise _fail(name, "must not be empty")


def _check_hex64(name: str, value: object) -> None:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise _fail(
            name, f"must be 64 lowercase hex digits (a sha256 / Ed25519 key), got {value!r}"
        )


def _check_ids(name: str, value: object) -> None:
    if not isinstance(value, list):
        raise _fail(name, f"must be a list of token ids, got {type(value).__name__}")
    # The coordinator checks every token of every rollout it ingests: the common case
    # (plain ints in range) runs in C loops; anything else takes the loop that names
    # the first bad item.
    if not value or (
        set(map(type, value)) == {int} and min(value) >= 0 and max(value) <= _MAX_TOKEN_ID
    ):
        return
    for i, tok in enumerate(value):
        if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok <= _MAX_TOKEN_ID:
            raise _fail(name, f"item {i} must be a token id in [0, {_MAX_TOKEN_ID}], got {tok!r}")


def _check_float(name: str, value: object) -> float:
    if not isinstance(value, float | int) or isinstance(value, bool):
        raise _fail(name, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _fail(name, f"must be finite, got {value!r}")
    return float(value)


def _check_logprobs(value: Sequence[Any]) -> None:
    # As in `_check_ids`: C loops for plain finite floats, the naming loop otherwise.
    if not value or (
        set(map(type, value)) <= {float, int}
        and all(map(math.isfinite, value))
        and max(value) <= _LOGPROB_SLACK
    ):
        return
    for i, lp in enumerate(value):
        if _check_float(f"behaviour_logprobs[{i}]", lp) > _LOGPROB_SLACK:
            raise _fail("behaviour_logprobs", f"item {i} is {lp}, but a logprob is <= 0")


def _check_float_map(name: str, value: object, *, non_negative: bool = False) -> None:
    if not isinstance(value, dict):
        raise _fail(name, f"must be a dict[str, float], got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise _fail(name, f"keys must be non-empty str, got {key!r}")
        number = _check_float(f"{name}[{key!r}]", item)
        if non_negative and number < 0.0:
            raise _fail(name, f"{key!r} must be >= 0, got {number}")


@dataclass(frozen=True)
class RolloutRecord:
    """One completion of one task, scored, with everything needed to audit and train on it."""

    task_id: str
    lease_id: str
    run_id: str
    worker_key: str
    """Hex of the worker's Ed25519 public key (64 lowercase hex digits)."""
    policy_version: int
    sample_index: int
    seed: int
    """The lease's uint64 sampling seed (see `coderepair.protocol.sampling`)."""
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    """log_softmax(logits / T) of each completion token under the sampling policy."""
    completion_text: str
    patch: str
    """The parsed patch ("" when the response was malformed)."""
    reward: float
    reward_components: dict[str, float]
    reward_spec_hash: str
    test_log_sha256: str
    proof: bytes
    """TOPLOC-style proof bytes of the completion."""
    timings: dict[str, float]
    """Seconds per stage (generate, verify, prove, ...), each >= 0."""
    created_at_ms: int

    def __post_init__(self) -> None:
        for name in ("task_id", "lease_id", "run_id"):
            _check_str(name, getattr(self, name), non_empty=True)
        _check_hex64("worker_key", self.worker_key)
        _check_int("policy_version", self.policy_version, 0, _MAX_I64)
        _check_int("sample_index", self.sample_index, 0, (1 << 32) - 1)
        _check_int("seed", self.seed, 0, _MAX_U64)
        _check_ids("prompt_ids", self.prompt_ids)
        if not self.prompt_ids:
            raise _fail("prompt_ids", "must not be empty: every completion has a prompt")
        _check_ids("completion_ids", self.completion_ids)
        if not isinstance(self.behaviour_logprobs, list):
            raise _fail("behaviour_logprobs", "must be a list of floats")
        if len(self.behaviour_logprobs) != len(self.completion_ids):
            raise _fail(
                "behaviour_logprobs",
                f"has {len(self.behaviour_logprobs)} entries but completion_ids has "
                f"{len(self.completion_ids)}: report exactly one logprob per completion token",
            )
        _check_logprobs(self.behaviour_logprobs)
        _check_str("completion_text", self.completion_text)
        _check_str("patch", self.patch)
        _check_float("reward", self.reward)
        _check_float_map("reward_components", self.reward_components)
        _check_hex64("reward_spec_hash", self.reward_spec_hash)
        _check_hex64("test_log_sha256", self.test_log_sha256)
        if not isinstance(self.proof, bytes):
            raise _fail("proof", f"must be bytes, got {type(self.proof).__name__}")
        _check_float_map("timings", self.timings, non_negative=True)
        _check_int("created_at_ms", self.created_at_ms, 0, _MAX_I64)

    @classmethod
    def prechecked(cls, **values: Any) -> RolloutRecord:
        """A record built without `__post_init__`'s checks, by a caller that has made
        every one of them itself; anyone else uses the constructor.

        The coordinator's `check_batch` is that caller: it builds every record it
        ingests from fields it checked against the lease (seeds, prompt, version), the
        run (spec hash) and the signature (key), and checks the worker's own fields
        (token ids, logprobs, reward, hashes) in C-speed loops. Checking them all again
        here cost as much as the rest of its validation. Every field must be given.
        """
        if values.keys() != _FIELD_NAMES:
            missing = sorted(_FIELD_NAMES - values.keys())
            extra = sorted(values.keys() - _FIELD_NAMES)
            raise RolloutSchemaError(f"prechecked record: missing {missing}, unknown {extra}")
        record = object.__new__(cls)
        for name, value in values.items():
            object.__setattr__(record, name, value)
        return record

    def to_row(self) -> dict[str, Any]:
        """The record as a plain dict, one Parquet row."""
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _MAP_COLUMNS:  # Arrow maps are lists of (key, value) pairs
            row[name] = list(row[name].items())
        return row


_FIELD_NAMES = frozenset(f.name for f in fields(RolloutRecord))


def _table(records: Iterable[RolloutRecord]) -> pa.Table:
    records = list(records)
    for i, record in enumerate(records):
        if not isinstance(record, RolloutRecord):
            raise RolloutSchemaError(
                f"record {i} is a {type(record).__name__}, not a RolloutRecord: build records "
                "with RolloutRecord(...) so they are validated"
            )
    # Column by column: a third of the cost of going through one dict per row, and the
    # coordinator encodes every batch it accepts.
    columns: dict[str, Any] = {name: [getattr(r, name) for r in records] for name in _COLUMNS}
    columns["prompt_ids"] = shared_prompts(columns["prompt_ids"])
    return rollout_table(columns)


def shared_prompts(prompts: list[Sequence[int]]) -> Any:
    """The prompt_ids column for rows whose prompts are shared list objects.

    The G samples of a task share one prompt list (the coordinator's check builds them
    so): each distinct prompt is converted once and repeated by index, not once per row.
    """
    slot: dict[int, int] = {}
    distinct: list[Any] = []
    for prompt in prompts:
        if slot.setdefault(id(prompt), len(slot)) == len(distinct):
            distinct.append(prompt)
    if len(distinct) == len(prompts):
        return prompts
    index = pa.array([slot[id(p)] for p in prompts], type=pa.int32())
    return pa.array(distinct, type=ROLLOUT_SCHEMA.field("prompt_ids").type).take(index)


def rollout_table(columns: Mapping[str, Any]) -> pa.Table:
    """A table of `ROLLOUT_SCHEMA` from one column per field: a list of Python values
    (the map columns as dicts) or an Arrow array of the column's type.

    For a writer that holds its rows as columns already, such as the coordinator's
    batch check, whose token columns are numpy buffers; it must check what
    `RolloutRecord` would (this builds no record), and Arrow checks the types.
    """
    if columns.keys() != _FIELD_NAMES:
        missing = sorted(_FIELD_NAMES - columns.keys())
        extra = sorted(columns.keys() - _FIELD_NAMES)
        raise RolloutSchemaError(f"rollout columns: missing {missing}, unknown {extra}")
    data = dict(columns)
    for name in _MAP_COLUMNS:  # Arrow maps are lists of (key, value) pairs
        if not isinstance(data[name], pa.Array):
            data[name] = [list(m.items()) for m in data[name]]
    return pa.Table.from_pydict(data, schema=ROLLOUT_SCHEMA)


def write_table(table: pa.Table, sink: str | Path | IO[bytes]) -> None:
    """Write a `ROLLOUT_SCHEMA` table as one Parquet file (lz4) to a path or stream."""
    if not table.schema.equals(ROLLOUT_SCHEMA, check_metadata=True):
        raise RolloutSchemaError(f"the table's schema is not the rollout schema: {table.schema}")
    target = str(sink) if isinstance(sink, Path) else sink
    # No dictionary pages or column statistics: token ids and texts do not repeat within
    # a batch and nobody filters these files by value. Both cost time and, here, bytes
    # (a 16-rollout batch: 11.6 KB instead of 26.6 KB, 1.3 ms instead of 2.0 ms).
    # lz4, not zstd: the coordinator encodes every batch it accepts, on the path of the
    # worker's answer. A 64-rollout batch whose proofs, log-probabilities and token ids
    # look like real ones (random bytes, real numbers, Zipf-distributed ids) took
    # 1.04 ms and 281 KB with lz4, 1.69 ms and 255 KB with zstd: 10% more bytes for
    # 40% less CPU. (zstd shrinks only text and repeats much better, and those are
    # a small part of a batch.)
    pq.write_table(table, target, compression="lz4", use_dictionary=False, write_statistics=False)


def table_parquet_bytes(table: pa.Table) -> bytes:
    """A `ROLLOUT_SCHEMA` table as the bytes of one Parquet file."""
    # Arrow's own stream, not io.BytesIO: the writer then never calls back into Python
    # for its many small writes (a 64-rollout batch: 2.1 ms instead of 3.1, same bytes).
    sink = pa.BufferOutputStream()
    write_table(table, sink)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def write_parquet(records: Iterable[RolloutRecord], sink: str | Path | IO[bytes]) -> None:
    """Write records as one Parquet file (lz4) with `ROLLOUT_SCHEMA` to a path or stream."""
    write_table(_table(records), sink)


def to_parquet_bytes(records: Iterable[RolloutRecord]) -> bytes:
    """Records as the bytes of one Parquet file."""
    return table_parquet_bytes(_table(records))


def _read_rows(source: str | Path | bytes) -> list[dict[str, Any]]:
    if isinstance(source, bytes | bytearray | memoryview):
        handle: Any = pa.BufferReader(bytes(source))
    elif isinstance(source, str | Path):
        handle = str(source)
    else:
        raise RolloutDecodeError(f"source must be a path or bytes, got {type(source).__name__}")
    # pyarrow reports bad input with a handful of exception types (ArrowInvalid is a
    # ValueError, ArrowIOError an OSError, ...); all of them mean "not our file".
    try:
        parquet = pq.ParquetFile(handle)
        _check_schema(parquet.schema_arrow)
        rows: list[dict[str, Any]] = parquet.read().to_pylist()
        return rows
    except RolloutDecodeError:
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise RolloutDecodeError(
            f"not a readable Parquet file ({type(exc).__name__}: {exc}); the file is "
            "truncated, corrupt or not Parquet"
        ) from exc


def _check_schema(schema: pa.Schema) -> None:
    version = (schema.metadata or {}).get(_VERSION_KEY)
    if version != ROLLOUT_SCHEMA_VERSION.encode():
        raise RolloutDecodeError(
            f"Parquet file has rollout schema version {version!r}, this code reads version "
            f"{ROLLOUT_SCHEMA_VERSION!r}: it is another table or was written by an "
            "incompatible release"
        )
    if not schema.remove_metadata().equals(ROLLOUT_SCHEMA.remove_metadata()):
        raise RolloutDecodeError(
            f"Parquet file's columns do not match the rollout schema v{ROLLOUT_SCHEMA_VERSION}: "
            f"got {schema.remove_metadata()}"
        )


def _to_dict(name: str, pairs: object) -> dict[str, float]:
    if not isinstance(pairs, list):
        raise RolloutSchemaError(f"rollout field {name!r}: expected map entries")
    out: dict[str, float] = {}
    for key, value in pairs:
        if key in out:
            raise RolloutSchemaError(f"rollout field {name!r}: duplicate key {key!r}")
        out[key] = value
    return out


def _record(row: Mapping[str, Any]) -> RolloutRecord:
    values = dict(row)
    values["reward_components"] = _to_dict("reward_components", values["reward_components"])
    values["timings"] = _to_dict("timings", values["timings"])
    return RolloutRecord(**values)


def read_parquet(source: str | Path | bytes) -> list[RolloutRecord]:
    """Read records from a Parquet file (path or bytes); `RolloutDecodeError` on any flaw."""
    records = []
    for i, row in enumerate(_read_rows(source)):
        try:
            records.append(_record(row))
        except RolloutSchemaError as exc:
            raise RolloutDecodeError(f"row {i} is not a valid rollout record: {exc}") from exc
    return records


def from_parquet_bytes(data: bytes) -> list[RolloutRecord]:
    """Records from the bytes of one Parquet file."""
    return read_parquet(data)
