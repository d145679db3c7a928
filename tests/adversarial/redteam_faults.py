"""Fault injection and load for the red-team runs: nothing acknowledged may be lost.

Each scenario starts its own coordinator process (no model auditor: the workers are
``synthetic`` agents whose samples need no model, and the consistency auditor re-derives
their rewards), runs worker processes that journal every acknowledged batch (fsynced
before the next call), injects its fault, and compares the journals with the database:

* `coordinator_kill`: kill -9 of the coordinator at random moments, restarted at once;
* `worker_kill`: kill -9 of a worker mid-run (its acknowledged batches must stay);
* `trainer_kill`: kill -9 of the trainer (the trainer's `CoordinatorSource` in a process
  that records each cursor before acking it) at random moments, restarted from the
  cursor it recorded: every row is consumed, none twice;
* `proxy`: a TCP proxy between workers and coordinator that delays traffic and cuts
  connections mid-call;
* `full_disk`: the object store on a small tmpfs that fills up, then is grown.

`load` runs many keys in a few agent processes, paced, and gives errors and latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import subprocess
import time
from pathlib import Path
from typing import Any

from redteam_support import (
    Agent,
    CoordinatorProcess,
    World,
    events,
    lost_acknowledged,
    read_store,
    spawn,
    wait_agents,
)


class ChaosProxy:
    """Forwards TCP to ``target``; delays chunks and aborts connections at random."""

    def __init__(self, target: str, *, delay_s: float, drop_after_s: float, seed: int) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.delay_s = delay_s
        self.drop_after_s = drop_after_s
        self.rng = random.Random(seed)
        self.connections = 0
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self.address

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        lifetime = self.rng.expovariate(1 / self.drop_after_s)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self.rng.random() < 0.3:
                    await asyncio.sleep(self.rng.uniform(0, self.delay_s))
                dst.write(data)
                await dst.drain()

        pumps = [
            asyncio.create_task(pump(reader, up_writer)),
            asyncio.create_task(pump(up_reader, writer)),
        ]
        _done, pending = await asyncio.wait(
            pumps, timeout=lifetime, return_when=asyncio.FIRST_COMPLETED
        )
        if len(pending) == 2:
            self.dropped += 1  # cut mid-connection: both sides see a reset
        for task in pumps:
            task.cancel()
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.transport.abort()


def _synthetic(
    world: World, address: str, prefix: str, n: int, seconds: float, **extra: Any
) -> list[Agent]:
    return [
        spawn(world, address, f"{prefix}{i}", "synthetic", batches=10_000, seconds=seconds, **extra)
        for i in range(n)
    ]


def _figures(agents: list[Agent], coordinator: CoordinatorProcess, **extra: Any) -> dict[str, Any]:
    stored = read_store(coordinator.database_url)
    evts = events(agents)
    out = lost_acknowledged(evts, stored)
    out["refusals"] = sum(e["event"] in ("refused", "unavailable") for e in evts)
    return {**out, **extra}


async def coordinator_kill(
    world: World, *, workers: int = 3, seconds: float = 20.0, kills: int = 2, seed: int = 0
) -> dict[str, Any]:
    rng = random.Random(seed)
    coordinator = CoordinatorProcess(world, "fault-coordinator", model_audits=False)
    await coordinator.start()
    try:
        await coordinator.publish()
        agents = _synthetic(world, coordinator.address, "ck", workers, seconds)
        started = time.monotonic()
        moments = sorted(rng.uniform(2.0, seconds * 0.7) for _ in range(kills))
        for moment in moments:
            await asyncio.sleep(max(0.0, started + moment - time.monotonic()))
            coordinator.kill9()
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            await coordinator.start()
        stragglers = await wait_agents(agents, seconds + 150, strict=False)
        return _figures(agents, coordinator, kills=kills, stragglers=stragglers)
    finally:
        coordinator.stop()


async def worker_kill(
    world: World, *, workers: int = 3, seconds: float = 12.0, seed: int = 1
) -> dict[str, Any]:
    rng = random.Random(seed)
    coordinator = CoordinatorProcess(world, "fault-worker", model_audits=False, lease_ttl_s=3.0)
    await coordinator.start()
    try:
        await coordinator.publish()
        agents = _synthetic(world, coordinator.address, "wk", workers, seconds)
        await asyncio.sleep(rng.uniform(2.0, seconds * 0.6))
        victim = agents[0]
        victim.kill9()
        stragglers = await wait_agents(agents[1:], seconds + 60, strict=False)
        return _figures(agents, coordinator, killed=victim.name, stragglers=stragglers)
    finally:
        coordinator.stop()


async def trainer_kill(
    world: World, *, workers: int = 2, seconds: float = 12.0, kills: int = 2, seed: int = 2
) -> dict[str, Any]:
    rng = random.Random(seed)
    coordinator = CoordinatorProcess(world, "fault-trainer", model_audits=False)
    await coordinator.start()
    try:
        await coordinator.publish()
        agents = _synthetic(world, coordinator.address, "tk", workers, seconds)
        journal = world.root / "agents" / "trainer.jsonl"

        def trainer(run_s: float) -> Agent:
            return spawn(
                world,
                coordinator.address,
                "trainer",
                "trainer",
                role="trainer",
                seconds=run_s,
                key_paths=[world.root / "keys" / "trainer.pem"],
            )

        started = time.monotonic()
        current = trainer(seconds + 30)
        for moment in sorted(rng.uniform(2.0, seconds * 0.8) for _ in range(kills)):
            await asyncio.sleep(max(0.0, started + moment - time.monotonic()))
            current.kill9()
            current = trainer(seconds + 30)
        await wait_agents(agents, seconds + 60)
        # Let the last trainer catch up with the head, then stop it.
        stored = read_store(coordinator.database_url)
        total = sum(stored.rows.values())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            consumed = _cursors(journal)
            if len(set(consumed)) >= total:
                break
            await asyncio.sleep(0.3)
        current.kill9()
        consumed = _cursors(journal)
        figures = _figures(agents, coordinator, kills=kills)
        figures |= {
            "rows_stored": total,
            "rows_consumed": len(set(consumed)),
            "rows_skipped": len(set(range(1, total + 1)) - set(consumed)),
            "rows_consumed_twice": len(consumed) - len(set(consumed)),
        }
        return figures
    finally:
        coordinator.stop()


def _cursors(journal: Path) -> list[int]:
    import json

    if not journal.exists():
        return []
    return [json.loads(line)["cursor"] for line in journal.read_text().splitlines() if line]


async def proxy(
    world: World, *, workers: int = 3, seconds: float = 12.0, seed: int = 3
) -> dict[str, Any]:
    coordinator = CoordinatorProcess(world, "fault-proxy", model_audits=False)
    await coordinator.start()
    chaos = ChaosProxy(coordinator.address, delay_s=0.25, drop_after_s=4.0, seed=seed)
    try:
        await coordinator.publish()
        address = await chaos.start()
        agents = _synthetic(world, address, "px", workers, seconds)
        await wait_agents(agents, seconds + 150)
        return _figures(
            agents, coordinator, connections=chaos.connections, connections_cut=chaos.dropped
        )
    finally:
        await chaos.close()
        coordinator.stop()


async def full_disk(
    world: World, *, workers: int = 2, seconds: float = 12.0, size_kib: int = 256
) -> dict[str, Any]:
    objects = world.root / "full-disk-objects"
    objects.mkdir(exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(objects)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode:
        return {"skipped": f"cannot mount a small tmpfs here: {mounted.stderr.strip()}"}
    coordinator = CoordinatorProcess(world, "fault-disk", model_audits=False, objects=objects)
    try:
        await coordinator.start()
        await coordinator.publish()
        agents = _synthetic(world, coordinator.address, "fd", workers, seconds, retry_s=20.0)
        started = time.monotonic()
        full_seen = False
        while time.monotonic() - started < seconds * 0.8:
            await asyncio.sleep(0.5)
            full_seen = any(e["event"] != "ack" for e in events(agents))
            if full_seen:
                break
        grow = subprocess.run(
            ["mount", "-o", "remount,size=64m", str(objects)], capture_output=True, check=False
        )
        await wait_agents(agents, seconds + 150)
        figures = _figures(
            agents, coordinator, store_filled=full_seen, store_grown=grow.returncode == 0
        )
        figures["unreadable_objects"] = _unreadable(coordinator, agents)
        return figures
    finally:
        coordinator.stop()
        subprocess.run(["umount", "-l", str(objects)], capture_output=True, check=False)


def _unreadable(coordinator: CoordinatorProcess, agents: list[Agent]) -> int:
    """Acknowledged batches whose Parquet object is missing or does not parse."""
    from coderepair.protocol.rollout import from_parquet_bytes

    stored = read_store(coordinator.database_url)
    root = Path(coordinator.config.object_store.path or "")
    bad = 0
    for e in events(agents):
        if e["event"] != "ack":
            continue
        key = stored.batches.get(e["batch_id"], {}).get("object_key")
        try:
            records = from_parquet_bytes((root / str(key)).read_bytes())
            bad += len(records) != e["samples"]
        except Exception:  # missing, truncated, unparsable
            bad += 1
    return bad


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def load(
    world: World,
    *,
    workers: int = 200,
    seconds: float = 600.0,
    processes: int = 4,
    pause_s: float = 2.0,
) -> dict[str, Any]:
    """``workers`` keys in ``processes`` agent processes, each leasing and submitting
    back to back with ``pause_s`` between batches (as if generating), for ``seconds``."""
    coordinator = CoordinatorProcess(world, "load", model_audits=False)
    await coordinator.start()
    try:
        await coordinator.publish()
        per = -(-workers // processes)
        agents = [
            spawn(
                world,
                coordinator.address,
                f"load{p}",
                "synthetic",
                n_keys=min(per, workers - p * per),
                batches=10_000,
                seconds=seconds,
                pause_s=pause_s,
                retry_s=30.0,
            )
            for p in range(processes)
            if workers - p * per > 0
        ]
        started = time.monotonic()
        await wait_agents(agents, seconds + 120)
        wall = time.monotonic() - started
        evts = events(agents)
        latencies = [e["ms"] for e in evts if "ms" in e]
        stored = read_store(coordinator.database_url)
        figures = lost_acknowledged(evts, stored)
        return {
            **figures,
            "workers": workers,
            "seconds": round(wall, 1),
            "batches_per_s": round(figures["acknowledged_batches"] / wall, 1),
            "errors": sum(e["event"] in ("refused", "unavailable") for e in evts),
            "rejected": sum(e["event"] == "rejected" for e in evts),
            "p50_ms": _percentile(latencies, 0.50),
            "p99_ms": _percentile(latencies, 0.99),
        }
    finally:
        coordinator.stop()
