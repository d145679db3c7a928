"""The coordinator's durable state: SQL tables (SQLite or PostgreSQL) and an object store.

- `models`: the tables; `migrate`: Alembic migrations, applied at start-up
  (`upgrade_to_head`);
- `db`: engine factory (SQLite WAL / PostgreSQL psycopg 3) and `Database` (read and
  write transactions);
- `repo`: runs, policy versions, workers, leases, replay nonces;
- `batches`: idempotent batch storage, cursor assignment, duplicates, trainer stream, acks;
- `audits`: audit job claims and verdicts, voiding, bans, audit window and credit;
- `errors`: the typed errors of all of the above;
- `objects`: rollout Parquet files and policy shards (local directory or S3).
"""
