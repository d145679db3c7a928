"""Crash test: `kill -9` the coordinator while 8 workers submit; restart; every batch that
was acknowledged is stored exactly once, and the workers' retries do not duplicate.

The coordinator runs as a real subprocess (`coderepair-coordinator serve`) on SQLite
(synchronous=FULL). Each worker loops lease → submit, and retries a submission with
the same payload and idempotency key (freshly signed) until it gets an answer, across
the crash and the restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from coordinator_processes import write_toml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_support import Clients, Keys, make_config, make_samples, submit_payload
from sqlalchemy import func, select

from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.models import Batch, BatchState, Rollout
from coderepair.protocol.identity import Identity

N_WORKERS = 8


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    script = Path(sys.executable).with_name("coderepair-coordinator")
    return subprocess.Popen(
        [str(script), "serve", "--config", str(config_path), "--log-level", "WARNING"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def _wait_serving(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
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
    raise AssertionError("coordinator did not start serving within 60 s")


@pytest.mark.slow
async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    config = make_config(
        tmp_path,
        assets,
        keys,
        server={"listen": address},
        run={"max_tasks_per_lease": 1, "lease_ttl_s": 600.0},
    )
    config_path = tmp_path / "coordinator.toml"
    write_toml(config_path, config.model_dump(mode="json", exclude_none=True))
    log = tmp_path / "coordinator.log"
    process = _start(config_path, log)
    workers = [Identity.create(tmp_path / "crash-keys" / f"w{i}.pem") for i in range(N_WORKERS)]
    acknowledged: dict[str, tuple[str, str]] = {}  # idempotency key -> (batch id, worker)
    attempts: Counter[str] = Counter()
    interrupted: list[grpc.StatusCode] = []  # calls the crash cut off, of any kind
    last: dict[str, tuple[object, str]] = {}  # worker -> (last acknowledged payload, batch id)
    stop = asyncio.Event()
    try:
        await _wait_serving(address, process, log)
        clients = Clients(address)
        assert (await clients.publish(keys.trainer, assets["shards"])).accepted

        async def retry(call_factory: object) -> object:
            while True:
                try:
                    return await call_factory()  # type: ignore[operator]
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED,
                    ):
                        raise
                    interrupted.append(exc.code())
                    await asyncio.sleep(0.05)

        async def work(identity: Identity, n: int) -> None:
            await retry(lambda: clients.register(identity))
            salt = 0
            while not stop.is_set():
                answer = await retry(lambda: clients.lease(identity))
                if not answer.HasField("lease"):  # type: ignore[attr-defined]
                    await asyncio.sleep(0.05)
                    continue
                lease = answer.lease  # type: ignore[attr-defined]
                salt += 1
                payload = submit_payload(lease, make_samples(lease, salt=f"{n}/{salt}"))

                async def submit(payload: object = payload) -> object:
                    attempts[payload.idempotency_key] += 1  # type: ignore[attr-defined]
                    return await clients.submit(identity, payload)  # type: ignore[arg-type]

                result = await retry(submit)
                assert result.accepted, result.rejection.message  # type: ignore[attr-defined]
                acknowledged[payload.idempotency_key] = (
                    result.batch_id,  # type: ignore[attr-defined]
                    identity.key_id,
                )
                last[identity.key_id] = (payload, result.batch_id)  # type: ignore[attr-defined]

        tasks = [asyncio.create_task(work(w, i)) for i, w in enumerate(workers)]
        # Let them submit for a while, then kill -9 in the middle of it.
        deadline = time.monotonic() + 60
        while len(acknowledged) < 12 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        before_crash = len(acknowledged)
        assert before_crash >= 12, log.read_text()[-3000:]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        await asyncio.sleep(0.5)  # workers keep retrying against a dead port
        process = _start(config_path, log)
        await _wait_serving(address, process, log)
        while len(acknowledged) < before_crash + 12 and time.monotonic() < deadline + 60:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        # Whether the kill cut a submit in flight is timing; a worker whose ack was lost
        # resubmits the same batch, so replay every worker's last one after the restart.
        by_key = {w.key_id: w for w in workers}
        for key_id, (payload, batch_id) in last.items():
            again = await clients.submit(by_key[key_id], payload)  # type: ignore[arg-type]
            assert again.accepted and again.batch_id == batch_id, "a resubmission was stored twice"
        rows = await clients.stream(keys.trainer)
        await clients.close()
    finally:
        stop.set()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    assert len(acknowledged) >= before_crash + 12
    assert interrupted, "the kill should have cut off calls in flight"
    assert last, "no worker had a batch acknowledged"
    # Every acknowledged batch is stored exactly once, with its samples.
    db = Database.open(config.database.url)
    try:
        with db.read() as session:
            stored = {
                b.idempotency_key: b
                for b in session.scalars(select(Batch).where(Batch.state != BatchState.REJECTED))
            }
            per_batch = dict(
                session.execute(
                    select(Rollout.batch_id, func.count()).group_by(Rollout.batch_id)
                ).all()
            )
            cursors = list(session.scalars(select(Rollout.cursor).order_by(Rollout.cursor)))
    finally:
        db.close()
    for key, (batch_id, _worker) in acknowledged.items():
        assert key in stored, f"acknowledged batch {batch_id} was lost"
        assert stored[key].batch_id == batch_id, "a retry created a second batch"
        assert per_batch[batch_id] == 2
    assert cursors == list(range(1, len(cursors) + 1)), "cursors are gap-free and unique"
    streamed = Counter(r.batch_id for r in rows)
    for _key, (batch_id, _worker) in acknowledged.items():
        assert streamed[batch_id] == 2
    assert len(rows) == len(cursors)
