"""Docker sandbox backend: a warm pool of locked-down containers running the resident runner.

Every container is created with: no network (``network_mode="none"``), a read-only
root filesystem, one tmpfs work dir (nosuid, nodev, noexec, size- and inode-capped,
owned by uid 65534), uid 65534, every capability dropped, ``no-new-privileges``, memory
(no swap), pids and CPU limits, a private IPC namespace without ``/dev/shm``, no log
driver (the channel never touches the disk), and the runner bind-mounted read-only as
PID 1. The job's own per-process limits (RLIMIT_AS = ``memory_mb``, file size, CPU
time, open files) are applied by the runner, identically in every backend; the cgroup
memory limit is ``memory_mb`` + `RUNNER_OVERHEAD_MB` for the runner and the judge.
The host talks to the runner over the container's attached stdin/stdout (see
`channel.py` for the protocol).

Warm pool (default): `pool_size` containers stay resident; each job runs in fresh
processes under the runner's own limits and clean-up, so a container is reused only
after a clean job. Any anomaly, timeout or runner/channel error retires the container
(removed in the background) and a replacement is started in the background. With
``fresh=True`` every job gets a new container that is removed afterwards: the same
isolation, the baseline that ``bench/sandbox.py`` compares against.

Containers carry the label ``coderepair.sandbox.owner=<host>:<pid>:<start time>:<instance>``;
`close()` removes every container this object started, and start-up removes labelled
containers whose owning process on this host is gone (a crashed previous run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig

from coderepair.worker.sandbox.base import (
    Job,
    JobResult,
    Sandbox,
    SandboxError,
    SandboxLimits,
    SandboxUnavailable,
)
from coderepair.worker.sandbox.channel import RUNNER_PATH, InvalidJob, RunnerChannel

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "coderepair-sandbox:latest"
LABEL = "coderepair.sandbox"
OWNER_LABEL = "coderepair.sandbox.owner"
SANDBOX_UID = "65534:65534"
"""nobody:nogroup, present in every Debian image; owns the work dir tmpfs."""
RUNNER_IN_CONTAINER = "/opt/coderepair/runner.py"
WORKDIR = "/work"
WORKDIR_INODES = 32768
"""Files the work dir may hold: bounds how long wiping it can take (a repo fits easily)."""
RUNNER_OVERHEAD_MB = 256
"""Memory for the runner and the judge on top of the job's own `memory_mb`."""
EXTRA_PIDS = 4
"""The runner, the judge and slack on top of the job's own `pids`."""
ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)
"""What the Docker SDK raises when the engine fails or the connection to it breaks."""
BUILD_HINT = "build it with `make sandbox-image` (or deploy/sandbox/build-offline)"


class _AttachTransport:
    """The runner's stdin/stdout over Docker's attach socket (stdout/stderr multiplexed)."""

    def __init__(self, raw: Any) -> None:
        self._keep = raw  # holds the HTTP response (and so the connection) open
        self._sock: socket.socket = getattr(raw, "_sock", raw)
        self._sock.settimeout(None)
        self._raw = bytearray()
        self.stderr = bytearray()

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise SandboxError(f"cannot write to the sandbox container: {exc}") from exc

    def recv(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            payload = self._next_stdout()
            if payload:
                return payload
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._sock], [], [], max(remaining, 0.0))
            if not ready:
                raise TimeoutError
            try:
                chunk = self._sock.recv(1 << 20)
            except OSError as exc:
                raise SandboxError(f"cannot read from the sandbox container: {exc}") from exc
            if not chunk:
                return b""
            self._raw += chunk

    def _next_stdout(self) -> bytes:
        """Pop whole multiplexed frames: [stream, 0, 0, 0, size (big-endian u32)] + data."""
        while len(self._raw) >= 8:
            stream, size = self._raw[0], struct.unpack(">I", self._raw[4:8])[0]
            if len(self._raw) < 8 + size:
                return b""
            payload = bytes(self._raw[8 : 8 + size])
            del self._raw[: 8 + size]
            if stream == 1:
                return payload
            self.stderr = (self.stderr + payload)[-8192:]
        return b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


@dataclass
class _Box:
    """One running container and the channel to its runner."""

    container_id: str
    channel: RunnerChannel
    transport: _AttachTransport


