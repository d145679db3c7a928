"""A trio loop in a thread of its own, driven from asyncio.

py-libp2p runs on trio; the worker runs on asyncio, and one thread cannot run both loops.
`TrioThread` runs one trio main function in a daemon thread. asyncio code calls trio
coroutine functions in it with `call` (which returns an asyncio awaitable) and stops it
with `stop`. Calls go in through the trio token's ``run_sync_soon`` and results come back
through ``call_soon_threadsafe``, so neither loop ever blocks on the other, and no thread
pool thread is held for the length of a call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from coderepair.protocol.errors import ProtocolError

try:
    import trio
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"coderepair.worker.p2p_bridge needs trio ({exc}): install the extra with "
        "`pip install 'coderepair-worker[p2p]'`"
    ) from exc

log = logging.getLogger(__name__)

T = TypeVar("T")
TrioMain = Callable[[Callable[[], None], Any], Awaitable[None]]
"""``main(started, stop)``: set up, call ``started()``, run until the trio Event ``stop``
is set, then tear down and return."""


class PeerError(ProtocolError):
    """The peer network cannot do what was asked (not started, stopped, bad address)."""


class TrioThread:
    """One trio loop in a daemon thread; every method is called from one asyncio loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: Any = None
        self._nursery: Any = None
        self._stop: Any = None
        self._stopped = False

    @property
    def running(self) -> bool:
        """Started, and not stopped."""
        return self._token is not None and not self._stopped

    async def start(self, main: TrioMain) -> None:
        """Run `main` in a new thread; return once it called ``started()``, or raise
        `PeerError` with the reason when it failed before that."""
        if self._thread is not None:
            raise PeerError(f"{self.name} was already started; make a new one")
        self._loop = asyncio.get_running_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(main, ready), name=self.name, daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except Exception as exc:
            self._stopped = True
            await asyncio.to_thread(self._thread.join, 10)
            raise PeerError(f"{self.name} did not start: {exc}") from exc

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Set ``stop`` and wait for the thread to end (idempotent)."""
        if self._stopped or self._thread is None:
            self._stopped = True
            return
        self._stopped = True
        with contextlib.suppress(RuntimeError):  # trio already finished
            self._token.run_sync_soon(self._stop.set)
        await asyncio.to_thread(self._thread.join, timeout_s)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run the trio coroutine function ``fn(*args)`` in the thread and await it."""
        if not self.running or self._loop is None:
            raise PeerError(f"{self.name} is not running: call start() first")
        loop = self._loop
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():  # the asyncio caller gave up (cancelled) meanwhile
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        async def runner() -> None:
            try:
                result = await fn(*args)
            except trio.Cancelled:
                loop.call_soon_threadsafe(settle, None, PeerError(f"{self.name} stopped"))
                raise
            except Exception as exc:
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        def spawn() -> None:
            try:
                self._nursery.start_soon(runner)
            except RuntimeError:  # the nursery is closing: the thread is stopping
                loop.call_soon_threadsafe(settle, None, PeerError(f"{self.name} stopped"))

        try:
            self._token.run_sync_soon(spawn)
        except RuntimeError as exc:  # trio.RunFinishedError
            raise PeerError(f"{self.name} stopped") from exc
        return await future

    def call_soon(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Start ``fn(*args)`` in the thread without waiting; callable from any thread.
        Dropped silently when the thread is not running (used for best-effort work)."""
        token, nursery = self._token, self._nursery
        if token is None or nursery is None or self._stopped:
            return
        with contextlib.suppress(RuntimeError):
            token.run_sync_soon(_start_quietly, nursery, fn, args)

    def _thread_main(self, main: TrioMain, ready: concurrent.futures.Future[None]) -> None:
        try:
            trio.run(self._trio_main, main, ready)
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(_innermost(exc))
            else:
                log.exception("%s failed", self.name)

    async def _trio_main(self, main: TrioMain, ready: concurrent.futures.Future[None]) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            await main(lambda: ready.set_result(None), self._stop)
            nursery.cancel_scope.cancel()


def _start_quietly(nursery: Any, fn: Callable[..., Awaitable[object]], args: tuple[Any]) -> None:
    with contextlib.suppress(RuntimeError):  # the nursery is closing
        nursery.start_soon(fn, *args)


def _innermost(exc: BaseException) -> BaseException:
    # trio wraps errors in exception groups (one level per nursery); the reason a start
    # failed is the single error inside.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
