"""One role of the demo network as a child process: start, read, stop within a bound.

Every role is the ordinary console script a user would run (`coderepair-coordinator
serve`, `coderepair-trainer run`, `coderepair-worker join`), started with asyncio's
subprocess API. Its stdout and stderr go to a log file under the run directory (so a
failure can be read afterwards) and each stdout line is offered to a callback: the
workers print JSON events (``--json-logs``) that the demo's view is built from.

Stopping is bounded: a signal (SIGINT lets a worker drain its leases, SIGTERM ends the
trainer), a wait, then SIGKILL. `stop` is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

__all__ = ["RoleProcess"]

LineHandler = Callable[[str], None]


class RoleProcess:
    """A child process of the demo with its log and the last lines it printed."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        on_line: LineHandler | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else dict(os.environ)
        self.on_line = on_line
        self._proc: asyncio.subprocess.Process | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._closer: asyncio.Task[None] | None = None
        self._tail: deque[str] = deque(maxlen=40)
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            # Its own process group: the user's Ctrl-C reaches the demo only, and the
            # demo decides how each role leaves.
            start_new_session=True,
        )
        log = self.log_path.open("a", encoding="utf-8", errors="replace")
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self._pump(self._proc.stdout, log, self.on_line)),
            asyncio.create_task(self._pump(self._proc.stderr, log, None)),
        ]
        self._closer = asyncio.create_task(self._close_log_when_done(log))

    async def _close_log_when_done(self, log: TextIO) -> None:
        await asyncio.gather(*self._pumps, return_exceptions=True)
        log.close()

    async def _pump(
        self, stream: asyncio.StreamReader, log: TextIO, on_line: LineHandler | None
    ) -> None:
        while True:
            raw = await stream.readline()
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            log.write(line + "\n")
            log.flush()
            self._tail.append(line)
            if on_line is not None:
                # A view bug must not stop the pipe: the child would block on a full pipe.
                with contextlib.suppress(Exception):
                    on_line(line)

    def tail(self, lines: int = 15) -> str:
        """The last lines it printed (stdout and stderr), for error messages."""
        return "\n".join(list(self._tail)[-lines:])

    async def wait(self, timeout: float | None = None) -> int:
        assert self._proc is not None, f"{self.name} was never started"
        code = await asyncio.wait_for(self._proc.wait(), timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._pumps), 5.0)
        return code

    def send(self, sig: int) -> None:
        if self.running:
            assert self._proc is not None
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal, wait up to ``timeout`` s, then kill the process group. Idempotent."""
        if self._proc is None:
            return None
        if self._stopped or not self.running:
            self._stopped = True
            return await self.wait(10.0) if self.running else self._proc.returncode
        self._stopped = True
        self.send(sig)
        try:
            return await self.wait(timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                return await self.wait(10.0)
            return self._proc.returncode
