"""`coderepair-worker join` as a volunteer sees it: the real console script in a terminal.

Each test starts the installed ``coderepair-worker join`` (no ``--json-logs``) with a
pseudo-terminal as its controlling terminal, 200 columns wide, so rich draws its live
panel as on a real screen, and Ctrl-C is a real ``\\x03`` typed into the terminal, which
the kernel's line discipline turns into SIGINT for the worker's process group.

Everything is real: the coordinator (`Coordinator` serving gRPC on loopback from a
thread of this test process, SQLite, local object store), the tiny random-init model
published as a signed full policy, the worker's HF engine on CPU, Docker or bubblewrap.
The missing parts are real too: a PATH without docker or bwrap plus a DOCKER_HOST socket
that does not exist; a closed port; a trainer key that is not the run's; a published
shard whose bytes were changed on disk after publication.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest

from coderepair.coordinator.config import load_config
from coderepair.coordinator.service.server import Coordinator
from coderepair.protocol import rpc
from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import build_manifest_for_dir, sign_manifest
from coderepair.protocol.task import TaskSet, write_taskset
from coderepair.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.slow

WORKER = Path(sys.executable).with_name("coderepair-worker")
COLUMNS = 200
TOKENIZER_SHA = "d" * 64
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- the terminal


class Terminal:
    """A command running with a pty as its controlling terminal; what it drew, as text."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))

        def make_controlling_terminal() -> None:
            # After setsid (start_new_session), fd 0 becomes the session's controlling
            # terminal, so \x03 typed into the pty reaches the worker as SIGINT.
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=make_controlling_terminal,  # noqa: PLW1509  (no threads touch it)
        )
        os.close(slave)
        self._master = master
        self._raw = bytearray()
        self._eof = False

    @property
    def screen(self) -> str:
        """Everything drawn so far, escapes removed (every frame of the live panel)."""
        return _ANSI.sub("", self._raw.decode("utf-8", "replace")).replace("\r", "")

    def _pump(self, wait_s: float) -> None:
        if self._eof:
            time.sleep(wait_s)
            return
        ready, _, _ = select.select([self._master], [], [], wait_s)
        if not ready:
            return
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: the child closed its side of the terminal
            data = b""
        if data:
            self._raw += data
        else:
            self._eof = True

    def wait_until(self, condition: Callable[[str], bool], what: str, timeout_s: float) -> None:
        """Read until ``condition(screen)`` holds; fail with the screen's tail otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition(self.screen):
                return
            if self._eof and self.proc.poll() is not None:
                pytest.fail(
                    f"the worker exited ({self.proc.returncode}) before {what}: {self.tail}"
                )
            self._pump(0.3)
        pytest.fail(f"no {what} within {timeout_s} s: {self.tail}")

    def type(self, text: str) -> None:
        os.write(self._master, text.encode())

    def finish(self, timeout_s: float) -> int:
        """Read until the command exits; its exit code."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._pump(0.3)
            if self._eof and self.proc.poll() is not None:
                return self.proc.returncode
        pytest.fail(f"the worker did not exit within {timeout_s} s: {self.tail}")

    @property
    def tail(self) -> str:
        return self.screen[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        os.close(self._master)


# ---------------------------------------------------------------- the coordinator


class LiveCoordinator:
    """A real `Coordinator` serving from its own event loop in a thread of this process."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.coordinator = Coordinator(load_config(None, config), seed=0)
        self._do(self.coordinator.start())
        self.address = self.coordinator.address

    def _do(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(120)

    def open_leases(self, run_id: str, n_tasks: int) -> int:
        """Tasks of ``run_id`` held by a lease right now (read on the coordinator's loop)."""

        async def count() -> int:
            return n_tasks - self.coordinator.context.runs[run_id].pool.free_count()

        return int(self._do(count()))

    def close(self) -> None:
        self._do(self.coordinator.shutdown(grace_s=1.0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny model and the fixture task set, built once for the module."""
    from coderepair.coordinator.tasks.repo import load_fixtures
    from coderepair.worker.models import build_tiny_model

    root = tmp_path_factory.mktemp("join-pty-world")
    model = build_tiny_model(root / "model")
    tasks = load_fixtures()
    write_taskset(
        TaskSet.from_tasks(tasks, builder_version="test", split_rule="fixtures"),
        root / "tasks.jsonl",
    )
    return {"model": model, "tasks": root / "tasks.jsonl", "n_tasks": len(tasks)}


@pytest.fixture
def trainer(tmp_path: Path) -> Identity:
    return Identity.create(tmp_path / "trainer" / "trainer.pem")


@pytest.fixture
def coordinator(
    tmp_path: Path, world: dict[str, Any], trainer: Identity
) -> Iterator[LiveCoordinator]:
    """A coordinator on loopback with run r1 on the tiny model; nothing published yet."""
    config = {
        "server": {
            "listen": f"127.0.0.1:{_free_port()}",
            "sweep_interval_s": 0.2,
            "heartbeat_interval_s": 1.0,
        },
        "database": {"url": f"sqlite:///{tmp_path / 'coordinator.db'}"},
        "object_store": {"kind": "local", "path": str(tmp_path / "objects")},
        "audit": {"auditor": "consistency", "poll_s": 0.2},
        "dashboard": {"enabled": False},
        "runs": [
            {
                "run_id": "r1",
                "trainer_public_key": trainer.public_key_hex,
                "base_model_id": str(world["model"]),
                "tokenizer_path": str(world["model"]),
                "tokenizer_sha256": TOKENIZER_SHA,
                "tasks_path": str(world["tasks"]),
                "group_size": 2,
                "max_new_tokens": 24,
                "max_tasks_per_lease": 1,
                "lease_ttl_s": 300,
            }
        ],
    }
    live = LiveCoordinator(config)
    try:
        yield live
    finally:
        live.close()


def publish(address: str, trainer: Identity, world: dict[str, Any], shards: Path) -> Path:
    """Publish the tiny model as run r1's signed full policy v1, served from ``shards``."""
    shards.mkdir(parents=True)
    shutil.copy(world["model"] / "model.safetensors", shards / "model.safetensors")
    manifest = build_manifest_for_dir(
        shards,
        run_id="r1",
        version=1,
        base_model=str(world["model"]),
        tokenizer_sha256=TOKENIZER_SHA,
        kind="full",
        trainer_key=trainer.public_key,
        parent_version=None,
    )
    payload = trainer_pb2.PublishPayload(
        run_id="r1",
        version=1,
        manifest_json=sign_manifest(manifest, trainer).to_bytes(),
        shards=[
            common_pb2.ShardLocation(
                name=s.name, urls=[(shards / s.name).as_uri()], size_bytes=s.size, sha256=s.sha256
            )
            for s in manifest.shards
        ],
        trainer_step=1,
    )
    purpose = rpc.SIGNED_RPCS[f"/{rpc.TRAINER_SERVICE}/PublishPolicy"].purpose
    envelope = trainer.sign(purpose, payload.SerializeToString()).to_bytes()
    with grpc.insecure_channel(address, options=rpc.channel_options()) as channel:
        answer = trainer_pb2_grpc.TrainerServiceStub(channel).PublishPolicy(
            trainer_pb2.PublishPolicyRequest(envelope=envelope), timeout=60
        )
    assert answer.accepted, answer.rejection.message
    return shards / "model.safetensors"


# ---------------------------------------------------------------- the worker


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment with private user dirs and no worker settings."""
    out = {k: v for k, v in os.environ.items() if not k.upper().startswith("CODEREPAIR_WORKER_")}
    for name in ("CONFIG", "DATA", "CACHE"):
        out[f"XDG_{name}_HOME"] = str(tmp_path / name.lower())
    out["TERM"] = "xterm-256color"
    out["PYTHONUNBUFFERED"] = "1"
    for name in ("COLUMNS", "LINES", "NO_COLOR", "TERM_PROGRAM"):
        out.pop(name, None)
    return out


def start_join(tmp_path: Path, env: Mapping[str, str], address: str, *extra: str) -> Terminal:
    argv = [
        str(WORKER),
        "join",
        "--coordinator",
        address,
        "--key",
        str(tmp_path / "keys" / "worker.pem"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--engine",
        "hf",
        "--cpu-threads",
        "1",
        "--max-tasks",
        "1",
        "--drain-timeout",
        "60",
        *extra,
    ]
    return Terminal(argv, env, tmp_path)


def flat(screen: str) -> str:
    """The screen with line breaks and runs of spaces collapsed (rich folds long lines)."""
    return re.sub(r"\s+", " ", screen)


# Between a row's label and its value rich draws a table border.
SEP = r"[\s│┃|]+"
_COUNTS = re.compile(r"(\d+) submitted\s+(\d+) accepted\s+(\d+) rejected")


def _accepted(screen: str) -> int:
    return max((int(m.group(2)) for m in _COUNTS.finditer(screen)), default=0)


# ---------------------------------------------------------------- the tests


@pytest.mark.timeout(400)
def test_join_shows_the_live_view_and_leaves_cleanly_on_ctrl_c_mid_lease(
    tmp_path: Path,
    env: dict[str, str],
    coordinator: LiveCoordinator,
    trainer: Identity,
    world: dict[str, Any],
) -> None:
    publish(coordinator.address, trainer, world, tmp_path / "policy-v1")
    term = start_join(tmp_path, env, coordinator.address)
    try:
        term.wait_until(lambda s: _accepted(s) > 0, "accepted rollouts on the live view", 240)
        screen = term.screen
        # The live panel as drawn: the run, the policy the engine runs, tokens/s, counts.
        assert re.search(rf"coordinator{SEP}{re.escape(coordinator.address)}\s+run r1", screen)
        assert re.search(rf"policy{SEP}v1\s+engine hf", screen), term.tail
        rates = [float(x) for x in re.findall(rf"tokens/s{SEP}([\d.]+)\s+\(\d+ tokens\)", screen)]
        assert rates and max(rates) > 0, term.tail
        assert re.search(rf"sandbox{SEP}(docker|bubblewrap)\s+\d+ jobs", screen), term.tail
        assert "engine now runs policy v1" in screen
        # Ctrl-C while the worker holds a lease (seen from the coordinator's side).
        deadline = time.monotonic() + 60
        while coordinator.open_leases("r1", world["n_tasks"]) == 0:
            assert time.monotonic() < deadline, "the worker never held a lease"
            time.sleep(0.05)
        term.type("\x03")
        code = term.finish(120)
        assert code == 0, term.tail
        text = flat(term.screen)
        assert "SIGINT: leaving (again to quit now)" in text
        assert "leaving: finishing or releasing the leases in hand" in text
        assert "(stopped)" in text  # the panel's last frame: the loop has stopped
        assert coordinator.open_leases("r1", world["n_tasks"]) == 0
    finally:
        term.close()


@pytest.mark.timeout(300)
def test_join_says_there_is_no_sandbox(
    tmp_path: Path,
    env: dict[str, str],
    coordinator: LiveCoordinator,
    trainer: Identity,
    world: dict[str, Any],
) -> None:
    publish(coordinator.address, trainer, world, tmp_path / "policy-v1")
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env["PATH"] = str(empty_bin)
    env["DOCKER_HOST"] = f"unix://{tmp_path}/no-engine.sock"
    term = start_join(tmp_path, env, coordinator.address)
    try:
        assert term.finish(240) == 1, term.tail
        text = flat(term.screen)
        assert "error: no sandbox backend works on this machine, and model-written code " in text
        assert "never runs unsandboxed" in text
        assert "apt install docker.io" in text and "apt install bubblewrap" in text
        assert "docker: no Docker engine answers" in text
        assert "Traceback" not in text
        assert coordinator.open_leases("r1", world["n_tasks"]) == 0
    finally:
        term.close()


@pytest.mark.timeout(300)
def test_join_says_the_coordinator_is_unreachable(tmp_path: Path, env: dict[str, str]) -> None:
    # join waits out a restarting coordinator (60 s by default); --connect-timeout shortens it.
    address = f"127.0.0.1:{_free_port()}"
    term = start_join(tmp_path, env, address, "--connect-timeout", "5")
    try:
        assert term.finish(200) == 1, term.tail
        text = flat(term.screen)
        assert f"error: Register: the coordinator at {address} did not answer for" in text
        assert "UNAVAILABLE" in text
        assert "check that it runs and that this machine can reach it" in text
        assert "coderepair-worker doctor" in text
        assert "Traceback" not in text
    finally:
        term.close()


@pytest.mark.timeout(300)
def test_join_says_the_trainer_key_is_wrong(
    tmp_path: Path, env: dict[str, str], coordinator: LiveCoordinator, trainer: Identity
) -> None:
    other = Identity.generate()
    term = start_join(tmp_path, env, coordinator.address, "--trainer-key", other.public_key_hex)
    try:
        assert term.finish(200) == 1, term.tail
        text = flat(term.screen)
        assert "error: wrong trainer key: run r1 at this coordinator announces trainer key" in text
        assert trainer.public_key_hex in text and other.public_key_hex in text
        assert "set trainer_public_key (or --trainer-key)" in text
        assert "Traceback" not in text
    finally:
        term.close()


@pytest.mark.timeout(300)
def test_join_says_a_published_shard_is_corrupt(
    tmp_path: Path,
    env: dict[str, str],
    coordinator: LiveCoordinator,
    trainer: Identity,
    world: dict[str, Any],
) -> None:
    shard = publish(coordinator.address, trainer, world, tmp_path / "policy-v1")
    # Same size, different bytes: only the sha256 check can tell.
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    shard.write_bytes(bytes(data))
    term = start_join(tmp_path, env, coordinator.address)
    try:
        assert term.finish(240) == 1, term.tail
        text = flat(term.screen)
        assert "error: policy version 1 refused:" in text
        assert "shard model.safetensors from" in text
        assert "the copy is corrupt or was tampered with" in text
        assert "Traceback" not in text
    finally:
        term.close()
