"""Fixtures of the hostile-patch suites: one sandbox per backend, bait on the host."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_support import LIMITS, SECRET, SECRET_ENV

from coderepair.worker.sandbox import (
    BubblewrapSandbox,
    DockerSandbox,
    Sandbox,
    SandboxUnavailable,
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def secret_env() -> Iterator[None]:
    """The fake secret is in this process's environment for the sandboxes' whole life."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SECRET_ENV, SECRET)
        yield


@pytest.fixture(
    scope="module",
    params=[pytest.param("docker", marks=pytest.mark.docker), "bubblewrap"],
)
def sandbox(request: pytest.FixtureRequest, secret_env: None) -> Iterator[Sandbox]:
    """One sandbox per backend for the whole module; the Docker pool has one container,
    so every follow-up job runs where the hostile one ran (or in its replacement)."""
    box: Sandbox
    if request.param == "docker":
        box = DockerSandbox(LIMITS, pool_size=1)
    else:
        try:
            box = BubblewrapSandbox(LIMITS)
        except SandboxUnavailable as exc:
            if _in_ci():
                raise
            pytest.skip(f"bubblewrap backend unavailable here: {exc}")
    with box:
        yield box


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A host directory anyone may enter and write (unlike pytest's 0700 tmp_path), so
    only the sandbox's walls — not file permissions — keep a job away from it."""
    path = Path(tempfile.mkdtemp(prefix="coderepair-hostile-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
