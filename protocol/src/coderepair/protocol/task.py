"""Repair tasks and the task-set file: what a lease names, what workers and auditors run.

A `RepairTask` is a buggy snapshot plus the trusted tests that judge a patch of it. Two
kinds exist:

- ``function``: a HumanEval-style problem. ``files`` holds the buggy module,
  ``tests`` a trusted module defining ``check(candidate)``, ``entry_point`` names the
  function as ``"path.py:name"``; ``mutation`` records how the bug was made.
- ``repo``: a small repository (SWE-Gym / R2E-Gym / SWE-smith shape). ``tests`` are the
  trusted test files, ``test_command`` how they are run, ``fail_to_pass`` the test ids
  the bug breaks and ``pass_to_pass`` those that must keep passing.

Both carry ``oracle``: the fixed files, which the similarity reward compares against.

Every task is content-addressed: ``content_hash`` is the sha256 of the canonical JSON
(sorted keys, no whitespace, UTF-8) of every field except ``task_id`` and
``content_hash``, and ``task_id`` is derived from that hash. A task whose hash does not
match its content cannot be constructed, so a worker and an auditor holding the same
``task_id`` hold the same task.

The task-set file is JSONL: the first line is a `TaskSetHeader` (format version,
builder version, seed, counts, split rule), then one task per line. `read_taskset`
raises `TaskDecodeError` for anything malformed: bad UTF-8, bad JSON, unknown fields,
hash mismatches, duplicate ids, counts that disagree with the tasks (a truncated file).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coderepair.protocol.errors import DecodeError
from coderepair.protocol.patch import UnsafePath, check_path

TASKSET_FORMAT: Final = "coderepair-taskset"
"""The ``format`` field of every task-set header."""
TASKSET_FORMAT_VERSION = 1
"""The task-set format this module reads and writes."""
MAX_LINE_CHARS = 8 * 1024 * 1024
"""Longest accepted line of a task-set file: one task is a few kilobytes to a few hundred."""

TaskKind = Literal["function", "repo"]
TaskSource = Literal["humaneval", "repo-fixture", "jsonl"]
Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")


class TaskDecodeError(DecodeError):
    """A task or task-set file is malformed; the message names the line and the problem."""


def canonical_json(value: Any) -> bytes:
    """The one byte encoding that task hashes are computed over."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _check_paths(paths: Iterable[str], field: str) -> None:
    for path in paths:
        try:
            check_path(path)
        except UnsafePath as exc:
            raise ValueError(f"{field}: {exc}") from None


