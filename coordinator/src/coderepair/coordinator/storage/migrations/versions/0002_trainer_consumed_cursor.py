"""trainer_acks.consumed_cursor: how far the trainer has consumed, checkpointed or not.

Back-pressure (`max_rollouts_ahead`) counted the rows after the checkpointed cursor. A
trainer that drops rows (stale, or groups whose rewards are all equal) while it waits
for usable ones checkpoints nothing, so those rows held the room for new leases until
the limit was full and no lease came again: the run stalled. Back-pressure now counts
from the consumed cursor, which the trainer acks while it waits. Existing rows start
from their checkpointed cursor.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("trainer_acks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("consumed_cursor", sa.BigInteger(), server_default="0", nullable=False)
        )
    op.execute("UPDATE trainer_acks SET consumed_cursor = acked_cursor")


def downgrade() -> None:
    with op.batch_alter_table("trainer_acks", schema=None) as batch_op:
        batch_op.drop_column("consumed_cursor")
