"""`coderepair-worker doctor`'s checks against what this machine really has.

Missing parts are produced for real, not mocked: a key file with the wrong mode, PATH
without bwrap and a DOCKER_HOST socket that does not exist, a closed port, and real
gRPC servers on loopback that answer health checks but are not a coordinator.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coderepair.protocol.identity import Identity
from coderepair.protocol.rpc import WORKER_SERVICE
from coderepair.v1 import common_pb2
from coderepair.worker.config import ENV_PREFIX, WorkerConfig, load_config
from coderepair.worker.doctor import (
    CheckStatus,
    CoordinatorProbe,
    check_clock,
    check_coordinator,
    check_cpu_memory,
    check_disk,
    check_engine,
    check_gpu,
    check_identity,
    check_platform,
    check_run,
    check_sandbox,
    probe_coordinator,
    run_checks,
    worst,
)

TRAINER = bytes(range(32))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(var)
    for name in ("CONFIG", "DATA", "CACHE"):
        monkeypatch.setenv(f"XDG_{name}_HOME", str(tmp_path / name.lower()))


def _config(**flags: object) -> WorkerConfig:
    return load_config(overrides=flags)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- machine


def test_platform_is_fine_here() -> None:
    result = check_platform(_config())
    assert result.status is CheckStatus.OK
    assert "Python 3." in result.detail and "Linux" in result.detail


def test_more_threads_than_cores_is_a_warning() -> None:
    result = check_cpu_memory(_config(cpu_threads=1024))
    assert result.status is CheckStatus.WARN
    assert "cpu_threads=1024 is more than the cores" in result.detail
    assert check_cpu_memory(_config(cpu_threads=1)).status is CheckStatus.OK


def test_gpu_check_explains_cpu_only_torch() -> None:
    import torch

    result = check_gpu(_config())
    assert result.status in (CheckStatus.OK, CheckStatus.WARN)
    if torch.cuda.is_available():
        assert "cuda:0" in result.detail and "engine may use" in result.detail
    else:
        assert "torch" in result.detail
        assert "CPU" in result.detail or "nvidia-smi" in result.detail


def test_hf_engine_is_available_here() -> None:
    result = check_engine(_config(engine="hf"))
    assert result.status is CheckStatus.OK
    assert result.detail.startswith("HF (as configured): transformers")


def test_auto_engine_says_why_not_vllm() -> None:
    result = check_engine(_config(engine="auto"))
    assert result.status is CheckStatus.OK
    assert result.detail.startswith(("vLLM", "HF: transformers"))
    if result.detail.startswith("HF"):
        assert "vLLM not used:" in result.detail


def test_configured_vllm_without_vllm_fails_with_what_to_install() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment")
    result = check_engine(_config(engine="vllm"))
    assert result.status is CheckStatus.FAIL
    assert "not installed" in result.detail
    assert "engine = 'auto'" in result.fix


def test_disk_reports_free_space_of_the_nearest_existing_directory(tmp_path: Path) -> None:
    result = check_disk(_config(cache_dir=tmp_path / "not" / "yet" / "there"))
    assert result.status in (CheckStatus.OK, CheckStatus.WARN)
    assert "GiB free for" in result.detail and "not/yet/there" in result.detail


# ---------------------------------------------------------------- identity


def test_missing_key_is_a_warning_saying_join_creates_it(tmp_path: Path) -> None:
    result = check_identity(_config(key_path=tmp_path / "k.pem"))
    assert result.status is CheckStatus.WARN
    assert "no key at" in result.detail and "join" in result.fix


def test_key_with_mode_0600_is_fine(tmp_path: Path) -> None:
    identity = Identity.create(tmp_path / "k.pem")
    result = check_identity(_config(key_path=tmp_path / "k.pem"))
    assert result.status is CheckStatus.OK
    assert identity.key_id in result.detail and "mode 0600" in result.detail


def test_key_readable_by_others_fails_with_chmod(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    Identity.create(path)
    path.chmod(0o644)
    result = check_identity(_config(key_path=path))
    assert result.status is CheckStatus.FAIL
    assert "too open" in result.detail and result.fix == f"chmod 600 {path}"


def test_garbage_key_file_fails_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    result = check_identity(_config(key_path=path))
    assert result.status is CheckStatus.FAIL
    assert "keys rotate" in result.fix


# ---------------------------------------------------------------- sandbox


@pytest.mark.docker
def test_docker_sandbox_is_ok() -> None:
    result = check_sandbox(_config(sandbox="docker"))
    assert result.status is CheckStatus.OK, result
    assert result.detail.startswith("docker: Docker engine answers")


def test_no_sandbox_fails_with_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    result = check_sandbox(_config())
    assert result.status is CheckStatus.FAIL
    assert "no sandbox works here" in result.detail
    assert "docker:" in result.detail and "bubblewrap:" in result.detail
    assert "apt install docker.io" in result.fix and "apt install bubblewrap" in result.fix


def test_bubblewrap_fallback_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    result = check_sandbox(_config(sandbox="auto"))
    if result.status is CheckStatus.FAIL:
        pytest.skip(f"bubblewrap does not work here either: {result.detail}")
    assert result.status is CheckStatus.WARN
    assert result.detail.startswith("bubblewrap: ")
    assert "fallback; docker unavailable" in result.detail
    assert "no seccomp" in result.fix


# ---------------------------------------------------------------- coordinator


@pytest.fixture
def health_only_server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A real gRPC server with only the health service: healthy, but not a coordinator."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set(WORKER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def test_closed_port_is_unreachable_quickly() -> None:
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    probe = probe_coordinator(address, timeout_s=3.0)
    assert time.monotonic() - started < 10
    assert not probe.reachable
    assert f"no coordinator answers at {address}" in probe.problem
    result = check_coordinator(_config(coordinator=address), probe)
    assert result.status is CheckStatus.FAIL
    assert "firewall" in result.fix


def test_a_server_without_the_worker_service_is_not_a_coordinator(
    health_only_server: tuple[str, health.HealthServicer],
) -> None:
    address, _servicer = health_only_server
    probe = probe_coordinator(address)
    assert probe.reachable and "UNIMPLEMENTED" in probe.status_error
    result = check_coordinator(_config(coordinator=address), probe)
    assert result.status is CheckStatus.WARN
    assert "GetStatus failed" in result.detail
    assert check_run(_config(), probe).status is CheckStatus.SKIP


def test_not_serving_coordinator_fails(
    health_only_server: tuple[str, health.HealthServicer],
) -> None:
    address, servicer = health_only_server
    servicer.set(WORKER_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    probe = probe_coordinator(address)
    assert not probe.reachable
    assert "NOT_SERVING" in probe.problem


def test_no_coordinator_configured_fails_with_the_flag_to_use() -> None:
    result = check_coordinator(_config(), None)
    assert result.status is CheckStatus.FAIL
    assert "--coordinator HOST:PORT" in result.fix


def _probe(*runs: common_pb2.RunSummary) -> CoordinatorProbe:
    return CoordinatorProbe("127.0.0.1:1", True, runs=runs)


def _run(run_id: str, key: bytes = TRAINER) -> common_pb2.RunSummary:
    return common_pb2.RunSummary(run_id=run_id, trainer_public_key=key, latest_policy_version=7)


def test_run_with_matching_pinned_key_is_ok() -> None:
    config = _config(run_id="r1", trainer_public_key=TRAINER.hex())
    result = check_run(config, _probe(_run("r0"), _run("r1")))
    assert result.status is CheckStatus.OK
    assert "matches the pin" in result.detail and "v7" in result.detail


def test_wrong_trainer_key_fails_loudly() -> None:
    config = _config(trainer_public_key="ff" * 32)
    result = check_run(config, _probe(_run("r1")))
    assert result.status is CheckStatus.FAIL
    assert "WRONG trainer key" in result.detail
    assert TRAINER.hex() in result.detail and "ff" * 32 in result.detail


def test_unpinned_key_is_shown_for_join_to_pin() -> None:
    result = check_run(_config(), _probe(_run("r1")))
    assert result.status is CheckStatus.OK
    assert f"join will show and pin {TRAINER.hex()}" in result.detail


def test_unknown_run_lists_the_offered_ones() -> None:
    result = check_run(_config(run_id="nope"), _probe(_run("a"), _run("b")))
    assert result.status is CheckStatus.FAIL
    assert "(offered: a, b)" in result.detail


def test_several_runs_without_a_choice_warn() -> None:
    result = check_run(_config(), _probe(_run("a"), _run("b")))
    assert result.status is CheckStatus.WARN and "--run-id" in result.fix


def test_no_runs_warn() -> None:
    assert check_run(_config(), _probe()).status is CheckStatus.WARN


def test_clock_skew_is_unknown_rather_than_invented() -> None:
    result = check_clock(_config(), _probe())
    assert result.status is CheckStatus.SKIP
    assert result.detail.startswith("unknown")


# ---------------------------------------------------------------- all together


def test_run_checks_reports_every_check_in_order(tmp_path: Path) -> None:
    config = _config(coordinator=f"127.0.0.1:{_closed_port()}", sandbox="bubblewrap")
    results = run_checks(config, coordinator_timeout_s=2.0)
    assert [r.name for r in results] == [
        "platform",
        "cpu & memory",
        "gpu",
        "engine",
        "sandbox",
        "disk",
        "identity",
        "coordinator",
        "run & trainer key",
        "clock skew",
    ]
    assert worst(results) is CheckStatus.FAIL
    assert json.loads(json.dumps([r.to_dict() for r in results]))[7]["status"] == "fail"
