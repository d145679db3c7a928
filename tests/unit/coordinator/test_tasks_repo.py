"""Repository tasks: the bundled fixtures and the SWE-style JSONL loader."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.coordinator.tasks.repo import (
    RepoTaskError,
    load_fixtures,
    load_jsonl,
    read_tarball,
)
from coderepair.coordinator.tasks.split import split_of


def test_fixtures_are_multi_file_projects_with_one_injected_bug() -> None:
    tasks = load_fixtures()
    assert len(tasks) >= 3
    for task in tasks:
        assert task.kind == "repo" and task.source == "repo-fixture"
        assert len(task.files) >= 3
        assert all(path.startswith("tests/") for path in task.tests)
        assert set(task.files) == set(task.oracle)
        changed = [p for p in task.files if task.files[p] != task.oracle[p]]
        assert len(changed) == 1, changed
        assert task.fail_to_pass and task.pass_to_pass
        assert not set(task.fail_to_pass) & set(task.pass_to_pass)
        for test_id in task.fail_to_pass + task.pass_to_pass:
            path, _, name = test_id.partition("::")
            assert f"def {name}(" in task.tests[path]
        assert task.split == split_of(task.problem_id)
    assert [t.task_id for t in tasks] == [t.task_id for t in load_fixtures()]


def record(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "instance_id": "org__proj-1",
        "problem_statement": "X should be 1.",
        "files": {
            "proj/m.py": "X = 2\n",
            "tests/test_m.py": "from proj.m import X\n\ndef test_x():\n    assert X == 1\n",
        },
        "oracle_files": {"proj/m.py": "X = 1\n"},
        "FAIL_TO_PASS": '["tests/test_m.py::test_x"]',
        "PASS_TO_PASS": "[]",
        "test_command": "python -m pytest -q",
        "extra_field_from_the_dataset": 1,
    }
    base.update(overrides)
    return base


def write_jsonl(path: Path, *records: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_swe_style_record_with_files(tmp_path: Path) -> None:
    (task,) = load_jsonl(write_jsonl(tmp_path / "tasks.jsonl", record()))
    assert task.source == "jsonl" and task.problem_id == "org__proj-1"
    assert task.files == {"proj/m.py": "X = 2\n"}
    assert list(task.tests) == ["tests/test_m.py"]  # moved out of the patchable files
    assert task.oracle == {"proj/m.py": "X = 1\n"}
    assert task.fail_to_pass == ("tests/test_m.py::test_x",)
    assert task.test_command == ("python", "-m", "pytest", "-q")


def _tarball(path: Path, members: dict[str, str], symlink: bool = False) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            link = tarfile.TarInfo("repo/evil")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)
    return path


def test_snapshot_tarballs_are_read_with_their_root_stripped(tmp_path: Path) -> None:
    files = record()["files"]
    _tarball(tmp_path / "snap.tar.gz", {f"repo/{p}": t for p, t in files.items()})
    rec = record(snapshot="snap.tar.gz")
    del rec["files"]
    (task,) = load_jsonl(write_jsonl(tmp_path / "t.jsonl", rec))
    assert task.files == {"proj/m.py": "X = 2\n"}
    _tarball(tmp_path / "bad.tar.gz", {"repo/a.py": "x\n"}, symlink=True)
    with pytest.raises(RepoTaskError, match="link or special file"):
        read_tarball(tmp_path / "bad.tar.gz")
    _tarball(tmp_path / "escape.tar.gz", {"a/../../etc/x": "x\n", "b.py": "y\n"})
    with pytest.raises(RepoTaskError, match="unsafe path"):
        read_tarball(tmp_path / "escape.tar.gz")
    with pytest.raises(RepoTaskError, match="cannot open tarball"):
        read_tarball(tmp_path / "missing.tar.gz")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"instance_id": ""}, "instance_id"),
        ({"FAIL_TO_PASS": "[]"}, "FAIL_TO_PASS is empty"),
        ({"FAIL_TO_PASS": "not json"}, "not a JSON list"),
        ({"PASS_TO_PASS": [1]}, "list of pytest node ids"),
        ({"FAIL_TO_PASS": ["tests/test_gone.py::test_x"]}, "snapshot lacks"),
        ({"files": {"/etc/passwd": "x"}}, "unsafe path"),
        ({"files": "x"}, "mapping paths to file text"),
        ({"test_command": 3}, "test_command"),
        ({"oracle_files": None, "patch": "diff --git"}, "unified-diff"),
    ],
)
def test_malformed_records_are_typed_errors(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    rec = record(**overrides)
    if rec.get("oracle_files") is None:
        rec.pop("oracle_files", None)
    with pytest.raises(RepoTaskError, match=message):
        load_jsonl(write_jsonl(tmp_path / "t.jsonl", rec))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=500))
def test_random_jsonl_bytes_are_typed_errors_or_nothing(tmp_path_factory: Any, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "t.jsonl"
    path.write_bytes(data)
    try:
        tasks = load_jsonl(path)
    except RepoTaskError:
        return
    assert tasks == []  # only blank input decodes, to no tasks


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=len(json.dumps(record())) - 1))
def test_truncated_records_are_typed_errors(tmp_path_factory: Any, cut: int) -> None:
    path = tmp_path_factory.mktemp("cut") / "t.jsonl"
    path.write_text(json.dumps(record())[:cut])
    with pytest.raises(RepoTaskError):
        load_jsonl(path)
