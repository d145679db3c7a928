"""Headless Chromium driven over the DevTools protocol on a pipe, for dashboard tests.

Chromium is started with ``--remote-debugging-pipe``: JSON messages separated by NUL
bytes on file descriptors 3 and 4 (no websocket client, no browser download). Missing
Chromium: skipped outside CI (``apt-get install chromium``), a failure under CI=true.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

__all__ = ["DevTools", "chromium_binary"]


def chromium_binary() -> str:
    """Path of a Chromium binary, or skip (fail under CI) when there is none."""
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
