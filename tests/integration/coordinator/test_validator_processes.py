"""`coderepair-coordinator validator`: separate audit processes on a shared PostgreSQL.

A coordinator with ``audit.in_process = false`` accepts batches from three workers (all
sampled for audit: new workers are always audited), leaving a backlog of audit jobs.
Two validator processes are started from the same TOML file and drain it; then SIGTERM
stops both gracefully (exit status 0). Every job was claimed exactly once (``attempts
== 1``) by one of the two, and every verdict is recorded: no job was done twice.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest
from coordinator_processes import start_command, write_toml
from service_support import Clients, Keys, make_config, make_samples, submit_payload

from coderepair.coordinator.service.server import Coordinator
from coderepair.coordinator.storage import audits
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.models import AuditState

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROUNDS = 4


async def _make_backlog(config: object, keys: Keys, shards: Path) -> int:
    submitted = 0
    async with Coordinator(config, seed=0) as coordinator:  # type: ignore[arg-type]
        clients = Clients(coordinator.address)
        try:
            assert (await clients.publish(keys.trainer, shards)).accepted
            for worker in keys.workers:
                await clients.register(worker)
            for _ in range(ROUNDS):
                for worker in keys.workers:
                    lease = (await clients.lease(worker, max_tasks=2)).lease
                    answer = await clients.submit(
                        worker, submit_payload(lease, make_samples(lease))
                    )
                    assert answer.accepted and answer.audit_pending, answer.rejection.message
                    submitted += 1
        finally:
            await clients.close()
    return submitted


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"validator ignored SIGTERM: {log.read_text()[-2000:]}") from None
    assert code == 0, log.read_text()[-3000:]


async def test_two_validators_drain_the_backlog_without_doing_a_job_twice(
    tmp_path: Path, assets: dict[str, Path], keys: Keys, postgres_url: str
) -> None:
    config = make_config(
        tmp_path,
        assets,
        keys,
        database_url=postgres_url,
        audit={"in_process": False, "auditor": "consistency", "window_s": 600.0, "poll_s": 0.1},
        server={"db_threads": 2},
    )
    config = config.model_copy(
        update={"dashboard": config.dashboard.model_copy(update={"port": 0})}
    )
    batches = await _make_backlog(config, keys, assets["shards"])
    db = Database.open(postgres_url)
    try:
        pending = audits.list_audit_jobs(db, state=AuditState.PENDING, limit=1000)
        assert len(pending) == batches == ROUNDS * len(keys.workers)

        toml = write_toml(
            tmp_path / "coordinator.toml", config.model_dump(mode="json", exclude_none=True)
        )
        logs = [tmp_path / "validator-a.log", tmp_path / "validator-b.log"]
        processes = [
            start_command(
                ["validator", "--config", str(toml), "--id", name, "--log-level", "INFO"], log
            )
            for name, log in zip(("validator-a", "validator-b"), logs, strict=True)
        ]
        try:
            deadline = time.monotonic() + 120
            while True:
                jobs = audits.list_audit_jobs(db, limit=1000)
                # Both up (their SIGTERM handlers installed: one may drain the whole
                # backlog while the other still imports, and a SIGTERM then kills it).
                started = all(
                    log.is_file() and " auditing (" in log.read_text(errors="replace")
                    for log in logs
                )
                if started and all(j.state is AuditState.PASSED for j in jobs):
                    break
                for process, log in zip(processes, logs, strict=True):
                    assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, [(j.job_id, j.state) for j in jobs]
                await asyncio.sleep(0.2)
        finally:
            for process, log in zip(processes, logs, strict=True):
                await asyncio.to_thread(_stop, process, log)

        jobs = audits.list_audit_jobs(db, limit=1000)
        assert len(jobs) == batches
        assert all(j.attempts == 1 for j in jobs), [(j.job_id, j.attempts) for j in jobs]
        assert {j.claimed_by for j in jobs} <= {"validator-a", "validator-b"}
        shares = {
            name: sum(j.claimed_by == name for j in jobs) for name in ("validator-a", "validator-b")
        }
        print(f"jobs audited per validator: {shares}")
        for log in logs:
            assert "stopped" in log.read_text()
    finally:
        db.close()
