"""status events: the caller's metadata and status task on each message, and the events

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Upgrades in place: existing messages get no metadata, no status task and event_seq 0;
their later changes are recorded as events from then on.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.store.models import BigId, UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TO_PUBLISH = sa.text("publish_due AND published_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("metadata", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("status_task", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("status_queue", sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column("event_seq", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("message_id", BigId, nullable=False),
        sa.Column("account_id", BigId, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=24), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("publish_due", sa.Boolean(), nullable=False),
        sa.Column("published_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
        sa.UniqueConstraint("message_id", "seq", name="uq_events_message_seq"),
    )
    op.create_index(
        "ix_events_to_publish",
        "events",
        ["id"],
        unique=False,
        postgresql_where=TO_PUBLISH,
        sqlite_where=TO_PUBLISH,
    )
    op.create_index("ix_events_account_at", "events", ["account_id", "at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_events_account_at", table_name="events")
    op.drop_index("ix_events_to_publish", table_name="events")
    op.drop_table("events")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("event_seq")
        batch_op.drop_column("status_queue")
        batch_op.drop_column("status_task")
        batch_op.drop_column("metadata")
