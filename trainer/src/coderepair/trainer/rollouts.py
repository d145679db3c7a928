"""Where the trainer's rollouts come from, and how rows become GRPO groups.

The coordinator streams accepted rollouts in acceptance order, each row with a strictly
increasing ``cursor``; the trainer acknowledges the cursor of its last checkpoint, and a
resumed trainer reopens the stream after it. `RolloutSource` is that contract; the gRPC
stream client implements it elsewhere, and this module has two sources for tests, demos
and offline runs: `InMemorySource` (a list of rows) and `ParquetSource` (rollout Parquet
files, rows numbered 1, 2, ... in file order).

`GroupAssembler` turns rows into groups: the G rows of one ``(lease_id, task_id)`` have
consecutive cursors, so a group closes when it has ``group_size`` rows, when a row of
another group arrives (a partial group: an audit voided part of it), or when the source
ends. Each group remembers its last cursor, so the trainer can say exactly up to where it
has consumed the stream.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.rollout import RolloutRecord, read_parquet

__all__ = [
    "GroupAssembler",
    "InMemorySource",
    "ParquetSource",
    "RolloutGroup",
    "RolloutSource",
    "SourceError",
    "SourcedRollout",
]


class SourceError(ProtocolError):
    """A rollout source was misused or produced rows out of order."""


@dataclass(frozen=True)
class SourcedRollout:
    """One accepted rollout as the stream delivers it."""

    cursor: int
    """Position in the run's acceptance order (>= 1, strictly increasing)."""
    record: RolloutRecord
    group_size: int | None = None
    """The lease's G; None when unknown (a group then ends at the next group's row)."""

    @property
    def group_key(self) -> tuple[str, str]:
        return (self.record.lease_id, self.record.task_id)


@dataclass(frozen=True)
class RolloutGroup:
    """The samples of one task under one lease, in cursor order."""

    rows: tuple[SourcedRollout, ...]

    @property
    def key(self) -> tuple[str, str]:
        return self.rows[0].group_key

    @property
    def last_cursor(self) -> int:
        return self.rows[-1].cursor

    @property
    def policy_version(self) -> int:
        """The oldest version among the rows (a lease has one version; be conservative)."""
        return min(row.record.policy_version for row in self.rows)

    @property
    def complete(self) -> bool:
        size = self.rows[0].group_size
        return size is None or len(self.rows) == size


class RolloutSource(abc.ABC):
    """An ordered, resumable stream of accepted rollouts.

    Lifecycle: ``open(after_cursor)`` once, then ``read`` until it returns None (the
    source has ended; a following stream never ends), ``ack(cursor)`` after each durable
    checkpoint and ``ack(checkpointed, consumed=cursor)`` while the trainer waits for rows,
    ``close()``. Rows come in strictly increasing cursor order.
    """

    @abc.abstractmethod
    def open(self, after_cursor: int) -> None:
        """Start reading at the first row whose cursor is greater than ``after_cursor``."""

    @abc.abstractmethod
    def read(self, max_rows: int, timeout_s: float) -> list[SourcedRollout] | None:
        """Up to ``max_rows`` next rows; [] if none came within ``timeout_s``; None at end."""

    def ack(self, cursor: int, *, consumed: int = 0) -> bool:
        """Every row with cursor <= ``cursor`` is consumed and checkpointed, and every row
        up to ``consumed`` (0: ``cursor``) is consumed: trained on, dropped, or held for
        the step being assembled. A coordinator counts its back-pressure from ``consumed``,
        so rows the trainer dropped free room for the leases that bring usable ones.
        Returns False when the ack did not arrive (the caller may send it again)."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release the stream."""


class InMemorySource(RolloutSource):
    """Rows held in a list (tests, benchmarks). Records the acks it receives."""

    def __init__(self, rows: Sequence[SourcedRollout]) -> None:
        cursors = [row.cursor for row in rows]
        if any(c < 1 for c in cursors) or any(b <= a for a, b in itertools.pairwise(cursors)):
            raise SourceError(
                "rows must have cursors >= 1 in strictly increasing order, as the coordinator "
                "streams them; sort or renumber them"
            )
        self._rows = list(rows)
        self._position: int | None = None
        self.acked: list[int] = []
        self.consumed: list[int] = []

    @classmethod
    def from_records(
        cls, records: Iterable[RolloutRecord], *, group_size: int | None = None
    ) -> InMemorySource:
        """Number records 1, 2, ... in order."""
        return cls(
            [
                SourcedRollout(cursor=i, record=r, group_size=group_size)
                for i, r in enumerate(records, start=1)
            ]
        )

    def open(self, after_cursor: int) -> None:
        if after_cursor < 0:
            raise SourceError(f"after_cursor must be >= 0, got {after_cursor}")
        self._position = next(
            (i for i, row in enumerate(self._rows) if row.cursor > after_cursor), len(self._rows)
        )

    def read(self, max_rows: int, timeout_s: float) -> list[SourcedRollout] | None:
        if self._position is None:
            raise SourceError("read() before open(): open the source at a cursor first")
        if self._position >= len(self._rows):
            return None
        chunk = self._rows[self._position : self._position + max(1, max_rows)]
        self._position += len(chunk)
        return chunk

    def ack(self, cursor: int, *, consumed: int = 0) -> bool:
        self.acked.append(cursor)
        self.consumed.append(max(cursor, consumed))
        return True


class ParquetSource(InMemorySource):
    """Rollout Parquet files read in the given order; rows numbered 1, 2, ... across files."""

    def __init__(self, paths: Sequence[Path | str], *, group_size: int | None = None) -> None:
        records: list[RolloutRecord] = []
        for path in paths:
            records.extend(read_parquet(Path(path)))
        numbered = InMemorySource.from_records(records, group_size=group_size)
        super().__init__(numbered._rows)


class GroupAssembler:
    """Collects rows into complete groups, in stream order."""

    def __init__(self) -> None:
        self._pending: list[SourcedRollout] = []
        self._last_cursor = 0
        self.partial_groups = 0
        """Groups closed with fewer rows than their group_size."""

    def push(self, rows: Iterable[SourcedRollout]) -> list[RolloutGroup]:
        """Add rows; return the groups they completed."""
        done: list[RolloutGroup] = []
        for row in rows:
            if row.cursor <= self._last_cursor:
                raise SourceError(
                    f"row cursor {row.cursor} after {self._last_cursor}: the source must "
                    "deliver strictly increasing cursors"
                )
            self._last_cursor = row.cursor
            if self._pending and self._pending[0].group_key != row.group_key:
                done.append(self._close())
            self._pending.append(row)
            size = row.group_size
            if size is not None and len(self._pending) >= size:
                done.append(self._close())
        return done

    def flush(self) -> list[RolloutGroup]:
        """The source has ended: close the pending group, if any."""
        return [self._close()] if self._pending else []

    def _close(self) -> RolloutGroup:
        group = RolloutGroup(tuple(self._pending))
        self._pending = []
        if not group.complete:
            self.partial_groups += 1
        return group
