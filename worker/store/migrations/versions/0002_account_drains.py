"""per-account drains: priority, send_at, the account's wake-up flags, queue indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Upgrades in place under running mail: existing messages get the normal priority; their
`due_at` (a grace after a per-message wake-up, in the old release) makes the sweeper look
at them once and wake their account, so mail accepted, parked or leased by the previous
release is delivered by the drains (tests/integration/test_upgrade.py).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.store.models import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("drain_queued_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("drain_timer_at", UTCDateTime(), nullable=True))
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="1")
        )
        batch_op.add_column(sa.Column("send_at", UTCDateTime(), nullable=True))
        batch_op.create_check_constraint("ck_messages_priority", "priority BETWEEN 0 AND 2")
        batch_op.create_index(
            "ix_messages_account_queue",
            ["account_id", "priority", "next_attempt_at"],
            unique=False,
            postgresql_where=PENDING,
            sqlite_where=PENDING,
        )
        batch_op.create_index(
            "ix_messages_account_next",
            ["account_id", "next_attempt_at"],
            unique=False,
            postgresql_where=PENDING,
            sqlite_where=PENDING,
        )
        batch_op.create_index(
            "ix_messages_lease_token",
            ["lease_token"],
            unique=False,
            postgresql_where=sa.text("lease_token IS NOT NULL"),
            sqlite_where=sa.text("lease_token IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_lease_token")
        batch_op.drop_index("ix_messages_account_next")
        batch_op.drop_index("ix_messages_account_queue")
        batch_op.drop_constraint("ck_messages_priority", type_="check")
        batch_op.drop_column("send_at")
        batch_op.drop_column("priority")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("drain_timer_at")
        batch_op.drop_column("drain_queued_at")
