"""The host side of the runner protocol: job validation and strict reply decoding.

Replies come out of a sandbox, so random, truncated or inconsistent bytes must end in a
`SandboxError` (usually its `RunnerProtocolError` subclass), never another exception and
never a `JobResult`. The transport here is a real pipe; no runner is needed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.worker.sandbox.base import Job, SandboxError, SandboxLimits
from coderepair.worker.sandbox.channel import (
    FdTransport,
    InvalidJob,
    RunnerChannel,
    RunnerProtocolError,
    decode_result,
    job_frame,
)

LIMITS = SandboxLimits(timeout_s=1)
FUNCTION_JOB = Job(
    "function",
    {"sol.py": "def f(x):\n    return x\n"},
    {"test.py": "def check(candidate):\n    assert candidate(1) == 1\n"},
    "sol.py:f",
)
PYTEST_JOB = Job("pytest", {"m.py": ""}, {"test_m.py": ""}, test_ids=("test_m.py::test_a",))
GOOD_REPLY = {
    "type": "result",
    "status": "ok",
    "per_test": {"check#1": True, "check#2": False},
    "log": "hello",
    "anomalies": [],
    "duration_s": 0.01,
}


def test_a_good_reply_becomes_a_job_result() -> None:
    result = decode_result(dict(GOOD_REPLY), FUNCTION_JOB, LIMITS, "test")
    assert (result.tests_passed, result.tests_total, result.status) == (1, 2, "ok")
    assert not result.all_passed
    assert len(result.log_sha256) == 64


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", "passed"),
        ("per_test", {"check#1": 1}),
        ("per_test", []),
        ("log", None),
        ("log", "x" * (LIMITS.output_bytes + 70 * 1024)),
        ("anomalies", "none"),
        ("duration_s", True),
        ("type", "ready"),
    ],
)
def test_inconsistent_replies_are_protocol_errors(field: str, value: object) -> None:
    reply = dict(GOOD_REPLY, **{field: value})
    with pytest.raises(RunnerProtocolError):
        decode_result(reply, FUNCTION_JOB, LIMITS, "test")


def test_pytest_replies_must_list_exactly_the_requested_ids() -> None:
    reply = dict(GOOD_REPLY, per_test={"test_m.py::test_a": True, "extra": True})
    with pytest.raises(RunnerProtocolError, match="test_ids"):
        decode_result(reply, PYTEST_JOB, LIMITS, "test")


def test_runner_errors_split_into_job_faults_and_sandbox_faults() -> None:
    with pytest.raises(InvalidJob, match="refused"):
        decode_result({"type": "error", "fault": "job", "error": "x"}, FUNCTION_JOB, LIMITS, "t")
    with pytest.raises(SandboxError, match="failed"):
        decode_result({"type": "error", "fault": "runner", "error": "x"}, FUNCTION_JOB, LIMITS, "t")


@pytest.mark.parametrize(
    ("job", "match"),
    [
        (Job("function", {"../x.py": ""}, {"t.py": ""}, "../x.py:f"), "not allowed"),
        (Job("function", {"/abs.py": ""}, {"t.py": ""}, "/abs.py:f"), "not allowed"),
        (Job("function", {"a.py": ""}, {"t.py": ""}, "b.py:f"), "entry_point"),
        (Job("function", {"a.py": ""}, {"t.py": ""}, "a.py:not a name"), "entry_point"),
        (Job("function", {"a.py": ""}, {}, "a.py:f"), "exactly one tests"),
        (Job("pytest", {"a.py": ""}, {"t.py": ""}), "test_ids"),
        (Job("pytest", {"a.py": ""}, {"t.py": ""}, test_ids=("a", "a")), "duplicates"),
        (Job("other", {}, {}), "unknown Job.kind"),  # type: ignore[arg-type]
        (Job("function", {"a.py": 3}, {"t.py": ""}, "a.py:f"), "must be str"),  # type: ignore[dict-item]
    ],
)
def test_invalid_jobs_are_refused_before_reaching_a_sandbox(job: Job, match: str) -> None:
    with pytest.raises(InvalidJob, match=match):
        job_frame(job, LIMITS)


def test_jobs_larger_than_the_work_dir_are_refused() -> None:
    big = Job("function", {"a.py": "x" * (2 * 1024 * 1024)}, {"t.py": ""}, "a.py:f")
    with pytest.raises(InvalidJob, match="work dir"):
        job_frame(big, SandboxLimits(workdir_mb=1))


@pytest.fixture
def pipe_channel() -> Iterator[tuple[RunnerChannel, int]]:
    """A channel whose 'runner' is the test writing bytes into a pipe."""
    read_fd, write_fd = os.pipe()
    sink = os.open(os.devnull, os.O_WRONLY)
    yield RunnerChannel(FdTransport(sink, read_fd), "test"), write_fd
    for fd in (read_fd, sink):
        os.close(fd)


def _frame(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_from_a_runner_end_in_a_sandbox_error(data: bytes) -> None:
    read_fd, write_fd = os.pipe()
    sink = os.open(os.devnull, os.O_WRONLY)
    os.write(write_fd, data)
    os.close(write_fd)
    try:
        with pytest.raises(SandboxError):
            RunnerChannel(FdTransport(sink, read_fd), "t").run(FUNCTION_JOB, LIMITS)
    finally:
        os.close(read_fd)
        os.close(sink)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_truncated_replies_end_in_a_sandbox_error(data: st.DataObject) -> None:
    whole = _frame(GOOD_REPLY)
    cut = data.draw(st.integers(0, len(whole) - 1))
    read_fd, write_fd = os.pipe()
    sink = os.open(os.devnull, os.O_WRONLY)
    os.write(write_fd, whole[:cut])
    os.close(write_fd)
    try:
        with pytest.raises(SandboxError, match="exited"):
            RunnerChannel(FdTransport(sink, read_fd), "t").run(FUNCTION_JOB, LIMITS)
    finally:
        os.close(read_fd)
        os.close(sink)


def test_hello_checks_protocol_and_refuses_root(pipe_channel: tuple[RunnerChannel, int]) -> None:
    channel, write_fd = pipe_channel
    os.write(write_fd, _frame({"type": "ready", "protocol": 99, "uid": 1}))
    with pytest.raises(RunnerProtocolError, match="protocol"):
        channel.hello(1)
    os.write(write_fd, _frame({"type": "ready", "protocol": 1, "uid": 0}))
    with pytest.raises(SandboxError, match="root"):
        channel.hello(1)
    os.close(write_fd)


def test_a_silent_runner_times_out(pipe_channel: tuple[RunnerChannel, int]) -> None:
    channel, write_fd = pipe_channel
    with pytest.raises(SandboxError, match="did not answer"):
        channel.hello(0.2)
    os.close(write_fd)
