"""`TrioThread`: asyncio code calling trio code in a thread of its own."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio

from coderepair.worker.p2p_bridge import PeerError, TrioThread


async def idle_main(started: Any, stop: trio.Event) -> None:
    started()
    await stop.wait()


async def test_calls_run_in_the_trio_thread_and_return_or_raise() -> None:
    bridge = TrioThread("test")
    await bridge.start(idle_main)
    caller = threading.get_ident()

    async def where(x: int) -> tuple[int, int]:
        await trio.sleep(0)
        return threading.get_ident(), x * 2

    ident, doubled = await bridge.call(where, 21)
    assert doubled == 42 and ident != caller

    async def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await bridge.call(fail)
    await bridge.stop()
    with pytest.raises(PeerError, match="not running"):
        await bridge.call(where, 1)
    await bridge.stop()  # idempotent


async def test_a_call_in_flight_at_stop_gets_a_typed_error() -> None:
    bridge = TrioThread("test")
    await bridge.start(idle_main)

    async def forever() -> None:
        await trio.sleep_forever()

    import asyncio

    pending = asyncio.ensure_future(bridge.call(forever))
    await asyncio.sleep(0.05)
    await bridge.stop()
    with pytest.raises(PeerError, match="stopped"):
        await pending


async def test_a_main_that_fails_before_starting_raises_peer_error() -> None:
    async def broken(started: Any, stop: trio.Event) -> None:
        raise OSError("address in use")

    bridge = TrioThread("test")
    with pytest.raises(PeerError, match="address in use"):
        await bridge.start(broken)
    with pytest.raises(PeerError, match="already started"):
        await bridge.start(idle_main)


async def test_call_before_start_raises_peer_error() -> None:
    async def nothing() -> None:
        return None

    with pytest.raises(PeerError, match="start"):
        await TrioThread("test").call(nothing)
