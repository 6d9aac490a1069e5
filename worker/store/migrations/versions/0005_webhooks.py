"""signed webhooks: each account's events URL and secret, webhook state per event and
per destination

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Upgrades in place: no account has a webhook yet; events written before a destination
exists are never posted to it (its `start_event_id`).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.store.models import BigId, UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TO_HOOK = sa.text("hooked_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("events_webhook", sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column("events_secret_encrypted", sa.Text(), nullable=True))
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hooked_at", UTCDateTime(), nullable=True))
    op.create_index(
        "ix_events_to_hook",
        "events",
        ["account_id", "id"],
        unique=False,
        postgresql_where=TO_HOOK,
        sqlite_where=TO_HOOK,
    )
    op.create_table(
        "webhook_destinations",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("account_id", BigId, nullable=True),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("start_event_id", BigId, nullable=False),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("failing_since", UTCDateTime(), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("next_try_at", UTCDateTime(), nullable=True),
        sa.Column("disabled_at", UTCDateTime(), nullable=True),
        sa.Column("disabled_reason", sa.String(length=200), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_success_at", UTCDateTime(), nullable=True),
        sa.Column("delivered", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("webhook_destinations")
    op.drop_index("ix_events_to_hook", table_name="events")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("hooked_at")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("events_secret_encrypted")
        batch_op.drop_column("events_webhook")
