"""Acceptance: the dashboard of a real `coderepair-coordinator serve` in headless Chromium.

The coordinator runs as the operator runs it: a subprocess started from a TOML file
(SQLite, a [dashboard] table on a free loopback port). Workers register, lease and
submit signed batches over gRPC (one batch names an unknown lease and is refused).
Chromium opens the dashboard; while it is open more batches arrive, and the page must
show them after its own refresh, its SVG plots must have drawn geometry, and a
screenshot is kept (under pytest's tmp dir, copied to $CODEREPAIR_TEST_ARTIFACTS when
set). Prometheus ``/metrics`` must show the submit counters moving with the batches.
SIGTERM then stops the process cleanly, dashboard included.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from chromium_devtools import DevTools, chromium_binary
from coordinator_processes import free_port, start_command, wait_serving, write_toml
from service_support import Clients, Keys, make_config, make_samples, submit_payload

from coderepair.protocol.identity import Identity
from coderepair.v1 import common_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

G = 2
CHARTS = ("chart-rollouts", "chart-outcomes", "chart-reward-time", "chart-reward-version")


def _metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of the Prometheus text (0.0 when absent)."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, flags=re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


async def _submit_round(clients: Clients, worker: Identity) -> int:
    """One lease and its accepted batch; returns the rollouts submitted."""
    lease = (await clients.lease(worker, max_tasks=2)).lease
    answer = await clients.submit(worker, submit_payload(lease, make_samples(lease)))
    assert answer.accepted, answer.rejection.message
    return len(lease.tasks) * G


async def _until(check: Any, what: str, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show {what} within {timeout_s} s")
        await asyncio.sleep(0.25)


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"serve ignored SIGTERM: {log.read_text()[-2000:]}") from None
    assert code == 0, log.read_text()[-3000:]


async def test_served_dashboard_shows_live_figures_and_metrics(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    binary = chromium_binary()
    grpc_port, http_port = free_port(), free_port()
    config = make_config(tmp_path, assets, keys, server={"listen": f"127.0.0.1:{grpc_port}"})
    document = config.model_dump(mode="json", exclude_none=True)
    document["dashboard"] = {
        "port": http_port,
        "refresh_s": 1.0,
        "cache_s": 0.0,
        "window": {"history_s": 120, "bucket_s": 5},
    }
    toml = write_toml(tmp_path / "coordinator.toml", document)
    log = tmp_path / "serve.log"
    process = start_command(["serve", "--config", str(toml), "--log-level", "WARNING"], log)
    address, dashboard = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    clients = Clients(address)
    try:
        await wait_serving(address, process, log)
        alice, bob = keys.workers[0], keys.workers[1]
        assert (await clients.publish(keys.trainer, assets["shards"])).accepted
        for worker in (alice, bob):
            await clients.register(worker)
        lease = (await clients.lease(alice, max_tasks=2)).lease
        samples = make_samples(lease)
        answer = await clients.submit(alice, submit_payload(lease, samples))
        assert answer.accepted, answer.rejection.message
        rollouts = len(samples)
        # A batch for a lease that does not exist: refused, stored, counted by reason.
        stray = submit_payload(lease, samples)
        stray.lease_id = "no-such-lease"
        refused = await clients.submit(alice, stray)
        assert refused.rejection.reason == common_pb2.REJECTION_REASON_UNKNOWN_LEASE
        before = await asyncio.to_thread(_get, dashboard + "/metrics")
        assert _metric(before, "coderepair_batches_accepted_total") == 1.0
        assert _metric(before, "coderepair_batches_rejected_total", 'reason="UNKNOWN_LEASE"') == 1.0
        assert _metric(before, "coderepair_recent_batches", 'outcome="ACCEPTED"') == 1.0

        browser = await asyncio.to_thread(
            DevTools, binary, tmp_path / "profile", tmp_path / "chromium.log"
        )
        try:
            target = await asyncio.to_thread(
                browser.call, "Target.createTarget", {"url": dashboard + "/"}
            )
            attached = await asyncio.to_thread(
                browser.call,
                "Target.attachToTarget",
                {"targetId": target["targetId"], "flatten": True},
            )
            session = attached["sessionId"]

            def text_of(element_id: str) -> Any:
                return browser.evaluate(
                    session,
                    f"(document.getElementById({json.dumps(element_id)}) || {{}}).textContent",
                )

            await _until(lambda: text_of("stat-rollouts-total") == str(rollouts), "rollouts")
            assert text_of("stat-workers-online") == "2"
            assert text_of("stat-policy") == "1"

            # New batches while the page is open: its refresh must bring them in.
            for worker in (bob, alice, bob):
                rollouts += await _submit_round(clients, worker)
            await _until(
                lambda: text_of("stat-rollouts-total") == str(rollouts), f"{rollouts} rollouts"
            )
            assert browser.evaluate(session, "Number(document.body.dataset.refreshes)") >= 1
            assert text_of("status") == "live"
            for chart in CHARTS:
                drawn = browser.evaluate(
                    session,
                    "(() => { const paths = "
                    f"[...document.querySelectorAll('#{chart} path.series')];"
                    " return {d: paths.map(p => p.getAttribute('d')),"
                    " length: paths.reduce((sum, p) => sum + p.getTotalLength(), 0),"
                    f" dots: document.querySelectorAll('#{chart} circle').length}}; }})()",
                )
                assert drawn["d"] and all(drawn["d"]), (chart, drawn)
                assert drawn["length"] > 0 or drawn["dots"] > 0, (chart, drawn)
            legend = browser.evaluate(
                session, "document.querySelector('#panels ul.legend').textContent"
            )
            assert "ACCEPTED" in legend and "UNKNOWN_LEASE" in legend
            shot = await asyncio.to_thread(
                browser.call,
                "Page.captureScreenshot",
                {"format": "png", "captureBeyondViewport": True},
                session,
            )
        finally:
            await asyncio.to_thread(browser.close)

        after = await asyncio.to_thread(_get, dashboard + "/metrics")
        assert _metric(after, "coderepair_batches_accepted_total") == 4.0
        assert _metric(after, "coderepair_rollouts_ingested_total") == float(rollouts)
        assert _metric(after, "coderepair_submit_seconds_count", 'outcome="accepted"') == 4.0
        assert _metric(after, "coderepair_recent_batches", 'outcome="ACCEPTED"') == 4.0
        assert _metric(after, "coderepair_leases_issued_total") == 4.0
    finally:
        await clients.close()
        if process.poll() is None:
            await asyncio.to_thread(_stop, process, log)
    assert process.returncode == 0, log.read_text()[-3000:]

    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    artifact = tmp_path / "served-dashboard.png"
    artifact.write_bytes(png)
    print(f"dashboard screenshot: {artifact}")
    if target_dir := os.environ.get("CODEREPAIR_TEST_ARTIFACTS"):
        Path(target_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(artifact, Path(target_dir) / "served-dashboard.png")
