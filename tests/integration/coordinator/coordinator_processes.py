"""Helpers for tests that run `coderepair-coordinator` as a real subprocess.

The config is written as a TOML file (what an operator writes), the console script of
this virtual environment is started with it, and health checks over gRPC say when a
`serve` process is ready. Nested tables (``{"dashboard": {"window": {...}}}``) become
``[dashboard.window]``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["free_port", "start_command", "wait_serving", "write_toml"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table(name: str, body: Mapping[str, Any], lines: list[str]) -> None:
    lines.append(f"[{name}]")
    nested = {k: v for k, v in body.items() if isinstance(v, Mapping)}
    lines += [f"{k} = {_value(v)}" for k, v in body.items() if v is not None and k not in nested]
    for key, sub in nested.items():
        _table(f"{name}.{key}", sub, lines)


def write_toml(path: Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` (sections, and ``runs`` as a list of tables) as TOML."""
    lines: list[str] = []
    for section, body in config.items():
        if section == "runs":
            for run in body:
                lines.append("[[runs]]")
                lines += [f"{k} = {_value(v)}" for k, v in run.items() if v is not None]
        else:
            _table(section, body, lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def start_command(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``coderepair-coordinator ARGS`` with its output appended to ``log``.

    The test's own CODEREPAIR_COORDINATOR_* variables are not passed on: the TOML file
    is the whole configuration of the process.
    """
    script = Path(sys.executable).with_name("coderepair-coordinator")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEREPAIR_COORDINATOR_")}
    with log.open("ab") as out:
        return subprocess.Popen([str(script), *args], stdout=out, stderr=subprocess.STDOUT, env=env)


async def wait_serving(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the coordinator at ``address`` answers SERVING (AssertionError if it died)."""
    deadline = time.monotonic() + 90
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"coordinator exited: {log.read_text()[-3000:]}")
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"coordinator did not serve within 90 s: {log.read_text()[-3000:]}")
