"""Operator actions on messages: retry now, cancel. Database transitions, never revokes.

A cancel is a compare-and-set from `pending` (with no live lease) to `cancelled`; any
wake-up still queued for the message then finds nothing to claim. A retry makes the
message due now (a failed one is reopened with a fresh window).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from worker.store.db import changed_rows
from worker.store.models import Message as MessageRow
from worker.store.models import MessageStatus

PENDING = MessageStatus.PENDING.value


@dataclass
class ActionReport:
    """What an operator action did to each message; `refused` says why not."""

    done: list[int] = field(default_factory=list)
    woken: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "woken": self.woken,
            "refused": {str(k): v for k, v in self.refused.items()},
        }

    @property
    def ok(self) -> bool:
        return not self.refused


def _why_refused(session: Session, message_id: int, action: str, now: datetime) -> str:
    row = session.execute(
        select(MessageRow.status, MessageRow.lease_until).where(MessageRow.id == message_id)
    ).first()
    if row is None:
        return "no such message"
    status, lease_until = row
    if status == PENDING and lease_until is not None and lease_until >= now:
        return "it is being sent right now; look again in a moment"
    if status == MessageStatus.SENT.value:
        return "it was already sent"
    if status == MessageStatus.CANCELLED.value:
        return "it was cancelled"
    if status == MessageStatus.FAILED.value and action == "cancel":
        return "it already failed; there is nothing to cancel"
    return f"it is {status}"


def retry_messages(
    session: Session, message_ids: list[int], *, now: datetime, window_s: float, wake_grace_s: float
) -> ActionReport:
    report = ActionReport()
    due = now + timedelta(seconds=wake_grace_s)
    for mid in message_ids:
        pending = changed_rows(
            session.execute(
                update(MessageRow)
                .where(
                    MessageRow.id == mid,
                    MessageRow.status == PENDING,
                    or_(MessageRow.lease_until.is_(None), MessageRow.lease_until < now),
                )
                .values(
                    next_attempt_at=now,
                    due_at=due,
                    lease_until=None,
                    lease_token=None,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
        )
        if pending:
            report.done.append(mid)
            report.woken.append(mid)
            continue
        row = session.get(MessageRow, mid)
        if row is not None and row.status == MessageStatus.FAILED.value:
            # Reopen with a fresh window; recipients already delivered stay delivered.
            row.delivered_to = {
                k: v for k, v in (row.delivered_to or {}).items() if v.get("outcome") == "sent"
            }
            row.status = PENDING
            row.deadline = now + timedelta(seconds=window_s)
            row.next_attempt_at = now
            row.due_at = due
            row.finished_at = None
            row.updated_at = now
            session.flush()
            report.done.append(mid)
            report.woken.append(mid)
            continue
        report.refused[mid] = _why_refused(session, mid, "retry", now)
    return report


def cancel_messages(session: Session, message_ids: list[int], *, now: datetime) -> ActionReport:
    report = ActionReport()
    for mid in message_ids:
        changed = changed_rows(
            session.execute(
                update(MessageRow)
                .where(
                    MessageRow.id == mid,
                    MessageRow.status == PENDING,
                    or_(MessageRow.lease_until.is_(None), MessageRow.lease_until < now),
                )
                .values(
                    status=MessageStatus.CANCELLED.value,
                    finished_at=now,
                    updated_at=now,
                    lease_until=None,
                    lease_token=None,
                    last_error="Cancelled by an operator.",
                )
                .execution_options(synchronize_session=False)
            )
        )
        if changed:
            report.done.append(mid)
        else:
            report.refused[mid] = _why_refused(session, mid, "cancel", now)
    return report


def select_ids(
    session: Session,
    *,
    account_id: int | None = None,
    statuses: tuple[str, ...] = (PENDING,),
    limit: int = 100_000,
) -> list[int]:
    query = select(MessageRow.id).where(MessageRow.status.in_(statuses))
    if account_id is not None:
        query = query.where(MessageRow.account_id == account_id)
    return list(session.scalars(query.order_by(MessageRow.id).limit(limit)))


class Operator:
    """The operator's actions bound to a database and the retry window."""

    def __init__(self, db: Any, *, window_s: float, wake_grace_s: float, clock: Any = None) -> None:
        from worker.clock import utcnow

        self.db = db
        self.window_s = window_s
        self.wake_grace_s = wake_grace_s
        self.clock = clock or utcnow

    def retry(self, message_ids: list[int]) -> ActionReport:
        with self.db.session() as session:
            return retry_messages(
                session,
                message_ids,
                now=self.clock(),
                window_s=self.window_s,
                wake_grace_s=self.wake_grace_s,
            )

    def cancel(self, message_ids: list[int]) -> ActionReport:
        with self.db.session() as session:
            return cancel_messages(session, message_ids, now=self.clock())
