"""metrics: counter tallies and marks, the sweeper's last run, finishes in time order

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

`metric_tallies` start empty and `metric_marks` at nothing counted: the exporter's first
fold counts the existing finished mail and attempts once (worker.store.metrics).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.store.models import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINISHED = sa.text("finished_at IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "metric_tallies",
        sa.Column("family", sa.String(length=32), nullable=False),
        sa.Column("labels", sa.String(length=200), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("family", "labels"),
    )
    op.create_table(
        "metric_marks",
        sa.Column("family", sa.String(length=32), nullable=False),
        sa.Column("through_at", UTCDateTime(), nullable=True),
        sa.Column(
            "through_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.PrimaryKeyConstraint("family"),
    )
    op.create_table(
        "maintenance_runs",
        sa.Column("task", sa.String(length=32), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("task"),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_messages_finished_at",
            ["finished_at"],
            unique=False,
            postgresql_where=FINISHED,
            sqlite_where=FINISHED,
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_finished_at")
    op.drop_table("maintenance_runs")
    op.drop_table("metric_marks")
    op.drop_table("metric_tallies")