def _owner_key(pid: int) -> str | None:
    """'<host>:<pid>:<start time>' of a live process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return f"{socket.gethostname()}:{pid}:{int(fields[19])}"


def _log_failed_start(future: Future[None]) -> None:
    """A replacement that fails to start leaves the pool smaller; say so (a caller only
    sees an error once no container is left)."""
    if not future.cancelled() and future.exception() is not None:
        log.warning("a sandbox container failed to start: %s", future.exception())


class DockerSandbox(Sandbox):
    """Runs jobs in Docker containers; a warm pool by default, or one per job (`fresh`)."""

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        image: str = DEFAULT_IMAGE,
        pool_size: int = 2,
        fresh: bool = False,
        client: docker.DockerClient | None = None,
        start_timeout_s: float = 60.0,
        runner_path: Path = RUNNER_PATH,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self.limits = limits or SandboxLimits()
        self.image = image
        self.pool_size = pool_size
        self.fresh = fresh
        self.name = "docker-fresh" if fresh else "docker"
        self.start_timeout_s = start_timeout_s
        self._runner_path = str(Path(runner_path).resolve())
        process = _owner_key(os.getpid()) or f"{socket.gethostname()}:{os.getpid()}:0"
        self._owner = f"{process}:{uuid.uuid4().hex[:12]}"  # one label per instance
        self._client = client or self._connect()
        self._lock = threading.Lock()
        self._live: dict[str, _Box] = {}
        self._idle: queue.Queue[_Box] = queue.Queue()
        self._starting = 0
        self._closed = False
        self._executor = ThreadPoolExecutor(
            max_workers=max(2, pool_size), thread_name_prefix="docker-sandbox"
        )
        self._check_image()
        self.remove_stale()
        if not fresh:
            try:
                for future in [self._start_in_background() for _ in range(pool_size)]:
                    future.result()
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------ public API
    def run(self, job: Job) -> JobResult:
        if self.fresh:
            box = self._start_box()
            try:
                return self._run_on(box, job)
            finally:
                self._remove(box)
        box = self._checkout()
        try:
            result = self._run_on(box, job)
        except InvalidJob:
            self._idle.put(box)  # the job never reached the runner intact; box is clean
            raise
        except BaseException:
            self._recycle(box)
            raise
        if result.anomalies or result.status == "timeout":
            self._recycle(box)
        else:
            self._idle.put(box)
        return result

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._executor.shutdown(wait=True)
        with self._lock:
            boxes = list(self._live.values())
        for box in boxes:
            self._remove(box)
        with self._lock:
            left = list(self._live)
        for cid in left:  # one more try for those the engine refused a moment ago
            with contextlib.suppress(*ENGINE_ERRORS):
                self._client.api.remove_container(cid, force=True)

    def remove_stale(self) -> int:
        """Remove labelled containers whose owning process on this host has exited."""
        host = socket.gethostname()
        removed = 0
        try:
            stale = self._client.api.containers(all=True, filters={"label": LABEL})
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"cannot list containers: {exc}") from exc
        for info in stale:
            owner = (info.get("Labels") or {}).get(OWNER_LABEL, "")
            parts = owner.split(":")
            if len(parts) != 4 or parts[0] != host or not parts[1].isdigit():
                continue
            if _owner_key(int(parts[1])) == ":".join(parts[:3]):
                continue  # its process is alive: a pool of a running program
            with contextlib.suppress(*ENGINE_ERRORS):
                self._client.api.remove_container(info["Id"], force=True)
                removed += 1
        return removed

    # ------------------------------------------------------------------ pool
    def _checkout(self) -> _Box:
        while True:
            try:
                return self._idle.get(timeout=0.2)
            except queue.Empty:
                pass
            with self._lock:
                if self._closed:
                    raise SandboxError("the Docker sandbox is closed")
                exhausted = not self._live and self._starting == 0
            if exhausted:  # every container failed: try once more, in this thread
                return self._start_box()

    def _recycle(self, box: _Box) -> None:
        with self._lock:
            closed = self._closed
        if closed:
            self._remove(box)
            return
        try:
            self._executor.submit(self._remove, box)
            self._start_in_background()
        except RuntimeError:  # executor shut down by a concurrent close()
            self._remove(box)

    def _start_in_background(self) -> Future[None]:
        with self._lock:
            self._starting += 1

        def start() -> None:
            try:
                box = self._start_box()  # a failure surfaces in __init__ or in _checkout
            finally:
                with self._lock:
                    self._starting -= 1
            with self._lock:
                closed = self._closed
            if closed:
                self._remove(box)
            else:
                self._idle.put(box)

        future = self._executor.submit(start)
        future.add_done_callback(_log_failed_start)
        return future

    # ------------------------------------------------------------------ containers
    def _run_on(self, box: _Box, job: Job) -> JobResult:
        try:
            return box.channel.run(job, self.limits)
        except SandboxError as exc:
            tail = box.transport.stderr.decode("utf-8", "replace").strip()
            if tail:
                raise SandboxError(f"{exc}; runner stderr: {tail[-2000:]}") from exc
            raise
        except OSError as exc:
            raise SandboxError(f"lost the sandbox container: {exc}") from exc

    def _start_box(self) -> _Box:
        api = self._client.api
        lim = self.limits
        memory = f"{lim.memory_mb + RUNNER_OVERHEAD_MB}m"
        host_config = api.create_host_config(
            network_mode="none",
            read_only=True,
            tmpfs={
                WORKDIR: f"rw,nosuid,nodev,noexec,size={lim.workdir_mb}m,"
                f"nr_inodes={WORKDIR_INODES},uid=65534,gid=65534,mode=0700"
            },
            binds={self._runner_path: {"bind": RUNNER_IN_CONTAINER, "mode": "ro"}},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit=memory,
            memswap_limit=memory,
            pids_limit=lim.pids + EXTRA_PIDS,
            nano_cpus=int(lim.cpus * 1e9),
            ipc_mode="none",  # a private IPC namespace and no /dev/shm to leave files in
            log_config=LogConfig(type="none"),
            init=False,
        )
        try:
            created = api.create_container(
                self.image,
                command=["python3", "-s", "-B", RUNNER_IN_CONTAINER, "--workdir", WORKDIR],
                user=SANDBOX_UID,
                working_dir=WORKDIR,
                stdin_open=True,
                tty=False,
                network_disabled=True,
                environment={"LANG": "C.UTF-8"},
                labels={LABEL: "1", OWNER_LABEL: self._owner},
                host_config=host_config,
            )
        except docker.errors.ImageNotFound as exc:
            raise SandboxUnavailable(
                f"sandbox image {self.image} is missing: {BUILD_HINT}"
            ) from exc
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"cannot create a sandbox container: {exc}") from exc
        cid = created["Id"]
        try:
            raw = api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            transport = _AttachTransport(raw)
            box = _Box(cid, RunnerChannel(transport, self.name), transport)
            with self._lock:
                self._live[cid] = box
            api.start(cid)
            box.channel.hello(self.start_timeout_s)
        except BaseException as exc:
            with contextlib.suppress(*ENGINE_ERRORS):
                api.remove_container(cid, force=True)
            with self._lock:
                self._live.pop(cid, None)
            if isinstance(exc, SandboxError):
                raise
            if isinstance(exc, (*ENGINE_ERRORS, OSError)):
                raise SandboxError(f"cannot start a sandbox container: {exc}") from exc
            raise
        return box

    def _remove(self, box: _Box) -> None:
        """Force-remove a container; one that cannot be removed now stays listed for
        `close()` to try again."""
        box.transport.close()
        try:
            self._client.api.remove_container(box.container_id, force=True)
        except docker.errors.NotFound:
            pass
        except ENGINE_ERRORS:
            return
        with self._lock:
            self._live.pop(box.container_id, None)

    def _connect(self) -> docker.DockerClient:
        try:
            client = docker.from_env(timeout=120)
            client.ping()
        except ENGINE_ERRORS as exc:
            raise SandboxUnavailable(
                "no Docker engine answers (is dockerd running and may this user use it? "
                "install docker.io / Docker Engine, or use the bubblewrap backend): "
                f"{exc}"
            ) from exc
        return client

    def _check_image(self) -> None:
        try:
            self._client.images.get(self.image)
        except docker.errors.ImageNotFound as exc:
            raise SandboxUnavailable(
                f"sandbox image {self.image} is missing: {BUILD_HINT}"
            ) from exc
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"cannot inspect the sandbox image {self.image}: {exc}") from exc
