"""The repair-task schema, its content hash, and the task-set file reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coderepair.protocol.errors import DecodeError
from coderepair.protocol.task import (
    TASKSET_FORMAT_VERSION,
    Mutation,
    RepairTask,
    TaskDecodeError,
    TaskSet,
    loads_taskset,
    read_taskset,
    write_taskset,
)


def function_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "kind": "function",
        "source": "humaneval",
        "problem_id": "HumanEval/0",
        "split": "train",
        "description": "Return one more than x.",
        "files": {"solution.py": "def inc(x):\n    return x + 2\n"},
        "tests": {"test_solution.py": "def check(candidate):\n    assert candidate(1) == 2\n"},
        "entry_point": "solution.py:inc",
        "oracle": {"solution.py": "def inc(x):\n    return x + 1\n"},
        "mutation": Mutation(operator="wrong_constant", line=2, detail="1 -> 2"),
    }
    fields.update(overrides)
    return fields


def repo_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "kind": "repo",
        "source": "repo-fixture",
        "problem_id": "fixture/x",
        "split": "heldout",
        "description": "Fix it.",
        "files": {"pkg/__init__.py": "", "pkg/m.py": "X = 2\n"},
        "tests": {"tests/test_m.py": "from pkg.m import X\n\ndef test_x():\n    assert X == 1\n"},
        "test_command": ("python", "-m", "pytest"),
        "fail_to_pass": ("tests/test_m.py::test_x",),
        "oracle": {"pkg/__init__.py": "", "pkg/m.py": "X = 1\n"},
    }
    fields.update(overrides)
    return fields


def make_set() -> TaskSet:
    tasks = [
        RepairTask.create(**function_fields()),
        RepairTask.create(**function_fields(problem_id="HumanEval/1", split="heldout")),
        RepairTask.create(**repo_fields()),
    ]
    return TaskSet.from_tasks(tasks, builder_version="1", split_rule="by problem", seed=5)


VALID_TEXT = make_set().dumps()


def test_hash_and_id_are_derived_from_content() -> None:
    task = RepairTask.create(**function_fields())
    again = RepairTask.create(**function_fields())
    other = RepairTask.create(**function_fields(description="Something else."))
    assert task.content_hash == again.content_hash
    assert task.task_id == again.task_id == f"function-{task.content_hash[:24]}"
    assert other.content_hash != task.content_hash
    # Tuples and lists, dict order: the same content hashes the same.
    reordered = function_fields(
        files=dict(reversed(list(function_fields()["files"].items()))),
    )
    assert RepairTask.create(**reordered).content_hash == task.content_hash
    assert RepairTask.create(**repo_fields(fail_to_pass=["tests/test_m.py::test_x"])) == (
        RepairTask.create(**repo_fields())
    )


def test_round_trip_through_file(tmp_path: Path) -> None:
    taskset = make_set()
    path = tmp_path / "tasks.jsonl"
    write_taskset(taskset, path)
    loaded = read_taskset(path)
    assert loaded.tasks == taskset.tasks
    assert loaded.header == taskset.header
    assert loaded.header.per_split == {"heldout": 2, "train": 1}
    assert loaded.header.per_operator == {"wrong_constant": 2}
    assert loaded.get(taskset.tasks[2].task_id).kind == "repo"
    assert [t.problem_id for t in loaded.in_split("heldout")] == ["HumanEval/1", "fixture/x"]
    assert path.read_text() == VALID_TEXT


def test_a_tampered_task_is_rejected() -> None:
    lines = VALID_TEXT.splitlines()
    task = json.loads(lines[1])
    task["oracle"]["solution.py"] = "def inc(x):\n    return 42\n"
    lines[1] = json.dumps(task)
    with pytest.raises(TaskDecodeError, match=r"content_hash .* does not match"):
        loads_taskset("\n".join(lines))
    task = json.loads(VALID_TEXT.splitlines()[1])
    task["task_id"] = "function-" + "0" * 24
    with pytest.raises(TaskDecodeError, match="not derived from the content hash"):
        loads_taskset("\n".join([lines[0], json.dumps(task), *VALID_TEXT.splitlines()[2:]]))


def test_truncated_file_and_duplicates_are_rejected() -> None:
    lines = VALID_TEXT.splitlines()
    with pytest.raises(TaskDecodeError, match="truncated"):
        loads_taskset("\n".join(lines[:-1]))
    header = json.loads(lines[0])
    header["total"] = 4
    header["per_split"]["train"] = 2
    header["per_kind"]["function"] = 3
    header["per_operator"]["wrong_constant"] = 3
    with pytest.raises(TaskDecodeError, match="same task_id twice"):
        loads_taskset("\n".join([json.dumps(header), *lines[1:], lines[1]]))


def test_unknown_version_and_foreign_files_are_rejected() -> None:
    lines = VALID_TEXT.splitlines()
    header = json.loads(lines[0])
    header["format_version"] = TASKSET_FORMAT_VERSION + 1
    with pytest.raises(TaskDecodeError, match="format_version 2 is not supported"):
        loads_taskset("\n".join([json.dumps(header), *lines[1:]]))
    with pytest.raises(TaskDecodeError, match="not a task-set header"):
        loads_taskset('{"hello": 1}\n')
    with pytest.raises(TaskDecodeError, match="empty"):
        loads_taskset(b"")
    with pytest.raises(TaskDecodeError, match="not UTF-8"):
        loads_taskset(b"\xff\xfe")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (function_fields(entry_point="inc"), "entry_point"),
        (function_fields(entry_point="other.py:inc"), "entry_point"),
        (function_fields(fail_to_pass=("t::x",)), "leave test_command"),
        (repo_fields(fail_to_pass=()), "at least one fail_to_pass"),
        (repo_fields(entry_point="pkg/m.py:X"), "entry_point is for function tasks"),
        (function_fields(files={"../evil.py": "x"}), "unsafe path"),
        (function_fields(tests={"/abs/test.py": "x"}), "unsafe path"),
        (repo_fields(tests={"pkg/m.py": "x"}), "both code and trusted tests"),
        (function_fields(files={}), "at least 1 item"),
        (function_fields(split="dev"), "split"),
    ],
)
def test_invalid_tasks_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RepairTask.create(**fields)


def test_task_is_frozen_and_hash_fields_are_computed() -> None:
    task = RepairTask.create(**function_fields())
    with pytest.raises(ValidationError):
        task.split = "heldout"  # type: ignore[misc]
    with pytest.raises(TypeError, match="computed"):
        RepairTask.create(**function_fields(), content_hash="0" * 64)


# ----------------------------------------------------------------------------- fuzzing


def _decodes_or_typed_error(data: str | bytes) -> TaskSet | None:
    try:
        return loads_taskset(data)
    except TaskDecodeError:
        return None
    # Any other exception type propagates and fails the test.


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash_the_reader(data: bytes) -> None:
    assert _decodes_or_typed_error(data) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=2000))
def test_random_text_never_crashes_the_reader(text: str) -> None:
    assert _decodes_or_typed_error(text) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(VALID_TEXT) - 1))
def test_every_truncation_is_rejected(cut: int) -> None:
    result = _decodes_or_typed_error(VALID_TEXT[:cut])
    # Only dropping the final newline leaves a complete file.
    if cut == len(VALID_TEXT) - 1:
        assert result is not None and result.tasks == make_set().tasks
    else:
        assert result is None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=len(VALID_TEXT) - 1),
    st.characters(codec="utf-8"),
)
def test_a_changed_character_is_rejected_or_harmless(position: int, char: str) -> None:
    changed = VALID_TEXT[:position] + char + VALID_TEXT[position + 1 :]
    result = _decodes_or_typed_error(changed)
    if result is not None:
        # Accepted only if every task is intact (e.g. JSON whitespace or a header field).
        assert result.tasks == make_set().tasks


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=30,
    )
)
def test_arbitrary_json_task_lines_are_typed_errors(value: object) -> None:
    header = VALID_TEXT.splitlines()[0]
    line = json.dumps(value)
    assert _decodes_or_typed_error(f"{header}\n{line}\n") is None


def test_decode_error_is_a_protocol_decode_error() -> None:
    assert issubclass(TaskDecodeError, DecodeError)
    with pytest.raises(DecodeError):
        loads_taskset("[" * 100_000)
