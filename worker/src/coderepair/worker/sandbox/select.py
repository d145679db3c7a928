"""Choosing a sandbox backend: Docker when it can run here, else bubblewrap, else refuse.

Model-written code never runs unsandboxed: when no backend works, `select_sandbox`
raises `SandboxUnavailable` with what to install, and there is no "none" backend to
fall back to. The chosen backend is visible as `Sandbox.name` and in every `JobResult`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from typing import Literal, get_args

import docker
import docker.errors

from coderepair.worker.sandbox import bwrap_backend
from coderepair.worker.sandbox.base import Sandbox, SandboxLimits, SandboxUnavailable
from coderepair.worker.sandbox.bwrap_backend import BubblewrapSandbox
from coderepair.worker.sandbox.docker_backend import DEFAULT_IMAGE, DockerSandbox

log = logging.getLogger(__name__)

BackendName = Literal["docker", "bubblewrap"]
BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
"""Every backend, in the default order of preference (isolation and speed: Docker first)."""
DOCKER_PROBE_TIMEOUT_S = 10


@dataclass(frozen=True)
class BackendProbe:
    """Whether one backend can run on this machine, and why (or why not)."""

    name: BackendName
    available: bool
    reason: str


def probe_docker(image: str = DEFAULT_IMAGE) -> BackendProbe:
    """Docker is usable when an engine answers and the sandbox image exists."""
    try:
        client = docker.from_env(timeout=DOCKER_PROBE_TIMEOUT_S)
    except docker.errors.DockerException as exc:
        hint = (
            "install one (`apt install docker.io`)"
            if shutil.which("docker") is None
            else ("start dockerd, or let this user use it (the `docker` group)")
        )
        return BackendProbe("docker", False, f"no Docker engine answers ({exc}); {hint}")
    try:
        client.ping()
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return BackendProbe(
            "docker",
            False,
            f"the Docker engine answers but the sandbox image {image} is missing: build it "
            "with `make sandbox-image` (or deploy/sandbox/build-offline)",
        )
    except docker.errors.DockerException as exc:
        return BackendProbe("docker", False, f"the Docker engine does not answer: {exc}")
    finally:
        client.close()
    return BackendProbe("docker", True, f"Docker engine answers; image {image} present")


def probe_bubblewrap() -> BackendProbe:
    """bubblewrap is usable when a real job (function and pytest) passes inside it."""
    works, reason = bwrap_backend.probe()
    return BackendProbe("bubblewrap", works, reason)


def probe_backends(image: str = DEFAULT_IMAGE) -> list[BackendProbe]:
    """Probe every backend (for `coderepair-worker doctor`); this runs real sandbox jobs."""
    return [probe_docker(image), probe_bubblewrap()]


def select_sandbox(
    limits: SandboxLimits,
    prefer: BackendName | None = None,
    *,
    image: str = DEFAULT_IMAGE,
    pool_size: int = 2,
) -> Sandbox:
    """The first backend that works here, `prefer` first; `SandboxUnavailable` if none.

    `image` and `pool_size` configure the Docker backend. A preferred backend that does
    not work is logged with its reason before the next one is tried.
    """
    if prefer is not None and prefer not in BACKENDS:
        raise ValueError(f"unknown sandbox backend {prefer!r}; choose one of {list(BACKENDS)}")
    order = [prefer] if prefer else []
    order += [name for name in BACKENDS if name != prefer]
    refusals: list[str] = []
    for name in order:
        probe = probe_docker(image) if name == "docker" else probe_bubblewrap()
        if not probe.available:
            if name == prefer:
                log.warning("preferred sandbox backend %s is unavailable: %s", name, probe.reason)
            refusals.append(f"{name}: {probe.reason}")
            continue
        try:
            sandbox: Sandbox = (
                DockerSandbox(limits, image=image, pool_size=pool_size)
                if name == "docker"
                else BubblewrapSandbox(limits)
            )
        except SandboxUnavailable as exc:  # it vanished between the probe and the start
            refusals.append(f"{name}: {exc}")
            continue
        log.info("sandbox backend: %s (%s)", sandbox.name, probe.reason)
        return sandbox
    raise SandboxUnavailable(
        "no sandbox backend works on this machine, and model-written code never runs "
        "unsandboxed. Install a Docker engine (`apt install docker.io`, then "
        "`make sandbox-image`) or bubblewrap (`apt install bubblewrap python3-pytest`). "
        "Details: " + " | ".join(refusals)
    )
