"""PostgreSQL: the acceptance of a batch as one server-side function call.

Accepting a batch is a dozen statements in one transaction (lock the worker, look the
idempotency key up, close the lease, take a cursor range, check duplicates, insert the
batch, its audit jobs, its credit and its index rows). Sent one by one, each is a round
trip: the coordinator's single group-commit thread waits on PostgreSQL a dozen times per
batch, and on a loaded 2-core machine every wait is a chance to lose the CPU. The bench
measured 9 ms of wall time per batch in that thread (p50, at 2,000 rollouts/s), which
made it the queue that held the slowest submits. `coderepair_accept_batch` makes the same
checks and writes in the server, under the same locks taken in the same order (worker,
lease, run); the coordinator sends one call (`storage.batches.record_in`). The batch row
goes in after the run lock, with its cursors, instead of before it and updated after:
the lock was taken late to keep round trips out of it, and there are none left. SQLite
runs in-process and keeps the statements in Python.

The function answers with a status; every refusal is decided by the caller, which
raises and so rolls the transaction (or the group's savepoint) back, exactly as when
the statements ran from Python:
- ``no_worker``: the worker is not registered;
- ``existing``: the (worker, idempotency key) is stored: the caller reads it back;
- ``banned``: the worker is banned (``detail``: its ban reason);
- ``lease``: the lease is not open for this batch: the caller diagnoses why;
- ``duplicate``: completions repeat other workers' accepted samples (the ``dup_*``
  arrays) and the draft refuses duplicates;
- ``accepted``: stored; ``head`` is the batch's last cursor, and the ``dup_*`` arrays
  list the repeats that were accepted with their audits queued.

A later migration that changes any of the tables it writes must replace it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 11:30:00
"""

