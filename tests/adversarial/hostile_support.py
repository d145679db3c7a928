"""Shared by the hostile-patch suites: the trivial task, its jobs, and the verdicts.

Every hostile candidate implements ``add(a, b)`` and returns the right answer only if
its attack worked, so a test passing inside the sandbox means containment failed.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from coderepair.worker.sandbox import Job, JobResult, Sandbox, SandboxLimits

LIMITS = SandboxLimits(timeout_s=8.0, memory_mb=256, pids=32, output_bytes=16 * 1024, workdir_mb=16)
SECRET_ENV = "CODEREPAIR_HOSTILE_TEST_SECRET"
SECRET = "hunter2-" + secrets.token_hex(8)
"""Set in this process's environment before any sandbox starts; must never be seen."""

ADD_TESTS = """\
def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0
"""
GOOD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"

CALC_TESTS = """\
from calc import add


def test_small():
    assert add(2, 3) == 5


def test_negative():
    assert add(-1, 1) == 0
"""
CALC_IDS = ("tests/test_calc.py::test_small", "tests/test_calc.py::test_negative")


def function_job(source: str) -> Job:
    return Job(
        kind="function",
        files={"solution.py": source},
        tests={"test_solution.py": ADD_TESTS},
        entry_point="solution.py:add",
    )


def pytest_job(files: dict[str, str]) -> Job:
    return Job(
        kind="pytest", files=files, tests={"tests/test_calc.py": CALC_TESTS}, test_ids=CALC_IDS
    )


def assert_contained(result: JobResult, status: str | None = None) -> None:
    detail = f"{result.status} {dict(result.per_test)} {result.anomalies} log={result.log[-800:]!r}"
    assert result.tests_passed == 0, f"a hostile candidate passed a test: {detail}"
    assert not result.all_passed, detail
    if status is not None:
        assert result.status == status, detail


def assert_sandbox_healthy(sandbox: Sandbox, pytest_too: bool = False) -> None:
    """The next verifications in the same sandbox give the right answers."""
    good = sandbox.run(function_job(GOOD))
    assert good.all_passed, f"a correct candidate failed after the hostile one: {good}"
    wrong = sandbox.run(function_job(WRONG))
    assert wrong.status == "ok" and wrong.tests_passed == 0, wrong
    if pytest_too:
        ok = sandbox.run(pytest_job({"calc.py": GOOD}))
        assert ok.all_passed, f"a correct pytest candidate failed after the hostile one: {ok}"


def host_processes_with(marker: str) -> list[str]:
    """Host pids whose command line contains `marker` (containers' processes included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(entry.name)
    return found
