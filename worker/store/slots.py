"""A per-account cap on concurrent SMTP connections, shared by every worker process.

Each account has `max_connections` slot rows. A process holds one slot while it has a
connection open to the account (reused across messages), and renews it on every use;
a slot whose holder died frees itself when `expires_at` passes. Claiming uses
`FOR UPDATE SKIP LOCKED` on PostgreSQL (SQLite serialises writers anyway).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import case, or_, select, update
from sqlalchemy.orm import Session

from worker.store.models import SmtpSlot


def acquire_slot(
    session: Session, account_id: int, *, holder: str, now: datetime, hold_s: float
) -> int | None:
    """Take (or renew) a connection slot for `holder`; None when all are busy."""
    candidate = (
        select(SmtpSlot.slot)
        .where(
            SmtpSlot.account_id == account_id,
            or_(
                SmtpSlot.holder == holder,
                SmtpSlot.holder.is_(None),
                SmtpSlot.expires_at < now,
            ),
        )
        # Prefer the slot this process already holds: its connection is still open.
        .order_by(case((SmtpSlot.holder == holder, 0), else_=1), SmtpSlot.slot)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return session.execute(
        update(SmtpSlot)
        .where(SmtpSlot.account_id == account_id, SmtpSlot.slot == candidate)
        .values(holder=holder, expires_at=now + timedelta(seconds=hold_s))
        .returning(SmtpSlot.slot)
        .execution_options(synchronize_session=False)
    ).scalar()


def hold_slot(
    session: Session, account_id: int, *, holder: str, now: datetime, hold_s: float
) -> None:
    """Keep the slot while the connection stays open for reuse."""
    session.execute(
        update(SmtpSlot)
        .where(SmtpSlot.account_id == account_id, SmtpSlot.holder == holder)
        .values(expires_at=now + timedelta(seconds=hold_s))
        .execution_options(synchronize_session=False)
    )


def release_slot(session: Session, account_id: int, *, holder: str) -> None:
    session.execute(
        update(SmtpSlot)
        .where(SmtpSlot.account_id == account_id, SmtpSlot.holder == holder)
        .values(holder=None, expires_at=None)
        .execution_options(synchronize_session=False)
    )


def release_all(session: Session, *, holder: str) -> None:
    """A process shutting down gives back every slot it holds."""
    session.execute(
        update(SmtpSlot)
        .where(SmtpSlot.holder == holder)
        .values(holder=None, expires_at=None)
        .execution_options(synchronize_session=False)
    )
