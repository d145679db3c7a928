"""Acceptance: the operators' dashboard in a real headless Chromium (Debian's `chromium`).

A `DashboardServer` serves a real SQLite database on loopback; Chromium opens the page
and is driven over the DevTools protocol through `--remote-debugging-pipe` (JSON
messages separated by NUL bytes on file descriptors 3 and 4: no websocket client, no
browser download). While the page is open the test writes new rows through the storage
layer; the page must show them after its own refresh, its SVG plots must have drawn
geometry, and a screenshot is kept as the test artifact (under pytest's tmp dir; its
path is printed, and it is copied to $CODEREPAIR_TEST_ARTIFACTS when that is set).

Chromium missing: skipped outside CI (install it with `apt-get install chromium`), a
failure under CI=true, where .ci/run installs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from coderepair.coordinator.dashboard.config import DashboardConfig, StatsWindow
from coderepair.coordinator.dashboard.http import DashboardServer
from coderepair.coordinator.storage import batches, repo
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.migrate import upgrade_to_head
from coderepair.coordinator.storage.models import PolicyKind, Worker

pytestmark = pytest.mark.slow

G = 4
CHARTS = ("chart-rollouts", "chart-outcomes", "chart-reward-time", "chart-reward-version")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found is not None:
            return found
    reason = "no chromium binary on PATH: install Debian's package with `apt-get install chromium`"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI needs headless Chromium but {reason}", pytrace=False)
    pytest.skip(reason)


class DevTools:
    """A headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes() -> None:  # runs in the child between fork and exec
            # Move both ends above 4 first, so neither dup2 overwrites the other.
            high_r = os.dup(to_browser_r) if to_browser_r <= 4 else to_browser_r
            high_w = os.dup(from_browser_w) if from_browser_w <= 4 else from_browser_w
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",  # tests may run as root, where the sandbox refuses
                "--disable-gpu",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1300,1500",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            # The pipes are non-inheritable; only their copies on 3 and 4 reach Chromium.
            close_fds=False,
            preexec_fn=wire_pipes,  # noqa: PLW1509 - the only way to place fds 3 and 4
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self._ready = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._ready:
                        self._answers[message["id"]] = message
                        self._ready.notify_all()

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """Send one command and wait for its answer (AssertionError on a protocol error)."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        os.write(self._to_browser, json.dumps(command).encode() + b"\0")
        with self._ready:
            if not self._ready.wait_for(lambda: self._next_id in self._answers, timeout=60):
                raise AssertionError(f"Chromium did not answer {method} within 60 s")
            answer = self._answers.pop(self._next_id)
        assert "error" not in answer, f"{method}: {answer['error']}"
        result: dict[str, Any] = answer["result"]
        return result

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close")
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        self._reader.join(timeout=5)
        os.close(self._from_browser)
        self._log.close()


# ---------------------------------------------------------------- database rows


def _now() -> int:
    return time.time_ns() // 1_000_000


def _worker(db: Database, name: str, key: int) -> Worker:
    return repo.upsert_worker(
        db,
        bytes([key]) * 32,
        display_name=name,
        client_version="0.1.0",
        capabilities={},
        now_ms=_now(),
    )


def _accept(db: Database, worker: Worker, key: str, rewards: list[float], version: int) -> None:
    now = _now()
    lease = repo.create_lease(
        db,
        run_id="r1",
        worker_id=worker.worker_id,
        policy_version=version,
        tasks=[repo.LeaseTask(key, list(range(G)))],
        issued_ms=now,
        deadline_ms=now + 60_000,
    )
    samples = [
        batches.SampleIndex(i, key, i, batches.completion_digest(key, [i]), 7, reward)
        for i, reward in enumerate(rewards)
    ]
    batches.record_batch(
        db,
        batches.BatchDraft(
            worker.worker_id,
            key,
            key.ljust(64, "0"),
            "r1",
            lease.lease_id,
            version,
            f"{key}.parquet",
            samples,
        ),
        now,
    )


def _first_rows(db: Database) -> None:
    repo.ensure_run(
        db,
        repo.RunSpec("r1", b"\x01" * 32, "tiny", "a" * 64, "{}", "b" * 64, {}, G, 2),
        _now(),
    )
    _accept(db, _worker(db, "alice", 2), "a1", [0.0, 0.0, 1.0, 0.0], 0)


def _new_rows(db: Database) -> None:
    alice, bob = _worker(db, "alice", 2), _worker(db, "bob <b>", 3)
    repo.publish_policy(
        db,
        repo.PolicyDraft("r1", 1, None, PolicyKind.FULL, b"{}", [], G, 1, {"loss": 0.7}),
        _now(),
    )
    _accept(db, alice, "a2", [1.0, 0.0, 1.0, 0.0], 1)
    _accept(db, bob, "b1", [1.0, 1.0, 1.0, 0.0], 1)
    batches.record_batch(
        db,
        batches.BatchDraft(
            bob.worker_id,
            "b2",
            "b2".ljust(64, "0"),
            None,
            None,
            0,
            rejection=batches.Rejection("UNKNOWN_LEASE", "no such lease"),
        ),
        _now(),
    )


# ---------------------------------------------------------------- the test


async def _until(check: Any, what: str, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show {what} within {timeout_s} s")
        await asyncio.sleep(0.25)


async def test_dashboard_shows_live_figures_and_renders_its_plots(tmp_path: Path) -> None:
    binary = _chromium()
    db = Database.open(f"sqlite:///{tmp_path / 'coordinator.db'}")
    upgrade_to_head(db.engine)
    await asyncio.to_thread(_first_rows, db)
    config = DashboardConfig(
        port=0, refresh_s=1.0, cache_s=0, window=StatsWindow(history_s=120, bucket_s=5)
    )
    async with DashboardServer(config, db, registry=CollectorRegistry()) as server:
        browser = await asyncio.to_thread(
            DevTools, binary, tmp_path / "profile", tmp_path / "chromium.log"
        )
        try:
            target = await asyncio.to_thread(
                browser.call, "Target.createTarget", {"url": server.url + "/"}
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

            await _until(lambda: text_of("stat-rollouts-total") == "4", "the first 4 rollouts")
            assert text_of("stat-workers-online") == "1"

            # New rows while the page is open: its refresh must bring them in.
            await asyncio.to_thread(_new_rows, db)
            await _until(lambda: text_of("stat-rollouts-total") == "12", "12 rollouts")
            assert text_of("stat-workers-online") == "2"
            assert text_of("stat-policy") == "1"
            refreshes = browser.evaluate(session, "Number(document.body.dataset.refreshes)")
            assert refreshes >= 1
            assert text_of("status") == "live"
            workers = browser.evaluate(
                session, "document.getElementById('table-workers').textContent"
            )
            assert "bob <b>" in workers  # shown as text, not parsed as markup

            # Every plot has drawn its data: series paths with a `d`, and on screen either
            # a line or bar of some length or, for a lone point, its dot.
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
            box = browser.evaluate(
                session,
                "(() => { const b = document.getElementById('chart-outcomes').getBBox();"
                " return [b.width, b.height]; })()",
            )
            assert box[0] > 100 and box[1] > 100
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
    db.close()

    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    artifact = tmp_path / "dashboard.png"
    artifact.write_bytes(png)
    print(f"dashboard screenshot: {artifact}")
    if target_dir := os.environ.get("CODEREPAIR_TEST_ARTIFACTS"):
        Path(target_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(artifact, Path(target_dir) / "dashboard.png")
