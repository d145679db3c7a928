"""Opening the sandbox backend the corpus builder verifies in, by name.

``docker`` is the Docker warm pool (one warm container per worker thread, so jobs never
wait for a container), ``bubblewrap`` the fallback, ``auto`` whatever `select_sandbox`
picks on this machine. All of them get `build.BUILD_LIMITS` unless told otherwise.
"""

from __future__ import annotations

from typing import Literal

from coderepair.coordinator.tasks.build import BUILD_LIMITS
from coderepair.worker.sandbox.base import Sandbox, SandboxLimits

BackendName = Literal["docker", "bubblewrap", "auto"]


def open_sandbox(
    backend: BackendName, *, workers: int = 4, limits: SandboxLimits = BUILD_LIMITS
) -> Sandbox:
    """A ready sandbox of ``backend`` able to run ``workers`` jobs at once; close it after."""
    # Imported here: the Docker SDK loads only when a sandbox is really opened.
    from coderepair.worker.sandbox import (  # noqa: PLC0415
        BubblewrapSandbox,
        DockerSandbox,
        select_sandbox,
    )

    if backend == "docker":
        return DockerSandbox(limits, pool_size=workers)
    if backend == "bubblewrap":
        # Every bubblewrap job is a fresh sandbox already: there is no pool to size.
        return BubblewrapSandbox(limits)
    if backend == "auto":
        return select_sandbox(limits, pool_size=workers)
    raise ValueError(f"unknown sandbox backend {backend!r}; use docker, bubblewrap or auto")
