"""`coderepair-worker join` as a real subprocess against a real coordinator on loopback.

Everything is real: the coordinator (in this test's event loop, SQLite, local object
store, gRPC on a fixed loopback port so it can be restarted), the tiny random-init model
built here and published as a signed full policy, the worker's HF engine on CPU, its
sandbox (Docker or bubblewrap) and the signal handling. The worker runs with
``--json-logs`` so its progress is read as JSON lines from its stdout.

The tiny model writes no well-formed patch, so every rollout gets the spec's malformed
reward; what is checked is the network: registration, policy download and swap,
leases, signed batches accepted and streamed to the trainer exactly once, leaving on
SIGINT with no lease left open, and surviving a coordinator restart. One test runs the
work loop in this process instead, to hold a release in flight while the drain looks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coderepair.coordinator.config import CoordinatorConfig, load_config
from coderepair.coordinator.service.server import Coordinator
from coderepair.protocol import rpc
from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import build_manifest_for_dir, sign_manifest
from coderepair.protocol.task import TaskSet, write_taskset
from coderepair.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from coderepair.worker.client import CoordinatorClient

TOKENIZER_SHA = "d" * 64
WORKER_BIN = Path(sys.executable).with_name("coderepair-worker")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny model (base directory + policy shard) and the fixture task set."""
    from coderepair.coordinator.tasks.repo import load_fixtures
    from coderepair.worker.models import build_tiny_model

    root = tmp_path_factory.mktemp("join-world")
    model = build_tiny_model(root / "model")
    tasks = load_fixtures()
    taskset = TaskSet.from_tasks(tasks, builder_version="test", split_rule="fixtures")
    write_taskset(taskset, root / "tasks.jsonl")
    for version in (1, 2):
        shards = root / f"policy-v{version}"
        shards.mkdir()
        shutil.copy(model / "model.safetensors", shards / "model.safetensors")
    return {"root": root, "model": model, "tasks": root / "tasks.jsonl", "n_tasks": len(tasks)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(
    tmp: Path, world: dict[str, Any], trainer: Identity, port: int, lease_ttl_s: float = 120
) -> CoordinatorConfig:
    return load_config(
        None,
        {
            "server": {
                "listen": f"127.0.0.1:{port}",
                "sweep_interval_s": 0.2,
                "heartbeat_interval_s": 1.0,
            },
            "database": {"url": f"sqlite:///{tmp / 'coordinator.db'}"},
            "object_store": {"kind": "local", "path": str(tmp / "objects")},
            "audit": {"window_s": 0.0, "poll_s": 0.05},
            "runs": [
                {
                    "run_id": "r1",
                    "trainer_public_key": trainer.public_key_hex,
                    "base_model_id": str(world["model"]),
                    "tokenizer_path": str(world["model"]),
                    "tokenizer_sha256": TOKENIZER_SHA,
                    "tasks_path": str(world["tasks"]),
                    "group_size": 2,
                    "max_policy_lag": 1,
                    "max_new_tokens": 12,
                    "max_tasks_per_lease": 1,
                    "lease_ttl_s": lease_ttl_s,
                }
            ],
        },
    )


class Trainer:
    """The trainer's two calls this test needs: publish a version, read the stream."""

    def __init__(self, address: str, identity: Identity, world: dict[str, Any]) -> None:
        self.identity = identity
        self.world = world
        self.channel = grpc.aio.insecure_channel(address, options=rpc.channel_options())
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    def _signed(self, method: str, payload: Any) -> bytes:
        purpose = rpc.SIGNED_RPCS[f"/{rpc.TRAINER_SERVICE}/{method}"].purpose
        return self.identity.sign(purpose, payload.SerializeToString()).to_bytes()

    async def publish(self, version: int) -> None:
        shards = self.world["root"] / f"policy-v{version}"
        manifest = build_manifest_for_dir(
            shards,
            run_id="r1",
            version=version,
            base_model=str(self.world["model"]),
            tokenizer_sha256=TOKENIZER_SHA,
            kind="full",
            trainer_key=self.identity.public_key,
            parent_version=version - 1 if version > 1 else None,
        )
        payload = trainer_pb2.PublishPayload(
            run_id="r1",
            version=version,
            manifest_json=sign_manifest(manifest, self.identity).to_bytes(),
            shards=[
                common_pb2.ShardLocation(
                    name=s.name,
                    urls=[(shards / s.name).as_uri()],
                    size_bytes=s.size,
                    sha256=s.sha256,
                )
                for s in manifest.shards
            ],
            trainer_step=version,
        )
        answer = await self.stub.PublishPolicy(
            trainer_pb2.PublishPolicyRequest(envelope=self._signed("PublishPolicy", payload))
        )
        assert answer.accepted, answer.rejection.message

    async def rows(self) -> list[trainer_pb2.RolloutRow]:
        payload = trainer_pb2.StreamPayload(run_id="r1", after_cursor=0, follow=False)
        call = self.stub.StreamRollouts(
            trainer_pb2.StreamRolloutsRequest(envelope=self._signed("StreamRollouts", payload))
        )
        return [row async for row in call]

    async def close(self) -> None:
        await self.channel.close()


class WorkerProcess:
    """`coderepair-worker --json-logs join` and the JSON events it prints."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())
        self._changed = asyncio.Event()

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.events.append(json.loads(line))
                self._changed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 120.0) -> None:
        async def until() -> None:
            while len(self.of(kind)) < count:
                if self.proc.returncode is not None and self._reader.done():
                    raise AssertionError(f"worker exited before {count} {kind!r}: {self.tail()}")
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no {count} {kind!r} events in {timeout} s: {self.tail()}"
            ) from None

    def tail(self) -> str:
        events = "\n".join(json.dumps(e) for e in self.events[-15:])
        errors = self.stderr.read_text(errors="replace")[-4000:] if self.stderr.exists() else ""
        return f"{events}\n--- worker stderr (last 4000 characters) ---\n{errors}"

    async def interrupt(self, timeout: float = 90.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code


@contextlib.asynccontextmanager
async def _worker(tmp: Path, port: int) -> AsyncIterator[WorkerProcess]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEREPAIR_WORKER_")} | {
        "XDG_CONFIG_HOME": str(tmp / "xdg-config"),
        "PYTHONUNBUFFERED": "1",
    }
    stderr = tmp / "worker-stderr.log"
    with stderr.open("wb") as errors:
        proc = await asyncio.create_subprocess_exec(
            str(WORKER_BIN),
            "--json-logs",
            "join",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--key",
            str(tmp / "keys" / "worker.pem"),
            "--cache-dir",
            str(tmp / "cache"),
            "--engine",
            "hf",
            "--cpu-threads",
            "1",
            "--max-tasks",
            "1",
            "--policy-poll",
            "1",
            "--drain-timeout",
            "60",
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
            env=env,
        )
    worker = WorkerProcess(proc, stderr)
    try:
        yield worker
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _open_leases(coordinator: Coordinator, n_tasks: int) -> int:
    """Tasks of run r1 currently held by a lease (0: everything is back in the pool)."""
    return n_tasks - coordinator.context.runs["r1"].pool.free_count()


def _check_exactly_once(worker: WorkerProcess, rows: list[trainer_pb2.RolloutRow]) -> None:
    accepted = worker.of("batch_accepted")
    batch_ids = {e["batch_id"] for e in accepted}
    # Every batch the worker saw accepted is in the trainer's stream, and nothing else.
    assert {r.batch_id for r in rows} == batch_ids
    # One batch per lease, stored once even when its answer was replayed.
    assert len({e["lease_id"] for e in accepted}) == len(batch_ids)
    assert len({e["lease_id"] for e in accepted}) == len({r.lease_id for r in rows})
    keys = [(r.lease_id, r.sample.task_id, r.sample.sample_index) for r in rows]
    assert len(keys) == len(set(keys))
    assert len(rows) == sum(e["rollouts"] for e in accepted if not e["replayed"])
    assert [r.cursor for r in rows] == list(range(1, len(rows) + 1))


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_join_produces_accepted_rollouts_takes_new_policy_and_leaves_on_sigint(
    tmp_path: Path, world: dict[str, Any]
) -> None:
    trainer_id = Identity.create(tmp_path / "keys" / "trainer.pem")
    port = _free_port()
    coordinator = Coordinator(_config(tmp_path, world, trainer_id, port), seed=0)
    await coordinator.start()
    trainer = Trainer(coordinator.address, trainer_id, world)
    try:
        await trainer.publish(1)
        async with _worker(tmp_path, port) as worker:
            await worker.wait_for("trainer_key")
            pinned = worker.of("trainer_key")[0]
            assert pinned["trainer_public_key"] == trainer_id.public_key_hex
            assert pinned["origin"].startswith("first join")
            await worker.wait_for("policy_swapped")
            assert worker.of("policy_swapped")[0]["version"] == 1
            await worker.wait_for("batch_accepted")
            # A new version mid-run is downloaded in the background and swapped in.
            await trainer.publish(2)
            await worker.wait_for("policy_swapped", 2)
            assert worker.of("policy_swapped")[1]["version"] == 2
            # Leases issued before v2 may still be in the pipeline; later ones are v2's.
            while not any(e["policy_version"] == 2 for e in worker.of("batch_accepted")):
                await worker.wait_for("batch_accepted", len(worker.of("batch_accepted")) + 1)
            assert await worker.interrupt() == 0, worker.tail()
            assert worker.of("left"), worker.tail()
        assert _open_leases(coordinator, world["n_tasks"]) == 0, worker.tail()
        rows = await trainer.rows()
        _check_exactly_once(worker, rows)
        assert {r.policy_version for r in rows} <= {1, 2}
        assert any(r.policy_version == 2 for r in rows)
        state = json.loads((tmp_path / "keys" / "worker-state.json").read_text())
        assert state["pinned_trainer_keys"] == {"r1": trainer_id.public_key_hex}
        assert state["policy_version"] == 2
        assert (tmp_path / "keys" / "worker-state.json").stat().st_mode & 0o077 == 0
    finally:
        await trainer.close()
        await coordinator.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_join_survives_a_coordinator_restart_without_loss_or_duplicates(
    tmp_path: Path, world: dict[str, Any]
) -> None:
    trainer_id = Identity.create(tmp_path / "keys" / "trainer.pem")
    port = _free_port()
    # A lease granted as the first coordinator went down may never reach the worker; it
    # can only expire, so this test's leases expire sooner than the default.
    ttl = 30.0
    config = _config(tmp_path, world, trainer_id, port, lease_ttl_s=ttl)
    coordinator = Coordinator(config, seed=0)
    await coordinator.start()
    trainer = Trainer(coordinator.address, trainer_id, world)
    await trainer.publish(1)
    await trainer.close()
    try:
        async with _worker(tmp_path, port) as worker:
            await worker.wait_for("batch_accepted")
            await coordinator.shutdown(grace_s=0.5)
            await asyncio.sleep(3.0)  # the worker keeps generating and retrying meanwhile
            coordinator = Coordinator(config, seed=1)
            await coordinator.start()
            before = len(worker.of("batch_accepted"))
            await worker.wait_for("batch_accepted", before + 2)
            assert await worker.interrupt() == 0, worker.tail()
        # Everything the worker held is back in the pool at once or, for a lease whose
        # grant was lost in the restart, once it expires.
        deadline = asyncio.get_running_loop().time() + ttl + 15
        while _open_leases(coordinator, world["n_tasks"]) and (
            asyncio.get_running_loop().time() < deadline
        ):
            await asyncio.sleep(0.5)
        assert _open_leases(coordinator, world["n_tasks"]) == 0
        trainer = Trainer(coordinator.address, trainer_id, world)
        _check_exactly_once(worker, await trainer.rows())
        assert not worker.of("batch_rejected"), worker.tail()
        assert not worker.of("batch_dropped"), worker.tail()
    finally:
        await trainer.close()
        await coordinator.shutdown()


async def test_join_refuses_a_coordinator_announcing_another_trainer_key(
    tmp_path: Path, world: dict[str, Any]
) -> None:
    trainer_id = Identity.create(tmp_path / "keys" / "trainer.pem")
    other = Identity.generate()
    port = _free_port()
    coordinator = Coordinator(_config(tmp_path, world, trainer_id, port), seed=0)
    await coordinator.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CODEREPAIR_WORKER_")}
        proc = await asyncio.create_subprocess_exec(
            str(WORKER_BIN),
            "--json-logs",
            "join",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--key",
            str(tmp_path / "keys" / "worker.pem"),
            "--trainer-key",
            other.public_key_hex,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env | {"XDG_CONFIG_HOME": str(tmp_path / "xdg")},
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 1
        errors = [json.loads(line) for line in out.splitlines() if b'"error"' in line]
        assert errors and "wrong trainer key" in errors[-1]["message"]
        assert trainer_id.public_key_hex in errors[-1]["message"]
    finally:
        await coordinator.shutdown()


class _LoadedMachineClient(CoordinatorClient):
    """The worker's real client, with the timing of a loaded machine made certain.

    A lease's answer is handed over only once the test has begun the drain, and a
    release takes 0.5 s before it is sent: the drain then checks its pipeline while a
    release is in flight, which on an idle machine happens only by chance.
    """

    def __init__(self, address: str, identity: Identity, drained: asyncio.Event) -> None:
        super().__init__(address, identity)
        self.granted = asyncio.Event()
        self._drained = drained

    async def lease(self, *args: Any, **kwargs: Any) -> Any:
        answer = await super().lease(*args, **kwargs)
        if answer.HasField("lease"):
            self.granted.set()
            await self._drained.wait()
        return answer

    async def release(self, lease_id: str, reason: str) -> bool:
        await asyncio.sleep(0.5)
        return await super().release(lease_id, reason)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_drain_waits_for_the_release_in_flight(
    tmp_path: Path, world: dict[str, Any]
) -> None:
    """In process: `WorkLoop` with the real client, a real coordinator and a real sandbox.

    A lease granted as the drain begins is released ungenerated; `run` must not return
    (and cancel that call) before the coordinator has the tasks back.
    """
    from coderepair.worker.engines.hf import HFEngine
    from coderepair.worker.loop import LoopConfig, PolicyHolder, WorkLoop
    from coderepair.worker.sandbox import SandboxLimits, select_sandbox
    from coderepair.worker.view import JsonView, WorkerStats
    from coderepair.worker.weights import PolicyWeights, WeightsConfig

    trainer_id = Identity.create(tmp_path / "keys" / "trainer.pem")
    coordinator = Coordinator(_config(tmp_path, world, trainer_id, _free_port()), seed=0)
    await coordinator.start()
    trainer = Trainer(coordinator.address, trainer_id, world)
    drained = asyncio.Event()
    client = _LoadedMachineClient(
        coordinator.address, Identity.create(tmp_path / "keys" / "worker.pem"), drained
    )
    try:
        await trainer.publish(1)
        await client.register("drain-test", "test", common_pb2.WorkerCapabilities(engine="hf"))
        stats = WorkerStats()
        view = JsonView(stats, stream=(tmp_path / "events.jsonl").open("w"))
        engine = HFEngine()
        weights = PolicyWeights(
            WeightsConfig(trainer_key=trainer_id.public_key_hex, cache_dir=tmp_path / "weights")
        )
        policy = PolicyHolder(client, weights, engine, run_id="r1", view=view, stats=stats)
        loop = WorkLoop(
            client=client,
            engine=engine,
            sandbox=select_sandbox(SandboxLimits(), pool_size=1),
            policy=policy,
            config=LoopConfig(run_id="r1", max_tasks=1, heartbeat_s=60, policy_poll_s=60),
            stats=stats,
            view=view,
        )
        running = asyncio.create_task(loop.run())
        await asyncio.wait_for(client.granted.wait(), 30)
        assert _open_leases(coordinator, world["n_tasks"]) == 1
        loop.drain()
        drained.set()
        await asyncio.wait_for(running, 30)
        assert _open_leases(coordinator, world["n_tasks"]) == 0
        assert loop.held_lease_ids == []
    finally:
        await client.close()
        await trainer.close()
        await coordinator.shutdown()
