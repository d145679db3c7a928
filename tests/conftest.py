"""Suite-wide policy for the markers declared in pyproject.toml.

Outside CI a test that needs a missing system part (a Docker engine, a GPU) is
skipped with the reason; under CI (CI=true) a missing Docker engine is an error,
because `.ci/run` starts one and a silent skip would hide a broken set-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@cache
def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


@cache
def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # Under CI the test runs anyway and fails loudly if the engine is missing.
        if item.get_closest_marker("docker") and not _in_ci() and not _docker_answers():
            item.add_marker(pytest.mark.skip(reason="no Docker engine answers `docker info`"))
        if item.get_closest_marker("gpu") and not _cuda_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
