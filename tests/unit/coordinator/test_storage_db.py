"""Engine set-up and migrations of the coordinator's storage, on SQLite files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import OperationalError

from coderepair.coordinator.storage.db import Database, DatabaseConfigError, make_engine
from coderepair.coordinator.storage.migrate import (
    alembic_config,
    current_revision,
    head_revision,
    schema_diff,
    upgrade_to_head,
)
from coderepair.coordinator.storage.models import Base


def test_sqlite_connections_get_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}", sqlite_busy_timeout_ms=1234)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 1234
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    engine.dispose()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("postgresql+asyncpg://u@h/db", "psycopg 3"),
        ("mysql+pymysql://u@h/db", "not supported"),
        ("not a url", "cannot be parsed"),
    ],
)
def test_unusable_urls_are_refused_with_a_clear_error(url: str, fragment: str) -> None:
    with pytest.raises(DatabaseConfigError, match=fragment):
        make_engine(url)


def test_upgrade_creates_every_table_and_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    assert upgrade_to_head(url) == head_revision()
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision()
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        # The `alembic check` of this project: autogenerate finds nothing to add.
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_0002_starts_each_consumed_cursor_at_the_checkpointed_one(tmp_path: Path) -> None:
    """A database of the first schema keeps its trainer's progress: back-pressure counts
    from the consumed cursor after the upgrade, which starts at the acked one."""
    path = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{path}")
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    engine.dispose()
    with sqlite3.connect(path) as raw:  # no foreign keys: the run row is not needed here
        raw.execute(
            "INSERT INTO trainer_acks (run_id, acked_cursor, trainer_step, updated_unix_ms) "
            "VALUES ('r1', 96, 12, 0)"
        )
    assert upgrade_to_head(f"sqlite:///{path}") == head_revision() != "0001"
    with sqlite3.connect(path) as raw:
        row = raw.execute("SELECT acked_cursor, consumed_cursor FROM trainer_acks").fetchone()
    assert row == (96, 96)


def test_schema_diff_sees_a_table_the_migrations_lack(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    upgrade_to_head(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_rollouts_completion_sha256"))
    diff = schema_diff(engine)
    engine.dispose()
    assert any("ix_rollouts_completion_sha256" in repr(item) for item in diff)


def test_upgrade_is_idempotent_and_safe_from_concurrent_starters(tmp_path: Path) -> None:
    # Replicas are processes: start three at once on one fresh database file, plus
    # threads in this process.
    url = f"sqlite:///{tmp_path / 'c.db'}"
    code = f"from coderepair.coordinator.storage.migrate import upgrade_to_head as u; u({url!r})"
    processes = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(3)
    ]
    errors: list[BaseException] = []

    def start() -> None:
        try:
            upgrade_to_head(url)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    assert errors == []
    upgrade_to_head(url)
    db = Database.open(url)
    assert current_revision(db.engine) == head_revision()
    assert schema_diff(db.engine) == []
    db.close()


@contextmanager
def _write_lock_held(path: Path, seconds: float) -> Iterator[Engine]:
    """An engine with busy_timeout 0 on `path` while another connection holds the write
    lock for `seconds`: every lock conflict fails at once, as SQLite does when a
    connection meets another process's last connection cleaning up the WAL."""
    engine = make_engine(f"sqlite:///{path}", sqlite_busy_timeout_ms=0)
    taken = threading.Event()

    def hold() -> None:
        # Another process's connection, as SQLite sees it: a separate DBAPI connection.
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        taken.set()
        time.sleep(seconds)
        connection.execute("COMMIT")
        connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    try:
        yield engine
    finally:
        holder.join()
        engine.dispose()


def test_upgrade_retries_a_database_that_refuses_at_once_until_it_frees(
    tmp_path: Path,
) -> None:
    with _write_lock_held(tmp_path / "r.db", 0.6) as engine:
        started = time.monotonic()
        assert upgrade_to_head(engine) == head_revision()
        assert time.monotonic() - started >= 0.5
        assert current_revision(engine) == head_revision()
        assert schema_diff(engine) == []


def test_upgrade_gives_up_on_a_lock_held_past_its_wait(tmp_path: Path) -> None:
    with _write_lock_held(tmp_path / "g.db", 2.0) as engine:
        started = time.monotonic()
        with pytest.raises(OperationalError, match="database is locked"):
            upgrade_to_head(engine, lock_wait_s=0.3)
        assert time.monotonic() - started < 1.5
    # Nothing of the failed attempts was left: a later start migrates from scratch.
    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    assert current_revision(engine) is None
    assert upgrade_to_head(engine) == head_revision()
    engine.dispose()


