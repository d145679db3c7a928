"""The dashboard served over loopback by a running `DashboardServer`, on SQLite and on a
real PostgreSQL: /api/stats and /metrics follow rows written while it runs, and bad
requests get clear HTTP errors."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from coderepair.coordinator.dashboard.config import DashboardConfig
from coderepair.coordinator.dashboard.http import DashboardServer, DashboardStateError
from coderepair.coordinator.dashboard.metrics import CoordinatorMetrics
from coderepair.coordinator.storage import batches, repo
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.migrate import upgrade_to_head
from coderepair.coordinator.storage.models import Worker

G = 4


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def dashboard_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database with run "r1": SQLite, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    db = Database.open(url)
    upgrade_to_head(db.engine)
    repo.ensure_run(
        db,
        repo.RunSpec("r1", b"\x01" * 32, "tiny", "a" * 64, "{}", "b" * 64, {}, G, 2),
        _now(),
    )
    yield db
    db.close()


def _now() -> int:
    import time

    return time.time_ns() // 1_000_000


def _worker(db: Database, name: str, key: int) -> Worker:
    return repo.upsert_worker(
        db,
        bytes([key]) * 32,
        display_name=name,
        client_version="1",
        capabilities={},
        now_ms=_now(),
    )


def _accept(db: Database, worker: Worker, key: str, reward: float) -> None:
    now = _now()
    lease = repo.create_lease(
        db,
        run_id="r1",
        worker_id=worker.worker_id,
        policy_version=0,
        tasks=[repo.LeaseTask(key, list(range(G)))],
        issued_ms=now,
        deadline_ms=now + 60_000,
    )
    samples = [
        batches.SampleIndex(i, key, i, batches.completion_digest(key, [i]), 3, reward)
        for i in range(G)
    ]
    draft = batches.BatchDraft(
        worker.worker_id,
        key,
        key.ljust(64, "0"),
        "r1",
        lease.lease_id,
        0,
        f"{key}.parquet",
        samples,
    )
    batches.record_batch(db, draft, now)


def _reject(db: Database, worker: Worker, key: str, reason: str) -> None:
    draft = batches.BatchDraft(
        worker.worker_id,
        key,
        key.ljust(64, "0"),
        None,
        None,
        0,
        rejection=batches.Rejection(reason, "no"),
    )
    batches.record_batch(db, draft, _now())


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def _fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_get, url, method)


def _metric(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return float(sample.value)
    return None


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


async def test_stats_and_metrics_follow_the_database_over_http(dashboard_db: Database) -> None:
    db = dashboard_db
    alice = await asyncio.to_thread(_worker, db, "alice", 2)
    await asyncio.to_thread(_accept, db, alice, "first", 1.0)
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    config = DashboardConfig(port=0, cache_s=0)
    async with DashboardServer(config, db, registry=registry) as server:
        status, headers, body = await _fetch(server.url + "/api/stats")
        assert status == 200 and headers["Content-Type"] == "application/json"
        stats = json.loads(body)
        assert stats["run_id"] == "r1" and stats["runs"][0]["head_cursor"] == G
        assert stats["workers"]["online"] == 1

        # Rows written while the server runs show up in the next answer.
        bob = await asyncio.to_thread(_worker, db, "bob", 3)
        await asyncio.to_thread(_accept, db, bob, "second", 0.0)
        await asyncio.to_thread(_reject, db, bob, "third", "DUPLICATE")
        metrics.record_rejected("DUPLICATE", seconds=0.003)
        stats = json.loads((await _fetch(server.url + "/api/stats?run=r1"))[2])
        assert stats["runs"][0]["head_cursor"] == 2 * G
        assert stats["workers"]["online"] == 2
        assert stats["outcome_totals"] == {"ACCEPTED": 2, "DUPLICATE": 1}
        assert stats["reward_mean_recent"] == pytest.approx(0.5)

        status, headers, body = await _fetch(server.url + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        text = body.decode()
        assert _metric(text, "coderepair_run_head_cursor", {"run": "r1"}) == 2 * G
        assert _metric(text, "coderepair_workers_online") == 2
        assert _metric(text, "coderepair_stats_up") == 1
        assert _metric(text, "coderepair_batches_rejected_total", {"reason": "DUPLICATE"}) == 1

        status, headers, body = await _fetch(server.url + "/")
        assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"]
        assert b'id="chart-rollouts"' in body and b"bob" in body
        status, headers, body = await _fetch(server.url + "/", "HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
        assert (await _fetch(server.url + "/healthz"))[:1] == (200,)
        assert (await _fetch(server.url + "/static/dashboard.js"))[0] == 200
        assert (await _fetch(server.url + "/api/stats?run=nope"))[0] == 404
        assert (await _fetch(server.url + "/nowhere"))[0] == 404
        assert (await _fetch(server.url + "/", "POST"))[0] == 405
        answer = await _raw(server.port, b"GET / HTTP/1.1\r\nbroken header\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        answer = await _raw(server.port, b"\x00\x01garbage\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        port = server.port
    # Shut down: the port is closed and the database collector is gone from the registry.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    assert registry.get_sample_value("coderepair_stats_up") is None
    assert registry.get_sample_value("coderepair_leases_issued_total") == 0


async def test_lifecycle_errors_are_typed(tmp_path: Path) -> None:
    db = Database.open(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade_to_head(db.engine)
    server = DashboardServer(DashboardConfig(port=0), db, registry=CollectorRegistry())
    with pytest.raises(DashboardStateError, match="not running"):
        _ = server.port
    await server.start()
    with pytest.raises(DashboardStateError, match="already running"):
        await server.start()
    # A second server on the same port cannot bind, and says how to fix it.
    taken = DashboardServer(DashboardConfig(port=server.port), db, registry=CollectorRegistry())
    with pytest.raises(DashboardStateError, match="port 0 for any free one"):
        await taken.start()
    await server.shutdown()
    await server.shutdown()  # idempotent
    with pytest.raises(DashboardStateError, match="build a new one"):
        await server.start()
    db.close()


async def test_slow_clients_are_cut_off_and_shutdown_ends_open_connections(
    tmp_path: Path,
) -> None:
    db = Database.open(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade_to_head(db.engine)
    config = DashboardConfig(port=0, request_timeout_s=0.5)
    async with DashboardServer(config, db, registry=CollectorRegistry()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\n")  # never finishes its head
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        assert answer.startswith(b"HTTP/1.1 408 ")
        writer.close()
        # A connection still open at shutdown does not hold it up.
        idle = socket.create_connection(("127.0.0.1", server.port))
    idle.close()
    db.close()
