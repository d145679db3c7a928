"""Host side of the in-sandbox runner's protocol, shared by every backend.

A backend only has to start ``runner.py`` inside its isolation (see that file's
docstring) and hand this module a byte `Transport` to the runner's stdin/stdout:

    channel = RunnerChannel(transport, backend="bwrap")
    channel.hello(timeout_s=10)                     # waits for the runner's "ready"
    result = channel.run(job, limits, nproc=limits.pids)   # -> JobResult

`RunnerChannel.run` validates the `Job` before sending it (`InvalidJob`), builds the
frame, waits for the answer (the runner enforces the job's timeout; the host adds a
grace period), and decodes the reply strictly: the reply comes out of a sandbox, so a
malformed one is a `RunnerProtocolError`, never a crash or a silent accept. After a
`RunnerProtocolError` or a `SandboxError` the sandbox must be discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import struct
import time
from pathlib import Path
from typing import Any, Protocol

from coderepair.protocol.errors import DecodeError
from coderepair.worker.sandbox.base import Job, JobResult, SandboxError, SandboxLimits

RUNNER_PATH = Path(__file__).with_name("runner.py")
"""The runner script to copy or bind-mount into a sandbox (read-only)."""
PROTOCOL = 1
MAX_REPLY = 64 * 1024 * 1024
"""Largest reply accepted from a runner (the log is capped far below this)."""
MAX_JOB_BYTES = 200 * 1024 * 1024
"""Largest job frame sent (the runner accepts 256 MiB)."""
HOST_GRACE_S = 15.0
"""How long past the job's own timeout the host waits for the runner's answer."""
NOFILE = 1024
"""Open-file limit of job processes (pytest needs a few hundred at most)."""


class InvalidJob(ValueError):
    """The `Job` cannot be run as given (bad paths, missing entry point, too large)."""


class RunnerProtocolError(SandboxError, DecodeError):
    """The runner's channel carried something that is not a valid reply."""


class Transport(Protocol):
    """A bidirectional byte stream to the runner's stdin/stdout."""

    def send(self, data: bytes) -> None:
        """Write all of `data` or raise `SandboxError`."""

    def recv(self, timeout_s: float) -> bytes:
        """Return some bytes (b"" on EOF); raise `TimeoutError` if none arrive in time."""


class FdTransport:
    """A transport over two pipe fds (e.g. a `subprocess.Popen`'s stdin and stdout)."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.write_fd = write_fd
        self.read_fd = read_fd

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.write_fd, view) :]
        except OSError as exc:
            raise SandboxError(f"cannot write to the sandbox runner: {exc}") from exc

    def recv(self, timeout_s: float) -> bytes:
        ready, _, _ = select.select([self.read_fd], [], [], max(timeout_s, 0.0))
        if not ready:
            raise TimeoutError
        try:
            return os.read(self.read_fd, 1 << 20)
        except OSError as exc:
            raise SandboxError(f"cannot read from the sandbox runner: {exc}") from exc


def runner_limits(limits: SandboxLimits, nproc: int) -> dict[str, Any]:
    """The limits block of a job frame; `nproc` > 0 sets RLIMIT_NPROC (only where the
    uid is private to the sandbox, e.g. a user namespace; Docker uses its pids cgroup)."""
    return {
        "timeout_s": limits.timeout_s,
        "memory_mb": limits.memory_mb,
        "output_bytes": limits.output_bytes,
        "workdir_mb": limits.workdir_mb,
        "nproc": nproc,
        "nofile": NOFILE,
    }


def _check_text(text: str, what: str) -> int:
    """Size in UTF-8 bytes; text that cannot be UTF-8 (lone surrogates) is refused."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidJob(
            f"{what} is not valid Unicode text ({exc.reason}); fix its source"
        ) from None


def _check_path(path: object, what: str) -> str:
    if not isinstance(path, str):
        raise InvalidJob(f"{what} keys must be str paths, got {type(path).__name__}")
    _check_text(path, f"{what} path {path!r}")
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\x00" in path
        or any(p in ("", ".", "..") or len(p) > 255 for p in parts)
    ):
        raise InvalidJob(
            f"{what} path {path!r} is not allowed: use a relative, normalised path "
            "without '..', empty or absolute parts"
        )
    return path


