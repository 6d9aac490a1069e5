"""A per-account cap on concurrent SMTP connections, shared by every worker process.

Each account has `max_connections` slot rows. A drain holds one slot while its
connection is open (store.drains takes and gives it back, worker.lease renews it); a
slot whose holder died frees itself when `expires_at` passes. Claiming uses
`FOR UPDATE SKIP LOCKED` on PostgreSQL (SQLite serialises writers anyway).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Update, bindparam, case, or_, select, update
from sqlalchemy.orm import Session

from worker.store.models import SmtpSlot, table

_SLOTS = table(SmtpSlot)


def acquire_statement(account_id: Any) -> Update:
    """Take (or renew) a free slot of the account: UPDATE ... RETURNING slot.

    Parameters: p_holder, p_now, p_slot_expires_at. `account_id` is a parameter or, in
    the one-statement claim (store.sending), the claimed message's account.
    """
    return (
        update(_SLOTS)
        .where(
            _SLOTS.c.account_id == account_id,
            _SLOTS.c.slot
            == (
                select(_SLOTS.c.slot)
                .where(
                    _SLOTS.c.account_id == account_id,
                    or_(
                        _SLOTS.c.holder == bindparam("p_holder"),
                        _SLOTS.c.holder.is_(None),
                        _SLOTS.c.expires_at < bindparam("p_now"),
                    ),
                )
                # Prefer the slot this process already holds: its connection is still open.
                .order_by(
                    case((_SLOTS.c.holder == bindparam("p_holder"), 0), else_=1), _SLOTS.c.slot
                )
                .limit(1)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            ),
        )
        .values(holder=bindparam("p_holder"), expires_at=bindparam("p_slot_expires_at"))
        .returning(_SLOTS.c.slot)
    )


# Built once with named parameters.
_ACQUIRE = acquire_statement(bindparam("p_account_id"))


def acquire_slot(
    session: Session, account_id: int, *, holder: str, now: datetime, hold_s: float
) -> int | None:
    """Take (or renew) a connection slot for `holder`; None when all are busy."""
    return (
        session.connection()
        .execute(
            _ACQUIRE,
            {
                "p_account_id": account_id,
                "p_holder": holder,
                "p_now": now,
                "p_slot_expires_at": now + timedelta(seconds=hold_s),
            },
        )
        .scalar()
    )
