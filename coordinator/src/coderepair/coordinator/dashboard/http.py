"""The dashboard's HTTP server: asyncio streams from the standard library, nothing else.

Routes (GET and HEAD only):
- `/`                 the dashboard page (`?run=ID` picks a run; default the newest);
- `/api/panels`       the page's content, which the page's script swaps in every
                      `refresh_s` (server-rendered, see render.py);
- `/api/stats`        the same snapshot as JSON, for scripts;
- `/metrics`          Prometheus text format: the registry the caller passed in, which
                      holds the service's own metrics and, while the server runs, a
                      `StatsCollector` of the database;
- `/healthz`          200 when the database answers, 503 when it does not;
- `/static/...`       the page's stylesheet and script (package files).

Why no web framework: the coordinator's dependencies have none, the routes are few and
fixed, and every answer is one short response (`Connection: close`), so a strict
request-head parser and a router are the whole job. Database reads are blocking calls
(storage/db.py): they run in an executor, never on the event loop, and a snapshot is
shared for `cache_s` between requests so many open pages cost one set of queries.

Lifecycle: `await start()` binds (port 0 picks one: see `port`), `await shutdown()`
closes the socket, cancels the connections still open and unregisters the collector;
it is idempotent, and `async with DashboardServer(...)` does both. A server is started
once; build a new one to serve again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from types import TracebackType
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from coderepair.coordinator.dashboard.config import DashboardConfig
from coderepair.coordinator.dashboard.metrics import StatsCollector
from coderepair.coordinator.dashboard.render import render_page, render_panels
from coderepair.coordinator.dashboard.stats import (
    DashboardError,
    StatsSnapshot,
    UnknownRunError,
    collect_stats,
)
from coderepair.coordinator.storage.db import Database

__all__ = [
    "MAX_HEAD_BYTES",
    "BadRequestError",
    "DashboardServer",
    "DashboardStateError",
    "RequestHead",
    "parse_request_head",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_HEAD_BYTES = 16 * 1024
"""Longest request head (request line + headers) accepted."""
_MAX_TARGET = 2048
_MAX_HEADERS = 100
_MAX_RUN_ID = 64  # runs.run_id is VARCHAR(64)
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Defence in depth behind the escaping in render.py: no inline script, nothing from
# elsewhere, no framing.
_HTML_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_STATIC = {
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


class BadRequestError(DashboardError):
    """A request the server refuses to interpret; `status` is the HTTP answer."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class DashboardStateError(DashboardError):
    """The server was used out of order (started twice, restarted after shutdown), or
    cannot bind its address."""