from __future__ import annotations

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_ACCEPT_BATCH = """
CREATE OR REPLACE FUNCTION coderepair_accept_batch(
    p_worker_id text,
    p_idempotency_key text,
    p_payload_sha256 text,
    p_batch_id text,
    p_run_id text,
    p_lease_id text,
    p_policy_version bigint,
    p_object_key text,
    p_n_tokens bigint,
    p_now_ms bigint,
    p_job_ids text[],
    p_job_kinds text[],
    p_refuse_duplicates boolean,
    p_dup_job_ids text[],
    p_dup_job_kinds text[],
    p_row_indices integer[],
    p_task_ids text[],
    p_sample_indices integer[],
    p_digests text[],
    p_n_completion_tokens integer[],
    p_rewards double precision[],
    OUT status text,
    OUT detail text,
    OUT head bigint,
    OUT dup_digests text[],
    OUT dup_run_ids text[],
    OUT dup_cursors bigint[],
    OUT dup_batch_ids text[],
    OUT dup_worker_ids text[]
) LANGUAGE plpgsql AS $$
DECLARE
    w_state text;
    w_reason text;
    n integer := cardinality(p_digests);
    audited boolean := cardinality(p_job_ids) > 0;
BEGIN
    -- The worker lock serialises every submission of this worker (and so every retry
    -- of one key), as storage.batches.record_in does on SQLite.
    SELECT state, ban_reason INTO w_state, w_reason
        FROM workers WHERE worker_id = p_worker_id FOR UPDATE;
    IF NOT FOUND THEN
        status := 'no_worker';
        RETURN;
    END IF;
    PERFORM 1 FROM batches
        WHERE worker_id = p_worker_id AND idempotency_key = p_idempotency_key;
    IF FOUND THEN
        status := 'existing';
        RETURN;
    END IF;
    IF w_state = 'banned' THEN
        status := 'banned';
        detail := w_reason;
        RETURN;
    END IF;
    UPDATE leases SET state = 'submitted', closed_unix_ms = p_now_ms
        WHERE lease_id = p_lease_id AND worker_id = p_worker_id AND run_id = p_run_id
          AND policy_version = p_policy_version AND state = 'open'
          AND deadline_unix_ms >= p_now_ms;
    IF NOT FOUND THEN
        status := 'lease';
        RETURN;
    END IF;
    -- Takes the run's row lock until commit: every acceptor of the run waits here, so
    -- cursors become visible in order (storage.batches module docstring).
    UPDATE runs SET head_cursor = head_cursor + n WHERE run_id = p_run_id
        RETURNING head_cursor INTO head;
    -- After the run lock: two acceptors of one completion cannot both miss each other.
    -- One index probe per digest, whatever the column's statistics say.
    SELECT array_agg(r.completion_sha256), array_agg(r.run_id), array_agg(r.cursor),
           array_agg(r.batch_id), array_agg(r.worker_id)
        INTO dup_digests, dup_run_ids, dup_cursors, dup_batch_ids, dup_worker_ids
        FROM (
            SELECT m.completion_sha256, m.run_id, m.cursor, m.batch_id, m.worker_id
            FROM (SELECT DISTINCT digest FROM unnest(p_digests) AS d(digest) ORDER BY digest) AS d
            CROSS JOIN LATERAL (
                SELECT completion_sha256, run_id, cursor, batch_id, worker_id
                FROM rollouts
                WHERE completion_sha256 = d.digest AND worker_id <> p_worker_id
                LIMIT 100
            ) AS m
            LIMIT 100
        ) AS r;
    IF dup_digests IS NOT NULL THEN
        IF p_refuse_duplicates THEN
            status := 'duplicate';
            RETURN;
        END IF;
        audited := audited OR cardinality(p_dup_job_ids) > 0;
    END IF;
    INSERT INTO batches (
        batch_id, worker_id, idempotency_key, payload_sha256, run_id, lease_id,
        policy_version, state, rejection_reason, rejection_message, audit_pending,
        object_key, n_samples, n_tokens, created_unix_ms, decided_unix_ms,
        first_cursor, last_cursor
    ) VALUES (
        p_batch_id, p_worker_id, p_idempotency_key, p_payload_sha256, p_run_id, p_lease_id,
        p_policy_version, 'pending_audit', NULL, NULL, audited,
        p_object_key, n, p_n_tokens, p_now_ms, p_now_ms,
        head - n + 1, head
    );
    INSERT INTO audit_jobs (
        job_id, batch_id, worker_id, kind, state, attempts, detail, metrics_json,
        created_unix_ms, claimed_by, claimed_unix_ms, claim_expires_unix_ms,
        finished_unix_ms
    )
    SELECT j.job_id, p_batch_id, p_worker_id, j.kind, 'pending', 0, '', '{}',
           p_now_ms, NULL, NULL, NULL, NULL
        FROM unnest(
            p_job_ids || CASE WHEN dup_digests IS NULL THEN '{}'::text[] ELSE p_dup_job_ids END,
            p_job_kinds || CASE WHEN dup_digests IS NULL THEN '{}'::text[] ELSE p_dup_job_kinds END
        ) AS j(job_id, kind);
    UPDATE workers SET batches_accepted = batches_accepted + 1,
                       credit_pending = credit_pending + p_n_tokens
        WHERE worker_id = p_worker_id;
    INSERT INTO credit_ledger (
        worker_id, batch_id, kind, pending_delta, granted_delta, created_unix_ms
    ) VALUES (p_worker_id, p_batch_id, 'pending', p_n_tokens, 0, p_now_ms);
    -- The rows in the order given: the caller puts a task's samples next to each other.
    INSERT INTO rollouts (
        run_id, cursor, batch_id, row_index, task_id, sample_index, worker_id,
        policy_version, completion_sha256, n_completion_tokens, reward, accepted_unix_ms,
        voided
    )
    SELECT p_run_id, head - n + u.ord, p_batch_id, u.row_index, u.task_id, u.sample_index,
           p_worker_id, p_policy_version, u.digest, u.n_tokens, u.reward, p_now_ms, false
        FROM unnest(
            p_row_indices, p_task_ids, p_sample_indices, p_digests, p_n_completion_tokens,
            p_rewards
        ) WITH ORDINALITY AS u(row_index, task_id, sample_index, digest, n_tokens, reward, ord);
    status := 'accepted';
END
$$;
"""

_SIGNATURE = (
    "coderepair_accept_batch(text, text, text, text, text, text, bigint, text, bigint, "
    "bigint, text[], text[], boolean, text[], text[], integer[], text[], integer[], text[], "
    "integer[], double precision[])"
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_ACCEPT_BATCH)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_SIGNATURE}")
