"""Operator actions on messages as database transitions: retry now, cancel. Never revokes.

A cancel is a compare-and-set from `pending` (with no live lease) to `cancelled`; a drain
that later reaches for the message finds nothing to claim. A retry makes the message due
now (a failed one is reopened with a fresh window); the caller then wakes its account.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from worker.decide import is_sent
from worker.store.db import changed_rows
from worker.store.events import EventDraft, append
from worker.store.metrics import tally_reopened
from worker.store.models import EventType, MessageStatus
from worker.store.models import Message as MessageRow

PENDING = MessageStatus.PENDING.value


@dataclass
class ActionReport:
    """What an operator action did to each message; `refused` says why not."""

    done: list[int] = field(default_factory=list)
    #: Accounts whose mail became due (to wake after commit).
    accounts: set[int] = field(default_factory=set)
    refused: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "woken": self.done if self.accounts else [],
            "refused": {str(k): v for k, v in self.refused.items()},
        }

    def merge(self, other: ActionReport) -> None:
        self.done += other.done
        self.accounts |= other.accounts
        self.refused.update(other.refused)

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
    session: Session, message_ids: list[int], *, now: datetime, window_s: float
) -> ActionReport:
    """Make pending messages due now; reopen failed ones with a fresh window."""
    report = ActionReport()
    for mid in message_ids:
        account_id = session.execute(
            update(MessageRow)
            .where(
                MessageRow.id == mid,
                MessageRow.status == PENDING,
                or_(MessageRow.lease_until.is_(None), MessageRow.lease_until < now),
            )
            .values(next_attempt_at=now, lease_until=None, lease_token=None, updated_at=now)
            .returning(MessageRow.account_id)
            .execution_options(synchronize_session=False)
        ).scalar()
        if account_id is None:
            account_id = _reopen_failed(session, mid, now=now, window_s=window_s)
        if account_id is not None:
            report.done.append(mid)
            report.accounts.add(account_id)
        else:
            report.refused[mid] = _why_refused(session, mid, "retry", now)
    return report


def _reopen_failed(session: Session, mid: int, *, now: datetime, window_s: float) -> int | None:
    row = session.get(MessageRow, mid)
    if row is None or row.status != MessageStatus.FAILED.value:
        return None
    # Its failure stays counted (the exporter's counters only go up).
    tally_reopened(session, status=row.status, sent_via=row.sent_via, finished_at=row.finished_at)
    # Reopen with a fresh window; recipients already delivered stay delivered.
    row.delivered_to = {k: v for k, v in (row.delivered_to or {}).items() if is_sent(v)}
    row.status = PENDING
    row.deadline = now + timedelta(seconds=window_s)
    row.next_attempt_at = now
    row.due_at = row.deadline
    row.finished_at = None
    row.updated_at = now
    session.flush()
    return row.account_id


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
            append(
                session,
                mid,
                [EventDraft(EventType.CANCELLED, {"reason": "Cancelled by an operator."})],
                now=now,
            )
        else:
            report.refused[mid] = _why_refused(session, mid, "cancel", now)
    return report


def message_ids_of(
    session: Session,
    *,
    account_id: int | None = None,
    statuses: tuple[str, ...] = (PENDING,),
    limit: int = 100_000,
) -> list[int]:
    """Ids of the account's messages in these states, oldest first (bulk actions)."""
    query = select(MessageRow.id).where(MessageRow.status.in_(statuses))
    if account_id is not None:
        query = query.where(MessageRow.account_id == account_id)
    return list(session.scalars(query.order_by(MessageRow.id).limit(limit)))
