"""Backend selection against what this machine really has.

"Nothing available" is produced for real, not mocked: PATH without bwrap and a
DOCKER_HOST socket that does not exist make both real probes fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coderepair.worker.sandbox import (
    BubblewrapSandbox,
    DockerSandbox,
    SandboxLimits,
    SandboxUnavailable,
    probe_backends,
    select_sandbox,
)
from coderepair.worker.sandbox.select import probe_docker

LIMITS = SandboxLimits(timeout_s=20)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def test_unknown_preference_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        select_sandbox(LIMITS, prefer="chroot")  # type: ignore[arg-type]


def test_nothing_available_refuses_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(SandboxUnavailable) as caught:
        select_sandbox(LIMITS)
    message = str(caught.value)
    assert "never runs unsandboxed" in message
    assert "apt install docker.io" in message and "apt install bubblewrap" in message
    assert [p.available for p in probe_backends()] == [False, False]


def test_missing_image_is_reported_with_the_build_command() -> None:
    probe = probe_docker(image="coderepair-no-such-image:never")
    assert not probe.available
    assert "make sandbox-image" in probe.reason or "engine" in probe.reason


def test_preferring_bubblewrap_gives_bubblewrap() -> None:
    try:
        sandbox = select_sandbox(LIMITS, prefer="bubblewrap")
    except SandboxUnavailable as exc:
        if _in_ci():
            raise
        pytest.skip(f"no backend here: {exc}")
    with sandbox:
        if not isinstance(sandbox, BubblewrapSandbox) and not _in_ci():
            pytest.skip(f"bubblewrap unavailable here; got {sandbox.name}")
        assert isinstance(sandbox, BubblewrapSandbox)
        assert sandbox.name == "bubblewrap"


@pytest.mark.docker
def test_docker_is_chosen_first_when_it_works() -> None:
    assert probe_docker().available, probe_docker().reason
    with select_sandbox(LIMITS, pool_size=1) as sandbox:
        assert isinstance(sandbox, DockerSandbox)
        assert sandbox.name == "docker"