@dataclass(frozen=True)
class RequestHead:
    """A parsed request line and headers."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str] = field(default_factory=dict)
    """Header names in lower case; a repeated header keeps its last value."""

    def run_id(self) -> str | None:
        """The `run` query parameter (None when absent); `BadRequestError` if malformed."""
        values = self.query.get("run")
        if values is None:
            return None
        if len(values) != 1 or not 0 < len(values[0]) <= _MAX_RUN_ID:
            raise BadRequestError(
                HTTPStatus.BAD_REQUEST,
                f"give one run id of 1..{_MAX_RUN_ID} characters as ?run=ID",
            )
        return values[0]


def parse_request_head(head: bytes) -> RequestHead:
    """Parse an HTTP/1.x request head (up to and including the blank line).

    Every malformed input is a `BadRequestError` carrying the status to answer with.
    """
    if len(head) > MAX_HEAD_BYTES:
        raise BadRequestError(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            f"the request head is over {MAX_HEAD_BYTES} bytes",
        )
    if not head.endswith(b"\r\n\r\n"):
        raise BadRequestError(HTTPStatus.BAD_REQUEST, "the request head is not terminated")
    try:
        lines = head[:-4].decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        raise BadRequestError(
            HTTPStatus.BAD_REQUEST, "the request head holds non-ASCII bytes"
        ) from None
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequestError(
            HTTPStatus.BAD_REQUEST, "the request line is not 'METHOD TARGET HTTP/1.1'"
        )
    method, target, version = parts
    if not method or not set(method) <= _TOKEN:
        raise BadRequestError(HTTPStatus.BAD_REQUEST, f"bad method {method!r}")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequestError(
            HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"{version!r} is not HTTP/1.0 or HTTP/1.1"
        )
    if len(target) > _MAX_TARGET:
        raise BadRequestError(
            HTTPStatus.REQUEST_URI_TOO_LONG, f"the target is over {_MAX_TARGET} characters"
        )
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise BadRequestError(HTTPStatus.BAD_REQUEST, "the target must be a path: /...")
    if len(lines) - 1 > _MAX_HEADERS:
        raise BadRequestError(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {_MAX_HEADERS} headers"
        )
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or not set(name) <= _TOKEN:
            raise BadRequestError(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:80]!r}")
        headers[name.lower()] = value.strip(" \t")
    split = urlsplit(target)
    try:
        query = parse_qs(
            split.query,
            keep_blank_values=True,
            strict_parsing=True,
            errors="strict",
            max_num_fields=20,
        )
    except ValueError as exc:  # UnicodeDecodeError is one
        raise BadRequestError(HTTPStatus.BAD_REQUEST, f"malformed query string: {exc}") from None
    return RequestHead(method=method, path=split.path, query=query, headers=headers)


@dataclass(frozen=True)
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _text(status: HTTPStatus, message: str) -> _Response:
    return _Response(status, (message + "\n").encode())


class _SnapshotCache:
    """Snapshots per run, reused for `ttl_s`. One query set at a time: concurrent
    requests for a stale snapshot wait for the one being read instead of each querying."""

    def __init__(self, read: Callable[[str | None], StatsSnapshot], ttl_s: float) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._taken: dict[str | None, tuple[float, StatsSnapshot]] = {}

    def get(self, run_id: str | None) -> StatsSnapshot:
        with self._lock:
            cached = self._taken.get(run_id)
            if cached is not None and time.monotonic() - cached[0] < self._ttl_s:
                return cached[1]
            snapshot = self._read(run_id)
            self._taken[run_id] = (time.monotonic(), snapshot)
            return snapshot


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class DashboardServer:
    """Serves the operators' view of `db` and the Prometheus text of `registry`.

    `registry` is the caller's (the service registers its `CoordinatorMetrics` on the
    same one); while running, the server adds a `StatsCollector` to it. `clock` gives
    the time in Unix milliseconds (the coordinator's clock). Database reads run on
    `executor` (None: the event loop's default executor).
    """

    def __init__(
        self,
        config: DashboardConfig,
        db: Database,
        *,
        registry: CollectorRegistry,
        clock: Callable[[], int] = _wall_clock_ms,
        executor: Executor | None = None,
        namespace: str = "coderepair",
    ) -> None:
        self.config = config
        self.registry = registry
        self._db = db
        self._clock = clock
        self._executor = executor
        self._cache = _SnapshotCache(self._read_snapshot, config.cache_s)
        self._collector = StatsCollector(lambda: self._cache.get(None), namespace=namespace)
        self._server: asyncio.Server | None = None
        self._closed = False
        self._connections: set[asyncio.Task[None]] = set()
        self._busy = 0
        package = resources.files("coderepair.coordinator.dashboard") / "static"
        self._static = {
            path: (package.joinpath(name).read_bytes(), kind)
            for path, (name, kind) in _STATIC.items()
        }

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind and start serving. `DashboardStateError` when already started, shut
        down, or when the address cannot be bound."""
        if self._closed:
            raise DashboardStateError("this dashboard server was shut down: build a new one")
        if self._server is not None:
            raise DashboardStateError("the dashboard server is already running")
        self.registry.register(self._collector)
        try:
            self._server = await asyncio.start_server(
                self._serve,
                self.config.host,
                self.config.port,
                limit=MAX_HEAD_BYTES,
                reuse_address=True,
            )
        except OSError as exc:
            self.registry.unregister(self._collector)
            raise DashboardStateError(
                f"cannot listen on {self.config.host} port {self.config.port}: {exc}. Choose "
                "another [dashboard] host/port, or port 0 for any free one"
            ) from exc
        _log.info("dashboard listening on %s", self.url)

    async def shutdown(self) -> None:
        """Stop listening, end open connections, unregister the collector. Idempotent."""
        if self._closed:
            return
        self._closed = True
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()
        self.registry.unregister(self._collector)

    async def __aenter__(self) -> DashboardServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.shutdown()

    @property
    def port(self) -> int:
        """The TCP port the server listens on (the one picked when configured as 0)."""
        if self._server is None or not self._server.sockets:
            raise DashboardStateError("the dashboard server is not running: await start()")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """Base URL of the dashboard, e.g. http://127.0.0.1:9464."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._busy += 1
        try:
            response: _Response | None
            if self._busy > self.config.max_connections:
                response = _text(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; retry")
                head_only = False
            else:
                response, head_only = await self._answer(reader)
            if response is not None:
                writer.write(self._encode(response, head_only))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            self._busy -= 1
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[_Response | None, bool]:
        try:
            raw = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), timeout=self.config.request_timeout_s
            )
        except TimeoutError:
            return _text(HTTPStatus.REQUEST_TIMEOUT, "send the request head sooner"), False
        except asyncio.LimitOverrunError:
            return _text(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"the request head is over {MAX_HEAD_BYTES} bytes",
            ), False
        except asyncio.IncompleteReadError:
            return None, False
        try:
            request = parse_request_head(raw)
        except BadRequestError as exc:
            return _text(exc.status, str(exc)), False
        return await self._route(request), request.method == "HEAD"

    def _encode(self, response: _Response, head_only: bool) -> bytes:
        headers = {
            "Content-Type": response.content_type,
            "Content-Length": str(len(response.body)),
            "Cache-Control": "no-store",
            "Connection": "close",
            "X-Content-Type-Options": "nosniff",
            **response.headers,
        }
        lines = [f"HTTP/1.1 {response.status.value} {response.status.phrase}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + response.body

    # ------------------------------------------------------------ routes

    async def _route(self, request: RequestHead) -> _Response:
        if request.method not in ("GET", "HEAD"):
            return _Response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                b"only GET and HEAD are served here\n",
                headers={"Allow": "GET, HEAD"},
            )
        path = request.path
        try:
            if path == "/":
                snap = await self._snapshot(request.run_id())
                page = render_page(snap, refresh_s=self.config.refresh_s)
                return _Response(
                    HTTPStatus.OK, page.encode(), "text/html; charset=utf-8", _HTML_HEADERS
                )
            if path == "/api/panels":
                snap = await self._snapshot(request.run_id())
                fragment = render_panels(snap).encode()
                return _Response(HTTPStatus.OK, fragment, "text/html; charset=utf-8", _HTML_HEADERS)
            if path == "/api/stats":
                snap = await self._snapshot(request.run_id())
                return _Response(HTTPStatus.OK, snap.to_json_bytes(), "application/json")
            if path == "/metrics":
                body = await self._blocking(generate_latest, self.registry)
                return _Response(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)
            if path == "/healthz":
                await self._blocking(self._ping)
                return _text(HTTPStatus.OK, "ok")
            if path in self._static:
                body, kind = self._static[path]
                return _Response(HTTPStatus.OK, body, kind)
        except BadRequestError as exc:
            return _text(exc.status, str(exc))
        except UnknownRunError as exc:
            return _text(HTTPStatus.NOT_FOUND, str(exc))
        except SQLAlchemyError as exc:
            _log.warning("dashboard: database unavailable for %s: %s", path, exc)
            return _text(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the coordinator's database does not answer; see the coordinator's log",
            )
        except Exception:
            _log.exception("dashboard: %s failed", path)
            return _text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the log")
        return _text(
            HTTPStatus.NOT_FOUND,
            "not found: try /, /api/stats, /metrics or /healthz",
        )

    async def _blocking(self, fn: Callable[..., _T], *args: object) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _snapshot(self, run_id: str | None) -> StatsSnapshot:
        return await self._blocking(self._cache.get, run_id)

    def _read_snapshot(self, run_id: str | None) -> StatsSnapshot:
        return collect_stats(self._db, self.config.window, now_ms=self._clock(), run_id=run_id)

    def _ping(self) -> None:
        with self._db.read() as session:
            session.execute(text("SELECT 1"))
