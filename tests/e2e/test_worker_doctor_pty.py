"""`coderepair-worker doctor` as a volunteer sees it: the real console script in a terminal.

Each test starts the installed ``coderepair-worker`` in a pseudo-terminal (so rich draws
its table and colours as on a real screen) and reads what it shows. The missing parts
are real: a closed port for the coordinator; PATH without docker or bwrap plus a
DOCKER_HOST socket that does not exist for the sandbox. The passing case runs against a
real ``coderepair-coordinator serve`` on loopback and the real Docker engine.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from coderepair.protocol.identity import Identity

BIN = Path(sys.executable).parent
WORKER = BIN / "coderepair-worker"
COORDINATOR = BIN / "coderepair-coordinator"
COLUMNS = 200
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_in_pty(argv: list[str], env: Mapping[str, str], timeout_s: float = 180) -> tuple[int, str]:
    """Run ``argv`` with a pty as its terminal; (exit code, screen text without escapes)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=dict(env), start_new_session=True
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side of the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{argv} did not finish within {timeout_s} s")
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
    text = _ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r", "")
    return code, text


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment with private user dirs and no worker settings."""
    out = {k: v for k, v in os.environ.items() if not k.upper().startswith("CODEREPAIR_WORKER_")}
    for name in ("CONFIG", "DATA", "CACHE"):
        out[f"XDG_{name}_HOME"] = str(tmp_path / name.lower())
    out["TERM"] = "xterm-256color"
    out.pop("COLUMNS", None)
    out.pop("NO_COLOR", None)
    return out


def test_doctor_says_the_coordinator_is_unreachable(env: dict[str, str]) -> None:
    address = f"127.0.0.1:{_free_port()}"
    code, screen = run_in_pty([str(WORKER), "doctor", "--coordinator", address], env)
    assert code == 1, screen
    assert "coderepair-worker doctor" in screen  # the table's title: rich drew it
    assert f"no coordinator answers at {address} (unreachable" in screen
    assert "check the address (--coordinator" in screen
    assert "check(s) failed (coordinator" in screen


def test_doctor_says_there_is_no_sandbox(env: dict[str, str], tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env["PATH"] = str(empty_bin)
    env["DOCKER_HOST"] = f"unix://{tmp_path}/no-engine.sock"
    code, screen = run_in_pty([str(WORKER), "doctor"], env)
    assert code == 1, screen
    assert "no sandbox works here, and model-written code never runs unsandboxed" in screen
    assert "apt install docker.io" in screen and "apt install bubblewrap" in screen
    assert re.search(r"sandbox\s+│\s+FAIL", screen), screen


@pytest.fixture
def coordinator(tmp_path: Path, env: dict[str, str]) -> Iterator[str]:
    """A real `coderepair-coordinator serve` on loopback (SQLite, no runs)."""
    address = f"127.0.0.1:{_free_port()}"
    log = (tmp_path / "coordinator.log").open("wb")
    proc = subprocess.Popen(
        [
            str(COORDINATOR),
            "serve",
            "--listen",
            address,
            "--database-url",
            f"sqlite:///{tmp_path / 'coordinator.db'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:
        _wait_serving(address, proc, tmp_path / "coordinator.log")
        yield address
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 90
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the coordinator exited: {log.read_text()[-2000:]}")
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                return
            except grpc.RpcError:
                time.sleep(0.3)
    pytest.fail(f"the coordinator did not serve within 90 s: {log.read_text()[-2000:]}")


@pytest.mark.docker
def test_doctor_passes_where_everything_is_there(
    env: dict[str, str], tmp_path: Path, coordinator: str
) -> None:
    identity = Identity.create(tmp_path / "data" / "coderepair" / "worker-key.pem")
    code, screen = run_in_pty(
        [str(WORKER), "doctor", "--coordinator", coordinator, "--sandbox", "docker"], env
    )
    assert code == 0, screen
    assert "FAIL" not in screen
    assert re.search(r"sandbox\s+│\s+OK\s+│\s+docker: Docker engine answers", screen), screen
    assert re.search(rf"coordinator\s+│\s+OK\s+│\s+{re.escape(coordinator)} is serving", screen)
    assert f"worker id {identity.key_id}" in screen
    assert "Ready to join" in screen
