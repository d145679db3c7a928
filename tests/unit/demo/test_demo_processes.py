"""`RoleProcess` with real child processes: lines read, logs kept, bounded stops."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from coderepair.demo.processes import RoleProcess

PY = sys.executable


async def test_lines_reach_the_handler_and_the_log(tmp_path: Path) -> None:
    seen: list[str] = []
    proc = RoleProcess(
        "echo",
        [PY, "-c", "import sys; print('one'); print('two'); print('err', file=sys.stderr)"],
        tmp_path / "logs" / "echo.log",
        on_line=seen.append,
    )
    await proc.start()
    assert await proc.wait(30) == 0
    assert seen == ["one", "two"]
    log = (tmp_path / "logs" / "echo.log").read_text().splitlines()
    assert sorted(log) == ["err", "one", "two"]
    assert "two" in proc.tail()


async def test_a_handler_that_raises_does_not_block_the_child(tmp_path: Path) -> None:
    def bad(_: str) -> None:
        raise RuntimeError("view bug")

    code = "for i in range(20000): print('x' * 50)"
    proc = RoleProcess("flood", [PY, "-c", code], tmp_path / "flood.log", on_line=bad)
    await proc.start()
    assert await proc.wait(60) == 0
    assert len((tmp_path / "flood.log").read_text().splitlines()) == 20000


async def test_stop_escalates_to_kill_and_is_idempotent(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(120)"
    )
    ready: list[str] = []
    proc = RoleProcess("stubborn", [PY, "-c", stubborn], tmp_path / "s.log", on_line=ready.append)
    await proc.start()
    deadline = time.monotonic() + 30
    while not ready and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    started = time.monotonic()
    code = await proc.stop(signal.SIGTERM, timeout=1.0)
    assert code == -signal.SIGKILL
    assert time.monotonic() - started < 15
    assert not proc.running
    assert await proc.stop() == code  # again: nothing more to do


async def test_sigint_lets_a_child_leave_cleanly(tmp_path: Path) -> None:
    # The child starts with SIGINT unblocked and handled: a child inherits the signal
    # mask and an ignored SIGINT of the process that spawns it, and in the full suite
    # this test once ran after something had left the pytest process so (the child
    # printed 'ready' and never saw the signal); `coderepair demo` spawns from its own.
    polite = (
        "import signal, time\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "try:\n    print('ready', flush=True); time.sleep(120)\n"
        "except KeyboardInterrupt:\n    print('bye')\n"
    )
    lines: list[str] = []
    proc = RoleProcess("polite", [PY, "-c", polite], tmp_path / "p.log", on_line=lines.append)
    await proc.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await proc.stop(signal.SIGINT, timeout=20) == 0
    assert lines == ["ready", "bye"]


async def test_a_stop_before_start_does_nothing(tmp_path: Path) -> None:
    proc = RoleProcess("never", [PY, "-c", "pass"], tmp_path / "n.log")
    assert await proc.stop() is None
    with pytest.raises(AssertionError, match="never started"):
        await proc.wait(1)