class Mutation(BaseModel):
    """How a function task's bug was made from the canonical solution."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operator: str = Field(min_length=1, max_length=64)
    """Name of the AST mutation operator (e.g. ``comparison_swap``)."""
    line: int = Field(ge=1)
    """1-based line, in the buggy file, of the mutated node (or where a statement was dropped)."""
    detail: str = Field("", max_length=500)
    """What changed, for people reading the corpus (e.g. ``'<' -> '<='``)."""


class RepairTask(BaseModel):
    """One repair task; build it with `RepairTask.create`, which fills the hash and id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: str = Field(pattern=r"^(function|repo)-[0-9a-f]{24}$")
    """``<kind>-`` and the first 24 hex digits of ``content_hash``; what leases name."""
    kind: TaskKind
    """``function`` (HumanEval-style, judged by ``check``) or ``repo`` (judged by pytest ids)."""
    source: TaskSource
    """Where the task came from: ``humaneval``, the bundled ``repo-fixture`` set, or ``jsonl``."""
    problem_id: str = Field(min_length=1, max_length=256)
    """The problem the bug was made in; the train/held-out split is by this id."""
    split: Split
    """``train`` or ``heldout``; all tasks of one problem share a split."""
    description: str
    """The problem statement shown to the model."""
    files: dict[str, str] = Field(min_length=1)
    """The buggy snapshot: relative POSIX path → file text."""
    tests: dict[str, str] = Field(min_length=1)
    """The trusted test files (never patchable): relative path → text."""
    entry_point: str = ""
    """Function kind: ``"path.py:function_name"`` of the candidate; empty for repo tasks."""
    test_command: tuple[str, ...] = ()
    """Repo kind: the argv that runs the tests (informational; the sandbox runs pytest ids)."""
    fail_to_pass: tuple[str, ...] = ()
    """Repo kind: pytest node ids that fail on ``files`` and pass on ``oracle``."""
    pass_to_pass: tuple[str, ...] = ()
    """Repo kind: pytest node ids that pass on both ``files`` and ``oracle``."""
    oracle: dict[str, str] = Field(min_length=1)
    """The fixed files (same paths as ``files``), for the similarity reward and audits."""
    mutation: Mutation | None = None
    """Function tasks made by mutation: the operator and line; None otherwise."""
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the canonical JSON of every field except ``task_id`` and this one."""

    @field_validator("files", "tests", "oracle")
    @classmethod
    def _safe_paths(cls, value: dict[str, str], info: Any) -> dict[str, str]:
        _check_paths(value, info.field_name)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RepairTask:
        if self.kind == "function":
            path, sep, name = self.entry_point.partition(":")
            if not sep or not name.isidentifier() or path not in self.files:
                raise ValueError(
                    f"entry_point {self.entry_point!r} must be 'path.py:function_name' with "
                    "the path one of the task's files"
                )
            if self.fail_to_pass or self.pass_to_pass or self.test_command:
                raise ValueError(
                    "a function task is judged by check(); leave test_command, fail_to_pass "
                    "and pass_to_pass empty"
                )
        else:
            if not self.fail_to_pass or not self.test_command:
                raise ValueError(
                    "a repo task needs a test_command and at least one fail_to_pass test id"
                )
            if self.entry_point:
                raise ValueError("entry_point is for function tasks; leave it empty")
        overlap = (set(self.files) | set(self.oracle)) & set(self.tests)
        if overlap:
            raise ValueError(
                f"paths {sorted(overlap)[:5]} are both code and trusted tests; a test file "
                "may not be part of the patchable snapshot"
            )
        expected = _hash_of(self.model_dump(mode="json"))
        if self.content_hash != expected:
            raise ValueError(
                f"content_hash {self.content_hash[:16]}… does not match the task's content "
                f"({expected[:16]}…): the task was altered after it was built; rebuild it"
            )
        if self.task_id != task_id_for(self.kind, expected):
            raise ValueError(
                f"task_id {self.task_id!r} is not derived from the content hash; expected "
                f"{task_id_for(self.kind, expected)!r}"
            )
        return self

    @classmethod
    def create(cls, **fields: Any) -> RepairTask:
        """Build a task from its content fields, computing ``content_hash`` and ``task_id``.

        Raises pydantic's ValidationError when a field is invalid.
        """
        if "task_id" in fields or "content_hash" in fields:
            raise TypeError("task_id and content_hash are computed; do not pass them")
        # Validate once without the hash to normalize the fields (tuples, defaults) the
        # same way the reader will, so the hash covers exactly what is serialized.
        draft = _RepairTaskContent.model_validate(fields)
        content = draft.model_dump(mode="json")
        digest = _hash_of(content)
        return cls.model_validate(
            {**content, "content_hash": digest, "task_id": task_id_for(draft.kind, digest)}
        )

    def to_json_line(self) -> str:
        """The task as one JSONL line (no trailing newline), keys sorted."""
        return canonical_json(self.model_dump(mode="json")).decode("utf-8")


class _RepairTaskContent(BaseModel):
    """`RepairTask`'s content fields only: normalizes input before hashing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: TaskKind
    source: TaskSource
    problem_id: str
    split: Split
    description: str
    files: dict[str, str]
    tests: dict[str, str]
    entry_point: str = ""
    test_command: tuple[str, ...] = ()
    fail_to_pass: tuple[str, ...] = ()
    pass_to_pass: tuple[str, ...] = ()
    oracle: dict[str, str]
    mutation: Mutation | None = None


def _hash_of(dumped: Mapping[str, Any]) -> str:
    content = {k: v for k, v in dumped.items() if k not in ("task_id", "content_hash")}
    return hashlib.sha256(canonical_json(content)).hexdigest()


def task_id_for(kind: str, content_hash: str) -> str:
    """The task id of a task of ``kind`` whose content hashes to ``content_hash``."""
    return f"{kind}-{content_hash[:24]}"


