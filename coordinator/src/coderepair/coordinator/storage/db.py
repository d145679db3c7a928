"""Engine factory: SQLite (embedded default) or PostgreSQL (psycopg 3), set up alike.

Sync, not asyncio. The service runs these blocking calls in a thread pool from its
grpc.aio handlers (`asyncio.to_thread` / a bounded executor). Why:
- every repository operation is one short transaction of a few statements (rows go in
  with one executemany), so the thread hop is paid once per operation, whereas
  SQLAlchemy's asyncio layer pays a greenlet switch per statement and aiosqlite one
  thread hop per statement;
- SQLite has a single writer whatever the API: async adds no write parallelism there;
- psycopg 3 and sqlite3 release the GIL while they wait on the server or the disk, so
  threads overlap database waits with the event loop's gRPC work just as well.

SQLite specifics, applied on every new DBAPI connection:
- WAL journal (readers never block the writer), `busy_timeout` (a writer waits for the
  lock instead of failing), `foreign_keys=ON` (off by default in SQLite);
- `synchronous`: FULL by default (a commit is on disk before it returns: a batch is
  acknowledged only once it would survive a power cut); NORMAL survives a process crash
  (kill -9) but may lose the last commits on power loss;
- transactions: pysqlite's own implicit BEGIN is switched off and SQLAlchemy's "begin"
  event emits it, so a transaction meant to write can start with `BEGIN IMMEDIATE`
  (`Database.write_engine`). A DEFERRED transaction that reads and then writes can fail
  with "database is locked" without waiting (upgrading a read lock is not retried by
  busy_timeout); IMMEDIATE takes the write lock up front, where busy_timeout applies.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from coderepair.protocol.errors import ProtocolError

__all__ = [
    "Database",
    "DatabaseConfigError",
    "Dialect",
    "SqliteSync",
    "dialect_of",
    "is_transient",
    "make_engine",
    "write_engine",
]

_BEGIN_OPTION = "coderepair_sqlite_begin"


class DatabaseConfigError(ProtocolError):
    """The database URL or its options cannot be used."""


class Dialect(enum.StrEnum):
    """Database engines the coordinator supports."""

    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


class SqliteSync(enum.StrEnum):
    """SQLite `synchronous` levels offered (see the module docstring)."""

    FULL = "FULL"
    NORMAL = "NORMAL"


def dialect_of(engine: Engine) -> Dialect:
    """Which supported engine `engine` talks to."""
    return Dialect(engine.dialect.name)


def _parse(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseConfigError(
            f"database URL {url!s} cannot be parsed ({exc}): use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB"
        ) from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    if backend == "postgresql" and driver in ("", "psycopg"):
        # Plain postgresql:// would mean psycopg2 to SQLAlchemy; we ship psycopg 3.
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "postgresql":
        raise DatabaseConfigError(
            f"PostgreSQL driver {driver!r} is not supported: write the URL as "
            "postgresql+psycopg://... (psycopg 3, the `postgres` extra)"
        )
    raise DatabaseConfigError(
        f"database {parsed.drivername!r} is not supported: use sqlite:///PATH (embedded) "
        "or postgresql+psycopg://... (production)"
    )


def make_engine(
    url: str | URL,
    *,
    sqlite_busy_timeout_ms: int = 10_000,
    sqlite_synchronous: SqliteSync = SqliteSync.FULL,
    sqlite_autocheckpoint: bool = True,
    pool_size: int = 10,
    echo: bool = False,
) -> Engine:
    """An engine for `url` with the coordinator's connection set-up.

    `pool_size` bounds the connections (and so the threads that can use the database
    at once); give the service's thread pool the same size. ``sqlite_autocheckpoint``
    False: this engine's commits never checkpoint the WAL, and its owner must call
    `Database.checkpoint` regularly (the serving coordinator's sweep does).
    """
    parsed = _parse(url)
    if sqlite_busy_timeout_ms < 0:
        raise DatabaseConfigError(
            f"sqlite_busy_timeout_ms must be >= 0, got {sqlite_busy_timeout_ms}"
        )
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise DatabaseConfigError(
                "an in-memory SQLite database is private to one connection and lost on "
                "exit: give a file path, sqlite:///PATH"
            )
        engine = create_engine(
            parsed,
            echo=echo,
            pool_size=pool_size,
            max_overflow=0,
            connect_args={"check_same_thread": False},
        )
        _set_up_sqlite(
            engine, sqlite_busy_timeout_ms, SqliteSync(sqlite_synchronous), sqlite_autocheckpoint
        )
        return engine
    kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": 0, "pool_pre_ping": True}
    return create_engine(parsed, echo=echo, **kwargs)


def _set_up_sqlite(
    engine: Engine, busy_timeout_ms: int, synchronous: SqliteSync, autocheckpoint: bool
) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver level: SQLAlchemy's "begin" event below owns BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            # WAL is persistent in the file: switch only once (switching needs the
            # database to itself, which fails if another process is already using it).
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {synchronous.value}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if not autocheckpoint:
                cursor.execute("PRAGMA wal_autocheckpoint = 0")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock victim, serialization


def is_transient(exc: BaseException) -> bool:
    """A lock conflict the database settled by failing this transaction: rolled back,
    the same transaction run again succeeds once the other party is through.

    PostgreSQL fails one transaction of a lock cycle (a group commit holds the worker
    rows of its operations in queue order while a sweep locks the workers it settles in
    id order; measured: the audit-on bench phase died on it) or of a serialization
    conflict. SQLite's "database is locked" is a writer that waited out its busy
    timeout, or a connection that met another process's last connection cleaning up
    the WAL on close, for which SQLite returns SQLITE_BUSY without calling the busy
    handler (sqlite.org/wal.html, "Sometimes Queries Return SQLITE_BUSY In WAL Mode").
    """
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _TRANSIENT_SQLSTATES:
        return True
    return isinstance(orig, sqlite3.OperationalError) and "database is locked" in str(orig)


def write_engine(engine: Engine) -> Engine:
    """The engine to run write transactions on: on SQLite they start with
    `BEGIN IMMEDIATE`; elsewhere it is `engine` itself. Shares `engine`'s pool."""
    if dialect_of(engine) is Dialect.SQLITE:
        return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
    return engine


class Database:
    """An engine plus the two kinds of transaction the repository runs.

    `write()` transactions start with BEGIN IMMEDIATE on SQLite (see the module
    docstring); `read()` ones take no write lock. Both commit on normal exit and roll
    back on an exception. Sessions do not expire objects on commit, so the rows a
    repository function returns stay readable after its transaction ended.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = dialect_of(engine)
        self._write = sessionmaker(write_engine(engine), expire_on_commit=False)
        self._read = sessionmaker(engine, expire_on_commit=False)
        # SQLite has one write lock, and a writer that finds it taken polls: busy_timeout
        # sleeps 1, 2, 5, 10, 15, 20, 25 ms... between tries, so a batch's commit queued
        # behind the sweep's writes waited in those steps, not for the lock's release.
        # This process's writers queue here instead and start the moment it is free;
        # busy_timeout still arbitrates between processes. Reentrant: a nested write in
        # one thread fails as before (busy_timeout), it does not hang here.
        self._writer = threading.RLock() if self.dialect is Dialect.SQLITE else None

    @classmethod
    def open(cls, url: str | URL, **engine_options: Any) -> Database:
        """Connect to `url` (see `make_engine` for the options); does not migrate."""
        return cls(make_engine(url, **engine_options))

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that may write; committed when the block exits normally."""
        if self._writer is None:
            with self._write.begin() as session:
                yield session
            return
        with self._writer, self._write.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (rolled back when the session closes: it wrote nothing)."""
        with self._read() as session:
            yield session

    def checkpoint(self) -> None:
        """SQLite: copy what the WAL holds into the database file, without waiting for
        readers or writers (PASSIVE); elsewhere nothing.

        With auto-checkpoints, the commit that takes the WAL past 1,000 pages does this
        itself, before its caller gets the answer: on the bench's load, one submission
        in a few hundred waited for a checkpoint's copy and fsync. The serving
        coordinator turns them off (``sqlite_autocheckpoint=False``) and calls this from
        its sweep, in a thread of its own, where no submission waits for it.
        """
        if self.dialect is not Dialect.SQLITE:
            return
        with self.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").close()

    def close(self) -> None:
        """Close the engine's pooled connections."""
        self.engine.dispose()
