"""Alembic environment of the coordinator's schema (run by `migrate.upgrade_to_head`).

Online mode only: `migrate.py` always hands over an open connection in
`config.attributes["connection"]`, made by `db.make_engine`, so migrations run with the
same SQLite pragmas (foreign keys, WAL) as the service.
"""

from __future__ import annotations

from alembic import context

from coderepair.coordinator.storage.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "the coordinator's migrations run only through "
        "coderepair.coordinator.storage.migrate (upgrade_to_head), which passes a connection"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place: batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    compare_server_default=True,
)
with context.begin_transaction():
    context.run_migrations()
