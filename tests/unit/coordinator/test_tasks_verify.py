"""Verdict predicates: what counts as a passing oracle and a failing bug."""

from __future__ import annotations

from coderepair.coordinator.tasks.verify import fails, passes
from coderepair.worker.sandbox.base import JobResult, JobStatus


def result(status: JobStatus, per_test: dict[str, bool]) -> JobResult:
    return JobResult(
        status=status,
        tests_passed=sum(per_test.values()),
        tests_total=len(per_test),
        per_test=per_test,
        log="",
        log_sha256="0" * 64,
        duration_s=0.1,
        backend="test",
    )


def test_function_verdicts() -> None:
    assert passes(result("ok", {"check#1": True, "check#2": True}))
    assert not passes(result("ok", {}))  # no test ran: not a pass
    assert fails(result("ok", {"check#1": True, "check#2": False}))
    assert fails(result("crashed", {"check#1": False}))
    # A timeout says nothing certain and would cost every rollout the full limit.
    assert not fails(result("timeout", {"check#1": False}))
    assert not fails(result("ok", {"check#1": True}))


def test_repo_verdicts_respect_fail_to_pass_and_pass_to_pass() -> None:
    f2p, p2p = ("t.py::a",), ("t.py::b",)
    assert fails(result("ok", {"t.py::a": False, "t.py::b": True}), f2p, p2p)
    # The bug must not break PASS_TO_PASS tests...
    assert not fails(result("ok", {"t.py::a": False, "t.py::b": False}), f2p, p2p)
    # ...and must break every FAIL_TO_PASS test.
    assert not fails(result("ok", {"t.py::a": True, "t.py::b": False}), f2p, p2p)
    # A PASS_TO_PASS id missing from the report counts as not passed.
    assert not fails(result("ok", {"t.py::a": False}), f2p, p2p)
