"""Schema migrations (Alembic, driven from code): `upgrade_to_head` runs at start-up.

The Alembic environment lives in the package (`migrations/`), so an installed
coordinator migrates its database without an alembic.ini or a source checkout.

Several coordinator replicas may start at once against one PostgreSQL: the upgrade runs
in one transaction (PostgreSQL has transactional DDL) that first takes a transaction-
scoped advisory lock, so one replica migrates and the others wait, then find the schema
at head and do nothing. On SQLite the transaction starts with BEGIN IMMEDIATE, which
serialises starters the same way. SQLite can still fail a starter at once with
"database is locked" while another process's last connection checkpoints the WAL on
close (the busy handler is not called then): `upgrade_to_head` rolls back and tries
again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import URL

from coderepair.coordinator.storage.db import (
    Dialect,
    dialect_of,
    is_transient,
    make_engine,
    write_engine,
)
from coderepair.coordinator.storage.models import Base
from coderepair.protocol.errors import ProtocolError

__all__ = [
    "MIGRATIONS_DIR",
    "MigrationError",
    "alembic_config",
    "current_revision",
    "head_revision",
    "schema_diff",
    "upgrade_to_head",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Arbitrary constant naming the coordinator's migration lock among advisory locks.
_ADVISORY_LOCK_KEY = 0x636F_6465_7270_6169  # b"coderpai"
# Alembic installs its `context`/`op` proxies as module globals for the duration of a
# command, so two commands in one process must not overlap. Processes are kept apart by
# the database locks above; threads of one process by this lock.
_ALEMBIC_LOCK = threading.Lock()
log = logging.getLogger(__name__)


class MigrationError(ProtocolError):
    """The database schema cannot be brought to the version this code needs."""


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migrations (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships a revision
        raise MigrationError("the package ships no migration revision: reinstall it")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _engine_for(target: Engine | str | URL) -> tuple[Engine, bool]:
    if isinstance(target, Engine):
        return target, False
    return make_engine(target, pool_size=1), True


def upgrade_to_head(target: Engine | str | URL, *, lock_wait_s: float = 60.0) -> str:
    """Migrate the database at `target` (an engine or a URL) to head; return the head.

    Safe to call from several processes at once (see the module docstring) and a no-op
    on a database already at head. A lock conflict the database settles by failing the
    attempt (`db.is_transient`; on SQLite also the moment another starter's last
    connection closes) rolls the whole upgrade back, and it is tried again for up to
    `lock_wait_s` seconds.
    """
    if lock_wait_s < 0:
        raise ValueError(f"lock_wait_s must be >= 0, got {lock_wait_s}")
    engine, owned = _engine_for(target)
    deadline = time.monotonic() + lock_wait_s
    try:
        attempt = 0
        while True:
            try:
                _upgrade_once(engine)
                return head_revision()
            except Exception as exc:
                pause = min(0.05 * 2**attempt, 1.0)
                if not is_transient(exc) or time.monotonic() + pause > deadline:
                    raise
                log.info("schema upgrade retried after a lock conflict: %s", exc)
                time.sleep(pause)
                attempt += 1
    finally:
        if owned:
            engine.dispose()


def _upgrade_once(engine: Engine) -> None:
    # One transaction: a failed attempt leaves nothing behind (DDL is transactional on
    # both engines), so the caller may simply run it again.
    config = alembic_config()
    with write_engine(engine).begin() as connection:
        if dialect_of(engine) is Dialect.POSTGRESQL:
            connection.execute(select(func.pg_advisory_xact_lock(_ADVISORY_LOCK_KEY)))
        config.attributes["connection"] = connection
        try:
            with _ALEMBIC_LOCK:
                command.upgrade(config, "head")
        except CommandError as exc:
            raise MigrationError(
                f"cannot migrate the database to revision {head_revision()}: {exc}. "
                "A database written by a newer coordinator needs that version (or a "
                "fresh database)"
            ) from exc


def schema_diff(engine: Engine) -> list[Any]:
    """Differences between the database's schema and the models (Alembic autogenerate
    terms); empty when the migrations produce exactly what the models declare."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        diff: list[Any] = compare_metadata(context, Base.metadata)
        return diff
