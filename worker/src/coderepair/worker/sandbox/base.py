"""What a sandbox is: the job it runs, the limits it enforces, the result it reports.

Every backend (Docker fresh container, Docker warm pool, bubblewrap fallback) runs the
same in-sandbox runner and returns the same `JobResult`, so the rest of the worker —
and the coordinator's reward audits — never care which backend ran a job.

Model-written code runs only through a `Sandbox`. There is no unsandboxed backend.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SandboxError(Exception):
    """The sandbox itself failed (engine gone, image missing, runner broke).

    Distinct from a job whose tests fail: a `SandboxError` says nothing about the
    patch, so callers retry elsewhere instead of assigning a reward.
    """


class SandboxUnavailable(SandboxError):
    """No isolation mechanism is available on this machine; the message says what to install."""


class SandboxLimits(BaseModel):
    """Resource limits applied to every job, identical across backends."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(10.0, gt=0, le=600)
    """Wall-clock limit for one job; the whole process group is killed when it passes."""
    memory_mb: int = Field(512, ge=64, le=65536)
    """Memory available to the job's processes (cgroup in Docker, RLIMIT_AS in bubblewrap)."""
    pids: int = Field(64, ge=8, le=4096)
    """Maximum number of processes/threads the job may hold at once (fork bombs stop here)."""
    cpus: float = Field(1.0, gt=0, le=64)
    """CPU share of one sandbox (Docker `nano_cpus`); bubblewrap uses RLIMIT_CPU = timeout."""
    output_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Captured stdout+stderr is truncated beyond this many bytes (flooding is harmless)."""
    workdir_mb: int = Field(64, ge=1, le=4096)
    """Size of the writable tmpfs work dir; writing beyond it fails inside the job only."""


JobKind = Literal["function", "pytest"]


@dataclass(frozen=True)
class Job:
    """One verification: a candidate snapshot (untrusted) and the tests that judge it (trusted).

    kind="function": HumanEval-style. `files` holds the candidate module(s); `tests` holds
    a module defining ``check(candidate)``; `entry_point` names the candidate function as
    ``"module_path.py:function_name"``. The assertions of ``check`` run in a trusted
    judge process that never imports candidate code; ``candidate`` is a proxy whose calls
    are executed in the untrusted process and whose results cross back as plain data.

    kind="pytest": a repository snapshot. `files` is the patched tree, `tests` the trusted
    test files (placed read-only, overriding any same-named candidate file), and
    `test_ids` the pytest node ids to run (FAIL_TO_PASS + PASS_TO_PASS).
    """

    kind: JobKind
    files: Mapping[str, str]
    tests: Mapping[str, str]
    entry_point: str = ""
    test_ids: tuple[str, ...] = ()


JobStatus = Literal["ok", "timeout", "crashed"]


@dataclass(frozen=True)
class JobResult:
    """What a job did. `status` is about the candidate; sandbox failures raise instead."""

    status: JobStatus
    tests_passed: int
    tests_total: int
    per_test: Mapping[str, bool]
    log: str
    """Captured output of the candidate process, truncated to `SandboxLimits.output_bytes`."""
    log_sha256: str
    """sha256 of the captured log, kept with the rollout so an audit can compare."""
    duration_s: float
    backend: str
    anomalies: tuple[str, ...] = field(default=())
    """What the runner noticed and cleaned up (stray process, output truncated, ...)."""

    @property
    def all_passed(self) -> bool:
        complete = self.tests_total > 0 and self.tests_passed == self.tests_total
        return self.status == "ok" and complete


class Sandbox(abc.ABC):
    """A backend that runs jobs in isolation. Thread-safe; a context manager."""

    name: str

    @abc.abstractmethod
    def run(self, job: Job) -> JobResult:
        """Run one job to completion under the limits; raise `SandboxError` if the sandbox broke."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release containers/processes. Idempotent."""

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
