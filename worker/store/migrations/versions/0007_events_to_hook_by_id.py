"""the global webhook's due events by id: a partial index on events(id) WHERE hooked_at
IS NULL

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

The global destination takes the events of every account without a webhook of its own,
in id order. `ix_events_to_hook` is (account_id, id): it serves an account's own
destination, but the global one's query walked the primary key from its start and
skipped every event already posted, so each batch read more rows as the table grew.
This index holds only the events still to post. Built in place; no data changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TO_HOOK = sa.text("hooked_at IS NULL")


def upgrade() -> None:
    op.create_index(
        "ix_events_to_hook_by_id",
        "events",
        ["id"],
        unique=False,
        postgresql_where=TO_HOOK,
        sqlite_where=TO_HOOK,
    )


def downgrade() -> None:
    op.drop_index("ix_events_to_hook_by_id", table_name="events")
