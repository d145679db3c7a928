"""Real servers for integration tests: PostgreSQL from the machine's binaries, and an
S3-compatible HTTP server (moto's server mode) on loopback.

PostgreSQL: `initdb` and `pg_ctl` (on PATH, else Debian's newest
/usr/lib/postgresql/*/bin) run as the unprivileged `postgres` user when
the tests run as root (PostgreSQL refuses to run as root), with a private data
directory, a private unix-socket directory and a free TCP port on 127.0.0.1, so it never
meets another server on the machine. One server per test session; each test that asks
for `postgres_url` gets a fresh database in it. Outside CI a machine without the
binaries skips those tests; under CI (CI=true) that is a failure, because a silent skip
would hide a broken set-up.

S3: moto's `ThreadedMotoServer` is a real HTTP server speaking the S3 REST API, the best
S3-compatible server that installs here (no real S3 server is installable); boto3 and
urllib talk to it over TCP like they would to S3. Its credentials are moto's dummies.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"CI needs this server but: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# ---------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class PostgresServer:
    """A running private PostgreSQL server."""

    host: str
    port: int
    user: str
    socket_dir: Path
    log_file: Path

    def url(self, database: str) -> str:
        """SQLAlchemy URL of `database` on this server (psycopg 3)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """Create a fresh, empty database; return its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    return [runuser or "runuser", "-u", "postgres", "--", *command]


def _run(command: list[str], what: str, log_file: Path | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        log = log_file.read_text(errors="replace")[-3000:] if log_file and log_file.exists() else ""
        raise RuntimeError(
            f"{what} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}\n{log}"
        )


def _pg_binary(name: str) -> str | None:
    # Debian keeps the server binaries out of PATH, under /usr/lib/postgresql/VERSION/bin.
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return str(candidates[-1]) if candidates else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the whole session (stopped at teardown)."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        _unavailable(
            "PostgreSQL's initdb/pg_ctl are neither on PATH nor in /usr/lib/postgresql/*/bin "
            "(Debian: apt-get install postgresql)"
        )
    assert initdb is not None and pg_ctl is not None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg 3 is not installed (pip install 'coderepair-coordinator[postgres]')")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root but no `postgres` user exists to run the server")
    root = Path(tempfile.mkdtemp(prefix="coderepair-pg-"))
    data, sockets, log_file = root / "data", root / "sock", root / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        for path in (root, sockets):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    port = free_port()
    try:
        _run(
            _as_postgres_user(
                [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                 "--no-sync", "--no-instructions"]
            ),
            "initdb",
        )  # fmt: skip
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=200"
        _run(
            _as_postgres_user(
                [pg_ctl, "-D", str(data), "-o", options, "-l", str(log_file), "-w", "-t", "60",
                 "start"]
            ),
            "pg_ctl start",
            log_file,
        )  # fmt: skip
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(f"could not start PostgreSQL: {exc}")
    try:
        yield PostgresServer("127.0.0.1", port, "postgres", sockets, log_file)
    finally:
        # Immediate: the data directory is deleted next, so its shutdown checkpoint
        # (seconds of fsync for every test database) would be wasted.
        subprocess.run(
            _as_postgres_user([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of a fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()


# ---------------------------------------------------------------- S3 (moto server)


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible HTTP server with dummy credentials."""

    endpoint_url: str
    region: str = "us-east-1"
    access_key: str = "testing"
    secret_key: str = "testing"

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3-compatible server on a free loopback port for the whole session."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        _unavailable("moto's server mode is not installed (pip install 'moto[server]')")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Callable[[], tuple[Any, str]]:
    """Factory of fresh buckets: returns (boto3 client, bucket name)."""

    def make() -> tuple[Any, str]:
        client = s3_server.client()
        name = f"coderepair-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        return client, name

    return make
