"""Verifying repair tasks in the sandbox: the fixed code passes, the buggy code fails.

A task is only worth training on if its bug is real: the oracle (fixed files) passes
every test and the buggy snapshot fails. This module turns tasks (or would-be tasks)
into sandbox `Job`s, runs them in parallel through one `Sandbox` (the Docker warm pool
or the bubblewrap fallback; `Sandbox.run` is thread-safe) and judges the results.

The same predicates serve the builder (which keeps a mutant only if it fails) and
`reverify` (which re-checks a whole task set, e.g. in the other backend).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from coderepair.protocol.task import RepairTask, canonical_json
from coderepair.worker.sandbox.base import Job, JobResult, Sandbox, SandboxError

DEFAULT_WORKERS = 4
"""Jobs in flight at once: enough to keep a small warm pool busy on a 2-core machine."""
SANDBOX_RETRIES = 1
"""A `SandboxError` says nothing about the code, so a job is retried this many times."""


class VerifyError(RuntimeError):
    """The sandbox failed repeatedly, so tasks could not be verified at all."""


def function_job(files: Mapping[str, str], tests: Mapping[str, str], entry_point: str) -> Job:
    """A HumanEval-style job: ``check(candidate)`` of ``tests`` against ``entry_point``."""
    return Job(kind="function", files=dict(files), tests=dict(tests), entry_point=entry_point)


def repo_job(files: Mapping[str, str], tests: Mapping[str, str], test_ids: Sequence[str]) -> Job:
    """A repository job: the pytest node ids ``test_ids`` of ``tests`` against ``files``."""
    return Job(kind="pytest", files=dict(files), tests=dict(tests), test_ids=tuple(test_ids))


def oracle_job(task: RepairTask) -> Job:
    """The job that runs the task's fixed files; it must pass."""
    return _job(task, task.oracle)


def buggy_job(task: RepairTask) -> Job:
    """The job that runs the task's buggy files; it must fail."""
    return _job(task, task.files)


def _job(task: RepairTask, files: Mapping[str, str]) -> Job:
    if task.kind == "function":
        return function_job(files, task.tests, task.entry_point)
    return repo_job(files, task.tests, task.fail_to_pass + task.pass_to_pass)


def passes(result: JobResult) -> bool:
    """The code is correct: every test ran and passed, in time."""
    return result.all_passed


def fails(
    result: JobResult, fail_to_pass: Sequence[str] = (), pass_to_pass: Sequence[str] = ()
) -> bool:
    """The code is buggy: the tests ran to a verdict and did not all pass.

    A timeout is not counted as a failure: a job that ran out of time says nothing
    certain, and a task whose bug is an endless loop would cost every rollout the full
    timeout. For repo tasks, the bug must break every FAIL_TO_PASS test and no
    PASS_TO_PASS test (a test missing from ``per_test`` counts as not passed).
    """
    if result.status == "timeout" or result.all_passed:
        return False
    if not fail_to_pass:
        return True
    broken = all(not result.per_test.get(test_id, False) for test_id in fail_to_pass)
    kept = all(result.per_test.get(test_id, False) for test_id in pass_to_pass)
    return broken and kept


def run_all(
    sandbox: Sandbox,
    jobs: Sequence[Job],
    *,
    workers: int = DEFAULT_WORKERS,
    progress: Callable[[int, int], None] | None = None,
) -> list[JobResult]:
    """Run ``jobs`` through ``sandbox``, ``workers`` at a time; results in job order.

    Raises `VerifyError` when the sandbox itself fails on a job more than
    `SANDBOX_RETRIES` times.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    results: list[JobResult | None] = [None] * len(jobs)
    done = 0
    lock = threading.Lock()

    def one(index: int) -> None:
        nonlocal done
        results[index] = _run_with_retry(sandbox, jobs[index])
        with lock:
            done += 1
            if progress is not None:
                progress(done, len(jobs))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        for future in [pool.submit(one, i) for i in range(len(jobs))]:
            future.result()
    return [result for result in results if result is not None]


def _run_with_retry(sandbox: Sandbox, job: Job) -> JobResult:
    last: SandboxError | None = None
    for _ in range(SANDBOX_RETRIES + 1):
        try:
            return sandbox.run(job)
        except SandboxError as exc:
            last = exc
    raise VerifyError(
        f"the {sandbox.name} sandbox failed {SANDBOX_RETRIES + 1} times on one job ({last}); "
        "check the sandbox (docker info, the sandbox image) and rebuild"
    ) from last


def _job_key(job: Job) -> str:
    content = [job.kind, dict(job.files), dict(job.tests), job.entry_point, list(job.test_ids)]
    return hashlib.sha256(canonical_json(content)).hexdigest()


@dataclass(frozen=True)
class TaskVerdict:
    """How one task fared in one backend."""

    task_id: str
    oracle_passes: bool
    buggy_fails: bool
    oracle_status: str
    buggy_status: str

    @property
    def ok(self) -> bool:
        return self.oracle_passes and self.buggy_fails


@dataclass(frozen=True)
class VerifyReport:
    """The verdicts of a whole task set in one backend."""

    backend: str
    verdicts: tuple[TaskVerdict, ...]
    duration_s: float
    failures: tuple[TaskVerdict, ...] = field(default=())

    @property
    def all_ok(self) -> bool:
        return not self.failures and bool(self.verdicts)


def reverify(
    tasks: Sequence[RepairTask],
    sandbox: Sandbox,
    *,
    workers: int = DEFAULT_WORKERS,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Re-run every task's oracle (must pass) and buggy files (must fail) in ``sandbox``.

    All mutants of one HumanEval problem share one oracle job (same files, tests and
    entry point), so each distinct oracle job runs once: nearly halves the work.
    """
    start = time.monotonic()
    oracle_index: dict[str, int] = {}
    jobs: list[Job] = []
    for task in tasks:
        job = oracle_job(task)
        key = _job_key(job)
        if key not in oracle_index:
            oracle_index[key] = len(jobs)
            jobs.append(job)
    first_buggy = len(jobs)
    jobs += [buggy_job(task) for task in tasks]
    results = run_all(sandbox, jobs, workers=workers, progress=progress)
    verdicts = []
    for i, task in enumerate(tasks):
        good = results[oracle_index[_job_key(oracle_job(task))]]
        bad = results[first_buggy + i]
        verdicts.append(
            TaskVerdict(
                task_id=task.task_id,
                oracle_passes=passes(good),
                buggy_fails=fails(bad, task.fail_to_pass, task.pass_to_pass),
                oracle_status=good.status,
                buggy_status=bad.status,
            )
        )
    return VerifyReport(
        backend=sandbox.name,
        verdicts=tuple(verdicts),
        duration_s=time.monotonic() - start,
        failures=tuple(v for v in verdicts if not v.ok),
    )
