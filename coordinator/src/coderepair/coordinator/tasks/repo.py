"""Repository repair tasks: SWE-Gym / R2E-Gym / SWE-smith shaped JSONL, and bundled fixtures.

A repository task is a snapshot of a small project with a bug, the trusted test files,
a test command and two lists of pytest node ids: FAIL_TO_PASS (broken by the bug) and
PASS_TO_PASS (must keep passing).

`load_jsonl` reads one instance per line. Accepted fields (unknown fields are ignored,
so records from those datasets load as they are):

- ``instance_id`` (required): the problem id; the train/held-out split is by it.
- ``problem_statement``: the text shown to the model.
- The buggy snapshot: ``files`` (an object, path → text) or ``snapshot`` (a ``.tar``,
  ``.tar.gz`` or ``.tgz`` path, relative to the JSONL file; a single top-level directory
  shared by every member is stripped).
- The fix: ``oracle_files`` (path → text of the fixed files, laid over the snapshot) or
  ``oracle_snapshot`` (a tarball of the whole fixed tree). Unified-diff ``patch`` fields
  are not applied: convert them to ``oracle_files`` first.
- ``FAIL_TO_PASS`` (required, non-empty) and ``PASS_TO_PASS``: lists of node ids, or
  JSON strings holding such lists (SWE-bench stores them that way).
- ``test_command``: a string or an argv list; default ``python -m pytest``.
- The trusted tests: ``tests`` (path → text) or, when absent, the snapshot files that the
  test ids name (``path/test_x.py::test_y`` → ``path/test_x.py``), moved out of the
  patchable files.

`load_fixtures` builds the bundled fixture tasks (see ``fixtures/README.md``). Nothing
here runs code: tasks are verified in the sandbox by the builder.
"""

from __future__ import annotations

import json
import shlex
import tarfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from coderepair.coordinator.tasks.split import split_of
from coderepair.protocol.patch import UnsafePath, check_path
from coderepair.protocol.task import RepairTask, TaskDecodeError, TaskSource

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
"""The bundled fixture projects."""
DEFAULT_TEST_COMMAND = ("python", "-m", "pytest")
MAX_SNAPSHOT_FILES = 5_000
MAX_SNAPSHOT_BYTES = 50 * 1024 * 1024
"""Limits on one snapshot: repair tasks are small repositories, not monorepos."""


class RepoTaskError(TaskDecodeError):
    """A repository task record (JSONL line, tarball or fixture) is malformed."""


