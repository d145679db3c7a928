"""Sandboxed verification of model-written code: jobs in, results out, never unsandboxed.

Use `select_sandbox(limits)` to get the best backend this machine supports (Docker warm
pool, else bubblewrap), or construct `DockerSandbox` / `BubblewrapSandbox` directly.
"""

from coderepair.worker.sandbox.base import (
    Job,
    JobKind,
    JobResult,
    JobStatus,
    Sandbox,
    SandboxError,
    SandboxLimits,
    SandboxUnavailable,
)
from coderepair.worker.sandbox.bwrap_backend import BubblewrapSandbox
from coderepair.worker.sandbox.channel import InvalidJob, RunnerProtocolError
from coderepair.worker.sandbox.docker_backend import DockerSandbox
from coderepair.worker.sandbox.select import (
    BackendName,
    BackendProbe,
    probe_backends,
    select_sandbox,
)

__all__ = [
    "BackendName",
    "BackendProbe",
    "BubblewrapSandbox",
    "DockerSandbox",
    "InvalidJob",
    "Job",
    "JobKind",
    "JobResult",
    "JobStatus",
    "RunnerProtocolError",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "SandboxUnavailable",
    "probe_backends",
    "select_sandbox",
]
