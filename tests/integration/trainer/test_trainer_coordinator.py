"""The trainer against a real coordinator on loopback (in-process, real gRPC, SQLite).

Rollouts are submitted through the worker API (the coordinator test helpers make
structurally valid samples; their rewards vary within a group so GRPO has a signal),
streamed by `CoordinatorSource`, trained on by the tiny model; versions are published
(full and delta) to a local object store and announced, and GetPolicy returns them. A run
stopped after 2 steps and resumed consumes exactly the rows of an uninterrupted run.
Under back-pressure, rows the trainer drops while it waits free the room for new leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from safetensors.torch import load_file

from coderepair.coordinator.service.server import Coordinator
from coderepair.coordinator.tasks.repo import load_fixtures
from coderepair.protocol.identity import Identity
from coderepair.protocol.task import TaskSet, write_taskset
from coderepair.trainer.announce import PolicyAnnouncer
from coderepair.trainer.config import TrainerConfig
from coderepair.trainer.loop import Trainer
from coderepair.trainer.publish import tokenizer_sha256
from coderepair.trainer.run import PublishHook, make_publisher, make_sink, run_training
from coderepair.trainer.stream import CoordinatorSource
from coderepair.v1 import admin_pb2, worker_pb2
from coderepair.worker.models import build_tiny_model

HERE = Path(__file__).resolve().parent


def _helpers() -> ModuleType:
    """The coordinator service tests' helpers (same world: config, keys, samples)."""
    path = HERE.parent / "coordinator" / "service_support.py"
    spec = importlib.util.spec_from_file_location("coordinator_service_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


H = _helpers()


def _steps(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["cursor"] for line in lines]


def _weights(output_dir: Path, step: int) -> dict[str, Any]:
    return load_file(output_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


@dataclass
class _Network:
    coordinator: Coordinator
    clients: Any
    keys: Any
    common: dict[str, Any]
    """Trainer config fields every test shares."""
    run_cfg: TrainerConfig
    """A publishing trainer of 2 steps (version 1, the base model, is published)."""


@contextlib.asynccontextmanager
async def _network(tmp_path: Path, run: dict[str, Any] | None = None) -> AsyncIterator[_Network]:
    tokenizer = H.build_byte_tokenizer(tmp_path / "tokenizer")
    model_dir = build_tiny_model(tmp_path / "tiny", tokenizer_dir=tokenizer)
    tasks_path = tmp_path / "tasks.jsonl"
    write_taskset(
        TaskSet.from_tasks(load_fixtures(), builder_version="test", split_rule="fixtures"),
        tasks_path,
    )
    assets = {"tokenizer": model_dir, "tasks": tasks_path}
    key_file = tmp_path / "keys" / "trainer.pem"
    keys = H.Keys(
        trainer=Identity.create(key_file),
        admin=Identity.create(tmp_path / "keys" / "admin.pem"),
        workers=[Identity.create(tmp_path / "keys" / "worker.pem")],
    )
    config = H.make_config(
        tmp_path,
        assets,
        keys,
        run={"tokenizer_sha256": tokenizer_sha256(model_dir), "base_model_id": "tiny"}
        | (run or {}),
    )
    # No dashboard: other tests on this machine may hold its default port.
    dashboard = config.dashboard.model_copy(update={"enabled": False})
    config = config.model_copy(update={"dashboard": dashboard})
    coordinator = Coordinator(config, seed=0)
    await coordinator.start()
    clients = H.Clients(coordinator.address)
    try:
        common: dict[str, Any] = {
            "model": str(model_dir),
            "prompts_per_step": 2,
            "group_size": 2,
            "max_staleness": 3,
            "learning_rate": 1e-3,
            "checkpoint_every": 1,
            "key_file": key_file,
            "coordinator": {"address": coordinator.address, "run_id": "r1"},
            "metrics": {"backend": "jsonl"},
        }
        store = {"kind": "local", "path": str(tmp_path / "objects")}
        run_cfg = TrainerConfig.model_validate(
            {
                **common,
                "max_steps": 2,
                "output_dir": tmp_path / "run",
                "store": store,
                "publish": {"base_model": "tiny", "full_every": 10},
            }
        )

        # Version 1, the base model, as `run` publishes it before its first step.
        # (Blocking gRPC clients run in threads: the coordinator serves on this loop.)
        def publish_base() -> None:
            assert run_cfg.store is not None
            sink, url_for = make_sink(run_cfg.store)
            announcer = PolicyAnnouncer(coordinator.address, "r1", keys.trainer)
            publisher = make_publisher(run_cfg, keys.trainer, sink)
            PublishHook(run_cfg, publisher, url_for, announcer).publish_base()
            announcer.close()

        await asyncio.to_thread(publish_base)
        yield _Network(coordinator, clients, keys, common, run_cfg)
    finally:
        await clients.close()
        await coordinator.shutdown()


async def _submit_lease(
    clients: Any, worker: Identity, rewards: Callable[[int], float], lease: Any = None
) -> None:
    """Submit G=2 samples of each of ``lease``'s tasks (else of a new lease of 2 tasks),
    sample i rewarded ``rewards(i)``."""
    lease = lease or (await clients.lease(worker, max_tasks=2)).lease
    assert lease.policy_version == 1
    samples = H.make_samples(lease)
    for sample in samples:
        sample.reward = rewards(sample.sample_index)
        sample.reward_components.clear()
        sample.reward_components["fail"] = sample.reward
    answer = await clients.submit(worker, H.submit_payload(lease, samples))
    assert answer.accepted, answer.rejection.message


@pytest.mark.slow
async def test_stream_train_publish_resume(tmp_path: Path) -> None:
    async with _network(tmp_path) as net:
        coordinator, clients, keys = net.coordinator, net.clients, net.keys
        common, run_cfg = net.common, net.run_cfg
        # A worker submits 3 leases x 2 tasks x G=2 samples; rewards differ within groups.
        worker = keys.workers[0]
        await clients.register(worker)
        for _ in range(3):
            await _submit_lease(clients, worker, lambda i: 0.5 * i)

        # Stopped after 2 steps, then resumed to 3.
        first, hook1 = await asyncio.to_thread(
            run_training, run_cfg, resume=False, follow=False, say=lambda _: None
        )
        assert first.steps == 2
        assert hook1 is not None
        assert [(p.version, p.kind) for p in hook1.published] == [(2, "full"), (3, "delta")]
        stats = await clients.admin.GetStats(
            admin_pb2.GetStatsRequest(
                envelope=H.signed(keys.admin, H.A + "GetStats", admin_pb2.GetStatsPayload())
            )
        )
        assert stats.acked_cursor == first.cursor > 0 and stats.latest_policy_version == 3
        resumed_cfg = run_cfg.model_copy(update={"max_steps": 3})
        second, hook2 = await asyncio.to_thread(
            run_training, resumed_cfg, resume=True, follow=False, say=lambda _: None
        )
        assert second.steps == 3 and second.cursor == 12
        assert hook2 is not None
        assert [(p.version, p.kind) for p in hook2.published] == [(4, "full")]

        policy = await clients.worker.GetPolicy(worker_pb2.GetPolicyRequest(run_id="r1"))
        assert policy.chain[-1].version == 4
        deltas = await clients.worker.GetPolicy(
            worker_pb2.GetPolicyRequest(run_id="r1", version=3, have_version=2)
        )
        assert [p.version for p in deltas.chain] == [3]
        for info in policy.chain:
            for shard in info.shards:
                assert Path(shard.urls[0].removeprefix("file://")).is_file()

        # The same three steps uninterrupted (no publishing) consume the same rows.
        ref_cfg = TrainerConfig.model_validate(
            {**common, "max_steps": 3, "output_dir": tmp_path / "reference"}
        )
        source = CoordinatorSource(coordinator.address, "r1", keys.trainer, follow=False)
        reference = await asyncio.to_thread(Trainer(ref_cfg, source).run)
        assert reference.cursor == second.cursor
        assert _steps(tmp_path / "run") == _steps(tmp_path / "reference")
        ours, theirs = _weights(tmp_path / "run", 3), _weights(tmp_path / "reference", 3)
        assert ours.keys() == theirs.keys()
        assert all(ours[k].equal(theirs[k]) for k in ours)


@pytest.mark.slow
async def test_dropped_rows_free_the_back_pressure_room(tmp_path: Path) -> None:
    """The demo's stall, end to end: room for 2 groups ahead, and the first lease's two
    groups have all-equal rewards. The waiting trainer acks them as consumed (its
    checkpoint still at 0), the coordinator leases again, and the step gets made."""
    async with _network(tmp_path, run={"max_rollouts_ahead": 4}) as net:
        clients, worker = net.clients, net.keys.workers[0]
        await clients.register(worker)
        await _submit_lease(clients, worker, lambda i: 1.0)
        assert not (await clients.lease(worker)).HasField("lease"), "the limit is full"
        # A failing test ends the coordinator: the trainer then gives up within seconds.
        coordinator = net.run_cfg.coordinator
        assert coordinator is not None
        cfg = net.run_cfg.model_copy(
            update={
                "max_steps": 1,
                "coordinator": coordinator.model_copy(update={"reconnect_max_s": 5.0}),
            }
        )
        training = asyncio.create_task(
            asyncio.to_thread(run_training, cfg, resume=False, follow=True, say=lambda _: None)
        )
        deadline = time.monotonic() + 60
        while not (answer := await clients.lease(worker, max_tasks=2)).HasField("lease"):
            assert not training.done(), training
            assert time.monotonic() < deadline, "no lease: the dropped rows still count"
            await asyncio.sleep(0.2)
        await _submit_lease(clients, worker, lambda i: 0.5 * i, answer.lease)
        result, _hook = await asyncio.wait_for(training, timeout=120)
        assert result.steps == 1 and result.cursor == 8
        stats = await clients.admin.GetStats(
            admin_pb2.GetStatsRequest(
                envelope=H.signed(net.keys.admin, H.A + "GetStats", admin_pb2.GetStatsPayload())
            )
        )
        assert stats.acked_cursor == 8