def load_jsonl(path: str | Path) -> list[RepairTask]:
    """The repository tasks of a JSONL file, in file order (source ``jsonl``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RepoTaskError(f"{path}: not UTF-8 (byte {exc.start}); JSONL must be UTF-8") from None
    tasks = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise RepoTaskError(f"{where}: not valid JSON ({str(exc)[:100]})") from None
        if not isinstance(record, dict):
            raise RepoTaskError(f"{where}: each line must be a JSON object (one instance)")
        tasks.append(task_from_record(record, base_dir=path.parent, where=where))
    return tasks


def task_from_record(
    record: Mapping[str, Any],
    *,
    base_dir: Path,
    where: str,
    source: TaskSource = "jsonl",
) -> RepairTask:
    """One repository task from a SWE-style record (see the module docstring)."""
    instance_id = record.get("instance_id")
    if not isinstance(instance_id, str) or not instance_id:
        raise RepoTaskError(f"{where}: 'instance_id' is required (a non-empty string)")
    fail_to_pass = _id_list(record.get("FAIL_TO_PASS"), "FAIL_TO_PASS", where)
    pass_to_pass = _id_list(record.get("PASS_TO_PASS", []), "PASS_TO_PASS", where)
    if not fail_to_pass:
        raise RepoTaskError(
            f"{where}: FAIL_TO_PASS is empty; a repair task needs at least one test the bug breaks"
        )
    snapshot = _snapshot(record, "files", "snapshot", base_dir, where)
    if "patch" in record and "oracle_files" not in record and "oracle_snapshot" not in record:
        raise RepoTaskError(
            f"{where}: only a unified-diff 'patch' is given; apply it and store the fixed "
            "files as 'oracle_files' (path -> text)"
        )
    if "oracle_snapshot" in record:
        oracle = _snapshot(record, "oracle_files_unused", "oracle_snapshot", base_dir, where)
    else:
        overlay = _text_map(record.get("oracle_files"), "oracle_files", where)
        oracle = {**snapshot, **overlay}
    if "tests" in record:
        tests = _text_map(record["tests"], "tests", where)
    else:
        test_paths = {test_id.split("::", 1)[0] for test_id in fail_to_pass + pass_to_pass}
        missing = sorted(p for p in test_paths if p not in snapshot)
        if missing:
            raise RepoTaskError(
                f"{where}: the test ids name files {missing[:3]} that the snapshot lacks; "
                "add them to the snapshot or give 'tests'"
            )
        tests = {p: snapshot[p] for p in sorted(test_paths)}
    files = {p: t for p, t in snapshot.items() if p not in tests}
    oracle = {p: t for p, t in oracle.items() if p not in tests}
    command = record.get("test_command", list(DEFAULT_TEST_COMMAND))
    if isinstance(command, str):
        command = shlex.split(command)
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise RepoTaskError(f"{where}: 'test_command' must be a string or a list of strings")
    description = record.get("problem_statement", record.get("description", ""))
    if not isinstance(description, str):
        raise RepoTaskError(f"{where}: 'problem_statement' must be a string")
    try:
        return RepairTask.create(
            kind="repo",
            source=source,
            problem_id=instance_id,
            split=split_of(instance_id),
            description=description,
            files=files,
            tests=tests,
            test_command=tuple(command),
            fail_to_pass=tuple(fail_to_pass),
            pass_to_pass=tuple(pass_to_pass),
            oracle=oracle,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RepoTaskError(f"{where}: {first['loc']}: {first['msg'][:300]}") from None


def _id_list(value: Any, name: str, where: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RepoTaskError(f"{where}: {name} is a string but not a JSON list") from None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RepoTaskError(f"{where}: {name} must be a list of pytest node ids (strings)")
    return list(value)


def _text_map(value: Any, name: str, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise RepoTaskError(f"{where}: '{name}' must be an object mapping paths to file text")
    for path in value:
        try:
            check_path(path)
        except UnsafePath as exc:
            raise RepoTaskError(f"{where}: '{name}': {exc}") from None
    return dict(value)


def _snapshot(
    record: Mapping[str, Any], files_key: str, tar_key: str, base_dir: Path, where: str
) -> dict[str, str]:
    if files_key in record:
        return _text_map(record[files_key], files_key, where)
    if tar_key not in record:
        raise RepoTaskError(f"{where}: give the snapshot as '{files_key}' or '{tar_key}'")
    name = record[tar_key]
    if not isinstance(name, str) or not name:
        raise RepoTaskError(f"{where}: '{tar_key}' must be a path to a tarball")
    return read_tarball(base_dir / name, where=f"{where}: {tar_key}")


def read_tarball(path: Path, *, where: str = "") -> dict[str, str]:
    """The regular files of a tarball as path → UTF-8 text; links and devices are refused."""
    where = where or str(path)
    try:
        with tarfile.open(path, mode="r:*") as archive:
            files = _read_members(archive, where)
    except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
        raise RepoTaskError(f"{where}: cannot open tarball {path}: {exc}") from None
    files = _strip_common_root(files)
    for name in files:
        try:
            check_path(name)
        except UnsafePath as exc:
            raise RepoTaskError(f"{where}: {exc}") from None
    return files


def _read_members(archive: tarfile.TarFile, where: str) -> dict[str, str]:
    files: dict[str, str] = {}
    total = 0
    for member in archive:
        if member.isdir():
            continue
        if not member.isfile():
            raise RepoTaskError(
                f"{where}: {member.name!r} is a link or special file; snapshots hold "
                "regular files only"
            )
        total += member.size
        if len(files) >= MAX_SNAPSHOT_FILES or total > MAX_SNAPSHOT_BYTES:
            raise RepoTaskError(
                f"{where}: more than {MAX_SNAPSHOT_FILES} files or "
                f"{MAX_SNAPSHOT_BYTES} bytes; trim the snapshot to the code under repair"
            )
        name = member.name.removeprefix("./")
        extracted = archive.extractfile(member)
        data = extracted.read() if extracted is not None else b""
        try:
            files[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RepoTaskError(
                f"{where}: {name!r} is not UTF-8 text; leave binary files out of snapshots"
            ) from None
    return files


def _strip_common_root(files: dict[str, str]) -> dict[str, str]:
    roots = {name.split("/", 1)[0] for name in files}
    if len(roots) == 1 and all("/" in name for name in files):
        return {name.split("/", 1)[1]: text for name, text in files.items()}
    return files


# ----------------------------------------------------------------------------- fixtures


def load_fixtures(fixtures_dir: Path = FIXTURES_DIR) -> list[RepairTask]:
    """The bundled fixture tasks, in directory-name order (source ``repo-fixture``)."""
    tasks = []
    for project in sorted(p for p in fixtures_dir.iterdir() if (p / "task.json").is_file()):
        tasks.append(fixture_task(project))
    return tasks


def fixture_task(project: Path) -> RepairTask:
    """The task of one fixture directory: its code with ``task.json``'s bug injected."""
    where = str(project / "task.json")
    try:
        spec = json.loads((project / "task.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RepoTaskError(f"{where}: not valid JSON ({exc})") from None
    tree = {
        p.relative_to(project).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(project.rglob("*"))
        if p.is_file() and p.name != "task.json" and "__pycache__" not in p.parts
    }
    tests = {p: t for p, t in tree.items() if p.startswith("tests/")}
    oracle = {p: t for p, t in tree.items() if p not in tests}
    bug = spec.get("bug")
    if not isinstance(bug, dict) or not {"path", "search", "replace"} <= set(bug):
        raise RepoTaskError(f"{where}: 'bug' must be an object with path, search and replace")
    target = oracle.get(bug["path"])
    if target is None or target.count(bug["search"]) != 1:
        raise RepoTaskError(
            f"{where}: the bug's search text must occur exactly once in {bug['path']!r}"
        )
    files = {**oracle, bug["path"]: target.replace(bug["search"], bug["replace"])}
    record = {
        "instance_id": spec.get("problem_id"),
        "problem_statement": spec.get("description", ""),
        "files": files,
        "oracle_files": oracle,
        "tests": tests,
        "test_command": spec.get("test_command", list(DEFAULT_TEST_COMMAND)),
        "FAIL_TO_PASS": spec.get("fail_to_pass"),
        "PASS_TO_PASS": spec.get("pass_to_pass", []),
    }
    return task_from_record(record, base_dir=project, where=where, source="repo-fixture")