def job_frame(job: Job, limits: SandboxLimits, nproc: int = 0) -> dict[str, Any]:
    """Validate `job` and build the runner's job frame; `InvalidJob` says what to fix."""
    size = 0
    for what, source in (("files", job.files), ("tests", job.tests)):
        for path, text in source.items():
            _check_path(path, what)
            if not isinstance(text, str):
                raise InvalidJob(f"{what}[{path!r}] must be str, got {type(text).__name__}")
            size += _check_text(text, f"{what}[{path!r}]")
    if size > limits.workdir_mb * 1024 * 1024:
        raise InvalidJob(
            f"the job's files take {size} bytes, more than the {limits.workdir_mb} MiB "
            "work dir; raise SandboxLimits.workdir_mb or shrink the snapshot"
        )
    if job.kind == "function":
        module, _, func = job.entry_point.partition(":")
        if not func.isidentifier() or module not in job.files or not module.endswith(".py"):
            raise InvalidJob(
                f"entry_point {job.entry_point!r} must be 'module.py:function' naming a "
                "file in Job.files and a function name"
            )
        if len(job.tests) != 1:
            raise InvalidJob("a function job needs exactly one tests module defining check()")
        if job.test_ids:
            raise InvalidJob("test_ids are for pytest jobs; a function job has none")
    elif job.kind == "pytest":
        if not job.test_ids or not all(isinstance(t, str) and t for t in job.test_ids):
            raise InvalidJob("a pytest job needs test_ids (FAIL_TO_PASS + PASS_TO_PASS)")
        if len(set(job.test_ids)) != len(job.test_ids):
            raise InvalidJob("test_ids contain duplicates")
        for test_id in job.test_ids:
            _check_text(test_id, f"test id {test_id!r}")
            if test_id.startswith("-"):
                raise InvalidJob(f"test id {test_id!r} starts with '-': it would be an option")
    else:
        raise InvalidJob(f"unknown Job.kind {job.kind!r}; use 'function' or 'pytest'")
    return {
        "type": "job",
        "kind": job.kind,
        "files": dict(job.files),
        "tests": dict(job.tests),
        "entry_point": job.entry_point,
        "test_ids": list(job.test_ids),
        "limits": runner_limits(limits, nproc),
    }


def encode_frame(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode("ascii")
    if len(data) > MAX_JOB_BYTES:
        raise InvalidJob(f"job frame of {len(data)} bytes exceeds {MAX_JOB_BYTES}")
    return struct.pack(">I", len(data)) + data


def decode_result(
    reply: dict[str, Any], job: Job, limits: SandboxLimits, backend: str
) -> JobResult:
    """Turn a runner reply into a `JobResult`, checking every field."""
    kind = reply.get("type")
    if kind == "error":
        error = str(reply.get("error", ""))[:4000]
        if reply.get("fault") == "job":
            raise InvalidJob(f"the sandbox runner refused the job: {error}")
        raise SandboxError(f"the sandbox runner failed: {error}")
    if kind != "result":
        raise RunnerProtocolError(f"expected a result frame, got type {kind!r}")
    status = reply.get("status")
    per_test = reply.get("per_test")
    log = reply.get("log")
    anomalies = reply.get("anomalies")
    duration = reply.get("duration_s")
    if status not in ("ok", "timeout", "crashed"):
        raise RunnerProtocolError(f"result has unknown status {status!r}")
    if not isinstance(per_test, dict) or not all(
        isinstance(k, str) and isinstance(v, bool) for k, v in per_test.items()
    ):
        raise RunnerProtocolError("result per_test must map test names to booleans")
    if job.kind == "pytest" and set(per_test) != set(job.test_ids):
        raise RunnerProtocolError("result per_test does not list exactly the job's test_ids")
    if not isinstance(log, str) or len(log) > limits.output_bytes + 64 * 1024:
        raise RunnerProtocolError("result log is missing or larger than the output cap")
    if not isinstance(anomalies, list) or not all(isinstance(a, str) for a in anomalies):
        raise RunnerProtocolError("result anomalies must be a list of strings")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        raise RunnerProtocolError("result duration_s must be a number")
    return JobResult(
        status=status,
        tests_passed=sum(per_test.values()),
        tests_total=len(per_test),
        per_test=per_test,
        log=log,
        log_sha256=hashlib.sha256(log.encode("utf-8", "surrogatepass")).hexdigest(),
        duration_s=float(duration),
        backend=backend,
        anomalies=tuple(a[:1000] for a in anomalies[:100]),
    )


class RunnerChannel:
    """One runner, one job at a time. Not thread-safe: a pool hands it to one caller."""

    def __init__(self, transport: Transport, backend: str) -> None:
        self.transport = transport
        self.backend = backend
        self._buffer = bytearray()

    def hello(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the runner's ready frame and check its protocol version."""
        ready = self._read_frame(time.monotonic() + timeout_s)
        if ready.get("type") != "ready" or ready.get("protocol") != PROTOCOL:
            raise RunnerProtocolError(
                f"runner greeted with {ready!r}; expected protocol {PROTOCOL} "
                "(is the runner in the sandbox the same version as this worker?)"
            )
        if ready.get("uid") == 0:
            raise SandboxError("the runner runs as root; a sandbox must use an unprivileged uid")
        return ready

    def run(self, job: Job, limits: SandboxLimits, nproc: int = 0) -> JobResult:
        frame = encode_frame(job_frame(job, limits, nproc))
        self.transport.send(frame)
        reply = self._read_frame(time.monotonic() + limits.timeout_s + HOST_GRACE_S)
        return decode_result(reply, job, limits, self.backend)

    def _read_frame(self, deadline: float) -> dict[str, Any]:
        header = self._read_exact(4, deadline)
        (size,) = struct.unpack(">I", header)
        if size > MAX_REPLY:
            raise RunnerProtocolError(f"runner sent a {size}-byte frame (limit {MAX_REPLY})")
        body = self._read_exact(size, deadline)
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RunnerProtocolError(f"runner sent a frame that is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise RunnerProtocolError("runner sent a frame that is not a JSON object")
        return obj

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._buffer) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxError("the sandbox runner did not answer in time")
            try:
                chunk = self.transport.recv(remaining)
            except TimeoutError:
                continue
            if not chunk:
                raise SandboxError("the sandbox runner exited (channel closed)")
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data