def test_upgrade_refuses_a_negative_lock_wait(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lock_wait_s"):
        upgrade_to_head(f"sqlite:///{tmp_path / 'n.db'}", lock_wait_s=-1)


def test_plain_postgresql_urls_use_psycopg_3() -> None:
    engine = make_engine("postgresql://user@127.0.0.1:1/db")
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


def test_foreign_keys_are_enforced(storage_db: Database) -> None:
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), storage_db.write() as session:
        session.execute(
            text(
                "INSERT INTO trainer_acks (run_id, acked_cursor, trainer_step, updated_unix_ms) "
                "VALUES ('no-such-run', 0, 0, 0)"
            )
        )


def test_write_transactions_take_the_sqlite_write_lock_up_front(tmp_path: Path) -> None:
    import sqlite3

    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade_to_head(url)
    db = Database.open(url)
    other = sqlite3.connect(tmp_path / "w.db", timeout=0, isolation_level=None)
    try:
        with db.read() as session:
            session.execute(text("SELECT count(*) FROM runs"))
            other.execute("BEGIN IMMEDIATE")  # a reader holds no write lock
            other.execute("ROLLBACK")
        with db.write() as session, pytest.raises(sqlite3.OperationalError, match="locked"):
            # Only a read so far, but the transaction began IMMEDIATE: the write lock is
            # held, so a later write can never fail on a lock upgrade.
            session.execute(text("SELECT count(*) FROM runs"))
            other.execute("BEGIN IMMEDIATE")
    finally:
        other.close()
        db.close()


def test_writers_of_one_process_queue_for_the_sqlite_lock(tmp_path: Path) -> None:
    """With no busy wait at all, threads of one process that write at once still all
    commit: they queue in `Database.write`, not on SQLite's lock (where every writer
    that found it taken would fail at once)."""
    db = Database.open(f"sqlite:///{tmp_path / 'q.db'}", sqlite_busy_timeout_ms=0)
    with db.write() as session:
        session.execute(text("CREATE TABLE t (writer INTEGER, n INTEGER)"))
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def write(writer: int) -> None:
        start.wait()
        try:
            for n in range(40):
                with db.write() as session:
                    session.execute(text("INSERT INTO t VALUES (:w, :n)"), {"w": writer, "n": n})
                    time.sleep(0.0005)  # hold the lock while the others try for it
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with db.read() as session:
        assert session.execute(text("SELECT count(*) FROM t")).scalar() == 160
    # Another process's writer (here: another engine) is still refused, not queued.
    other = Database.open(f"sqlite:///{tmp_path / 'q.db'}", sqlite_busy_timeout_ms=0)
    with db.write() as session:
        session.execute(text("INSERT INTO t VALUES (9, 9)"))
        with pytest.raises(OperationalError), other.write() as second:
            second.execute(text("INSERT INTO t VALUES (8, 8)"))
    db.close()
    other.close()


def _wal_frames(path: Path) -> tuple[int, int]:
    """(frames in the WAL, frames of them copied into the database file)."""
    with sqlite3.connect(path) as probe:
        _busy, log, done = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return log, done


def test_without_autocheckpoint_commits_leave_the_wal_to_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = Database.open(f"sqlite:///{path}", sqlite_autocheckpoint=False)
    default = Database.open(f"sqlite:///{tmp_path / 'd.db'}")
    try:
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        with default.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
        with db.write() as session:
            session.execute(text("CREATE TABLE t (x BLOB)"))
        # Past the default's 1,000 pages: with auto-checkpoints the commit would copy it.
        for _ in range(6):
            with db.write() as session:
                session.execute(text("INSERT INTO t VALUES (randomblob(1000000))"))
        wal = path.with_name("c.db-wal")
        grown = wal.stat().st_size
        assert grown > 4096 * 1000
        db.checkpoint()
        log, done = _wal_frames(path)
        assert log == done  # everything copied by the checkpoint
        with db.write() as session:  # the next writer starts the WAL over
            session.execute(text("INSERT INTO t VALUES (1)"))
        assert _wal_frames(path)[0] < 10
    finally:
        db.close()
        default.close()


def test_checkpoint_is_nothing_on_postgresql_urls() -> None:
    db = Database.open("postgresql+psycopg://nobody@127.0.0.1:1/none")
    db.checkpoint()  # no connection is even opened
    db.close()
