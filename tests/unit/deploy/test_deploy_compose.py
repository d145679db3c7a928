"""deploy/compose: the compose file validates with the real tools, and every example
config there loads with its role's own loader.

Validation runs `docker-compose config -q` (Debian's docker-compose package) and
`docker compose config -q` (the v2 plugin), whichever exist; CI installs the package,
so there a missing tool fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from coderepair.coordinator.config import load_config as load_coordinator_config
from coderepair.trainer.config import load_run_config
from coderepair.worker.config import load_config as load_worker_config

COMPOSE = Path(__file__).resolve().parents[3] / "deploy" / "compose"
FILE = COMPOSE / "docker-compose.yml"
SECRETS = {"POSTGRES_PASSWORD": "not-a-real-password", "MINIO_ROOT_PASSWORD": "not-real-either"}


def _plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return probe.returncode == 0


def _tools() -> list[list[str]]:
    tools = []
    if shutil.which("docker-compose"):
        tools.append(["docker-compose"])
    if _plugin():
        tools.append(["docker", "compose"])
    if not tools:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI: neither docker-compose nor `docker compose` is installed")
        pytest.skip("neither docker-compose (apt-get install docker-compose) nor the plugin")
    return tools


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env.update(extra)
    return env


def test_compose_file_validates() -> None:
    for tool in _tools():
        result = subprocess.run(
            [*tool, "-f", str(FILE), "config", "-q"],
            capture_output=True,
            text=True,
            env=_env(**SECRETS),
            check=False,
            timeout=120,
        )
        assert result.returncode == 0, f"{tool}: {result.stderr}"


def test_compose_refuses_to_start_without_the_passwords() -> None:
    for tool in _tools():
        result = subprocess.run(
            [*tool, "-f", str(FILE), "config", "-q"],
            capture_output=True,
            text=True,
            env=_env(MINIO_ROOT_PASSWORD="x"),
            check=False,
            timeout=120,
        )
        assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr, tool


def test_compose_has_the_production_roles_and_no_secrets() -> None:
    text = FILE.read_text()
    services = yaml.safe_load(text)["services"]
    roles = {"postgres", "minio", "coordinator", "validator", "trainer", "worker"}
    assert roles <= set(services)
    for secret in SECRETS.values():
        assert secret not in text
    targets = {s["build"]["target"] for s in services.values() if "build" in s}
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    for target in targets:
        assert f" AS {target}\n" in dockerfile, f"Dockerfile has no stage {target}"
    assert dockerfile.count("\nUSER 10001:10001\n") == len(targets)
    assert "python:3.11-slim" in dockerfile


def test_coordinator_example_loads() -> None:
    config = load_coordinator_config(COMPOSE / "coordinator-compose.toml")
    assert config.object_store.kind == "s3" and config.audit.in_process is False
    assert config.dashboard.port == 9464 and config.server.listen.endswith(":50051")


def test_trainer_example_loads() -> None:
    config = load_run_config(COMPOSE / "run-compose.toml")
    assert config.coordinator is not None and config.coordinator.address == "coordinator:50051"
    assert config.store is not None and config.store.kind == "s3"


def test_worker_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.upper().startswith("CODEREPAIR_WORKER_"):
            monkeypatch.delenv(var)
    config = load_worker_config(COMPOSE / "worker.toml")
    assert config.coordinator == "coordinator:50051" and config.sandbox == "bubblewrap"
