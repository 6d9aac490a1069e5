"""incident notices to the notify webhook: one row per notice, delivered from the database

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

Upgrades in place: notices of incidents opened before the upgrade have no row; an
`outbox.notify` message of the previous release still in the broker writes it (the
task makes sure the row exists), so its webhook is posted by the dispatcher too.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.store.models import BigId, UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUE = sa.text("posted_at IS NULL AND given_up_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "incident_notices",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("incident_id", BigId, nullable=False),
        sa.Column("account_id", BigId, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("posted_at", UTCDateTime(), nullable=True),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failing_since", UTCDateTime(), nullable=True),
        sa.Column("next_try_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("given_up_at", UTCDateTime(), nullable=True),
        sa.Column("given_up_reason", sa.String(length=200), nullable=True),
        sa.CheckConstraint(
            "kind IN ('opened', 'backup', 'recovered')", name="ck_incident_notices_kind"
        ),
        sa.ForeignKeyConstraint(["incident_id"], ["incidents.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("incident_id", "kind", name="uq_incident_notices_incident_kind"),
    )
    op.create_index(
        "ix_incident_notices_due",
        "incident_notices",
        ["next_try_at"],
        unique=False,
        postgresql_where=DUE,
        sqlite_where=DUE,
    )


def downgrade() -> None:
    op.drop_index("ix_incident_notices_due", table_name="incident_notices")
    op.drop_table("incident_notices")