class TaskSetHeader(BaseModel):
    """The first line of a task-set file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["coderepair-taskset"] = TASKSET_FORMAT
    """Always ``coderepair-taskset``: tells this file from other JSONL."""
    format_version: int = Field(TASKSET_FORMAT_VERSION, ge=1)
    """Version of this file format; readers refuse versions they do not know."""
    builder_version: str = Field(min_length=1, max_length=64)
    """Version of the builder that made the tasks (a new builder may make other mutants)."""
    seed: int | None = None
    """Seed the builder used; the same seed and builder version give the same hashes."""
    split_rule: str = Field(min_length=1, max_length=500)
    """How problems were assigned to train / held-out, in words."""
    total: int = Field(ge=0)
    """Number of task lines that follow."""
    per_split: dict[str, int]
    """Task counts per split."""
    per_kind: dict[str, int]
    """Task counts per kind."""
    per_operator: dict[str, int]
    """Task counts per mutation operator (function tasks made by mutation)."""


def _counts(tasks: Iterable[RepairTask]) -> dict[str, dict[str, int]]:
    split: Counter[str] = Counter()
    kind: Counter[str] = Counter()
    operator: Counter[str] = Counter()
    for task in tasks:
        split[task.split] += 1
        kind[task.kind] += 1
        if task.mutation is not None:
            operator[task.mutation.operator] += 1
    return {
        "per_split": dict(sorted(split.items())),
        "per_kind": dict(sorted(kind.items())),
        "per_operator": dict(sorted(operator.items())),
    }


class TaskSet:
    """A header and its tasks, in file order; look tasks up by id with `get`."""

    def __init__(self, header: TaskSetHeader, tasks: Iterable[RepairTask]) -> None:
        self.header = header
        self.tasks: tuple[RepairTask, ...] = tuple(tasks)
        self._by_id = {task.task_id: task for task in self.tasks}
        if len(self._by_id) != len(self.tasks):
            raise TaskDecodeError("the task set holds the same task_id twice; deduplicate it")
        counts = _counts(self.tasks)
        actual = {"total": len(self.tasks), **counts}
        declared = {key: getattr(header, key) for key in actual}
        if actual != declared:
            raise TaskDecodeError(
                f"the header's counts {declared} disagree with the tasks {actual}; the file "
                "is truncated or was edited by hand: rebuild it"
            )

    @classmethod
    def from_tasks(
        cls,
        tasks: Iterable[RepairTask],
        *,
        builder_version: str,
        split_rule: str,
        seed: int | None = None,
    ) -> TaskSet:
        """A task set whose header counts are computed from ``tasks``."""
        tasks = tuple(tasks)
        header = TaskSetHeader(
            builder_version=builder_version,
            seed=seed,
            split_rule=split_rule,
            total=len(tasks),
            **_counts(tasks),
        )
        return cls(header, tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def get(self, task_id: str) -> RepairTask:
        """The task with ``task_id``; KeyError if the set has none."""
        return self._by_id[task_id]

    def in_split(self, split: Split) -> tuple[RepairTask, ...]:
        """The tasks of one split, in file order."""
        return tuple(task for task in self.tasks if task.split == split)

    def dumps(self) -> str:
        """The task-set file's text."""
        lines = [canonical_json(self.header.model_dump(mode="json")).decode("utf-8")]
        lines += [task.to_json_line() for task in self.tasks]
        return "\n".join(lines) + "\n"


def _parse_line(line: str, number: int) -> Any:
    if len(line) > MAX_LINE_CHARS:
        raise TaskDecodeError(
            f"line {number}: {len(line)} characters, more than {MAX_LINE_CHARS}; this is "
            "not a task-set file"
        )
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise TaskDecodeError(
            f"line {number}: not valid JSON ({str(exc)[:100]}); each line of a task-set "
            "file is one JSON object"
        ) from None


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(object)"
    return f"{where}: {first['msg'][:300]} ({exc.error_count()} error(s))"


def loads_taskset(data: str | bytes) -> TaskSet:
    """Parse a task-set file's content; raise `TaskDecodeError` for anything malformed."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TaskDecodeError(
                f"the task-set file is not UTF-8 (byte {exc.start}); it must be written "
                "by write_taskset"
            ) from None
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise TaskDecodeError("the task-set file is empty; it needs a header line")
    raw_header = _parse_line(lines[0], 1)
    if not isinstance(raw_header, dict) or raw_header.get("format") != TASKSET_FORMAT:
        raise TaskDecodeError(
            f"line 1: not a task-set header (expected a JSON object with "
            f'"format": "{TASKSET_FORMAT}")'
        )
    version = raw_header.get("format_version")
    if version != TASKSET_FORMAT_VERSION:
        raise TaskDecodeError(
            f"line 1: format_version {version!r} is not supported (this reader knows "
            f"{TASKSET_FORMAT_VERSION}); upgrade coderepair-protocol or rebuild the file"
        )
    try:
        header = TaskSetHeader.model_validate(raw_header)
    except ValidationError as exc:
        raise TaskDecodeError(f"line 1: bad header: {_validation_message(exc)}") from None
    tasks = []
    for number, line in enumerate(lines[1:], start=2):
        raw = _parse_line(line, number)
        if not isinstance(raw, dict):
            raise TaskDecodeError(f"line {number}: a task must be a JSON object")
        try:
            tasks.append(RepairTask.model_validate(raw))
        except ValidationError as exc:
            raise TaskDecodeError(f"line {number}: bad task: {_validation_message(exc)}") from None
    return TaskSet(header, tasks)


def read_taskset(path: str | Path) -> TaskSet:
    """Read a task-set file; `TaskDecodeError` if malformed, OSError if unreadable."""
    return loads_taskset(Path(path).read_bytes())


def write_taskset(taskset: TaskSet, path: str | Path) -> None:
    """Write ``taskset`` to ``path`` atomically (a temp file renamed into place)."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(taskset.dumps(), encoding="utf-8")
    tmp.replace(target)
