"""Status events: each change a sender cares about, written in the change's own
transaction, and read back in order for publishing and for people.

A message's events are numbered 1, 2, 3... (`seq`) by bumping `messages.event_seq` in
the same statement or transaction that changes the message, so the numbering has no gap
and no two writers can take the same number. Publishing to the caller's `status_task`
reads the rows still due, oldest first (`ix_events_to_publish`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, select, update
from sqlalchemy.orm import Session

from worker.store.db import changed_rows
from worker.store.models import Account, Event, EventType, table
from worker.store.models import Message as MessageRow

_EVENTS = table(Event)
_EARLIER = _EVENTS.alias("earlier")
_MESSAGES = table(MessageRow)


@dataclass(frozen=True)
class EventDraft:
    """An event about to be written: its type and its type's fields."""

    type: EventType
    data: dict[str, Any] = field(default_factory=dict)
    #: Made when the draft is: a retried write carries the same public id.
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))


def event_rows(
    drafts: tuple[EventDraft, ...] | list[EventDraft],
    *,
    message_id: int,
    account_id: int,
    last_seq: int,
    publish_due: bool,
    at: datetime,
) -> list[dict[str, Any]]:
    """The rows of `drafts`, numbered after the message's previous last event."""
    first = last_seq - len(drafts) + 1
    return [
        {
            "event_id": d.event_id,
            "message_id": message_id,
            "account_id": account_id,
            "seq": first + i,
            "type": d.type.value,
            "at": at,
            "data": d.data,
            "publish_due": publish_due,
        }
        for i, d in enumerate(drafts)
    ]


_BUMP = (
    update(_MESSAGES)
    .where(_MESSAGES.c.id == bindparam("p_id"))
    .values(event_seq=_MESSAGES.c.event_seq + bindparam("p_count"))
    .returning(_MESSAGES.c.event_seq, _MESSAGES.c.account_id, _MESSAGES.c.status_task)
)


def append(session: Session, message_id: int, drafts: list[EventDraft], *, now: datetime) -> None:
    """Write events about one message, in the caller's transaction."""
    if not drafts:
        return
    row = session.execute(_BUMP, {"p_id": message_id, "p_count": len(drafts)}).one()
    insert_rows(
        session,
        event_rows(
            drafts,
            message_id=message_id,
            account_id=row.account_id,
            last_seq=row.event_seq,
            publish_due=row.status_task is not None,
            at=now,
        ),
    )


def insert_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        session.execute(_EVENTS.insert(), rows)


@dataclass(frozen=True)
class Published:
    """One event as the caller's task receives it, and where it goes."""

    row_id: int
    task: str
    queue: str | None
    event: dict[str, Any]


def event_dict(row: Any, *, account: str, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The event schema (version 1): what a receiver gets, and `outbox events --json`."""
    return {
        "id": row.event_id,
        "type": row.type,
        "message_id": row.message_id,
        "account": account,
        "at": row.at.isoformat(),
        "seq": row.seq,
        "metadata": metadata or {},
        **(row.data or {}),
    }


def to_publish(session: Session, *, limit: int) -> list[Published]:
    """Events due to the callers' tasks, oldest first, locked for this publisher."""
    rows = session.execute(
        select(
            _EVENTS,
            Account.name.label("account"),
            MessageRow.caller_metadata.label("caller_metadata"),
            MessageRow.status_task.label("status_task"),
            MessageRow.status_queue.label("status_queue"),
        )
        .join(MessageRow, MessageRow.id == _EVENTS.c.message_id)
        .join(Account, Account.id == _EVENTS.c.account_id)
        .where(
            _EVENTS.c.publish_due.is_(True),
            _EVENTS.c.published_at.is_(None),
            # In order per message: never one whose predecessor is still unpublished
            # (held by another publisher, or failed to go out).
            ~exists(
                select(_EARLIER.c.id).where(
                    _EARLIER.c.message_id == _EVENTS.c.message_id,
                    _EARLIER.c.seq < _EVENTS.c.seq,
                    _EARLIER.c.publish_due.is_(True),
                    _EARLIER.c.published_at.is_(None),
                )
            ),
        )
        .order_by(_EVENTS.c.id)
        .limit(limit)
        .with_for_update(of=_EVENTS, skip_locked=True)
    ).all()
    return [
        Published(
            row_id=r.id,
            task=r.status_task,
            queue=r.status_queue,
            event=event_dict(r, account=r.account, metadata=r.caller_metadata),
        )
        for r in rows
        if r.status_task
    ]


def mark_published(session: Session, row_ids: list[int], *, now: datetime) -> None:
    if row_ids:
        session.execute(
            update(Event)
            .where(Event.id.in_(row_ids))
            .values(published_at=now)
            .execution_options(synchronize_session=False)
        )


#: Event rows with what `event_dict` needs besides them: the account's name and the
#: caller's metadata (kept on the message, not copied into every event).
WITH_ACCOUNT_AND_METADATA = (
    select(
        _EVENTS,
        Account.name.label("account"),
        MessageRow.caller_metadata.label("caller_metadata"),
    )
    .join(MessageRow, MessageRow.id == _EVENTS.c.message_id)
    .join(Account, Account.id == _EVENTS.c.account_id)
)


def list_events(
    session: Session,
    *,
    message_id: int | None = None,
    account: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Events for people, oldest first (with `published_at` for the status task)."""
    query = WITH_ACCOUNT_AND_METADATA
    if message_id is not None:
        query = query.where(_EVENTS.c.message_id == message_id)
    if account is not None:
        query = query.where(Account.name == account)
    if since is not None:
        query = query.where(_EVENTS.c.at >= since)
    rows = session.execute(query.order_by(_EVENTS.c.id.desc()).limit(limit)).all()
    return [
        {
            **event_dict(r, account=r.account, metadata=r.caller_metadata),
            "published_at": r.published_at.isoformat() if r.published_at else None,
        }
        for r in reversed(rows)
    ]


def redeliver(session: Session, *, message_id: int) -> int:
    """Publish the message's events again (a receiver missed them): same ids, same order."""
    result = session.execute(
        update(Event)
        .where(Event.message_id == message_id, Event.publish_due.is_(True))
        .values(published_at=None)
        .execution_options(synchronize_session=False)
    )
    return changed_rows(result)


__all__ = [
    "EventDraft",
    "Published",
    "append",
    "event_dict",
    "event_rows",
    "insert_rows",
    "list_events",
    "mark_published",
    "redeliver",
    "to_publish",
]
