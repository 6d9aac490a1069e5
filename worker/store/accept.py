"""Storing accepted mail: once per request (idempotency keys), one request or a thousand.

Requests arrive validated (`worker.intake`); what only the database can check is checked
here and reported with this module's own errors: the account must exist and give a From.
The caller asks for the account's drain in the same transaction
(`store.drains.request_drain`) and publishes the wake-up after the commit; if that
wake-up is lost, the sweeper finds the account's due mail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.intake import EmailRequest, deadline_for, new_message_id
from worker.store.errors import StoreError
from worker.store.events import EventDraft, event_rows, insert_rows
from worker.store.messages import EMAIL_COLUMNS
from worker.store.models import Account, AttachmentRow, EventType, MessageStatus, Priority, table
from worker.store.models import Message as MessageRow

_ACCOUNTS = table(Account)
_MESSAGES = table(MessageRow)
_ATTACHMENTS = table(AttachmentRow)


class UnknownAccount(StoreError):
    """No account has this name."""

    field = "account"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no account named {name!r}")


class NoSender(StoreError):
    """The request names no From and its account has no default one."""

    field = "from_addr"

    def __init__(self, account: str) -> None:
        super().__init__(f"is required: account {account!r} has no default From")


@dataclass(frozen=True)
class Accepted:
    id: int
    created: bool  #: False when the idempotency key matched an earlier request
    account_id: int
    #: When the mail may first be sent: now, or its send_at.
    due_at: datetime


# Built once, on the Core tables, with named parameters: building a statement per call, or
# letting the ORM plan a flush, costs more CPU than the round trip itself.
_ACCOUNTS_BY_NAME = select(_ACCOUNTS.c.id, _ACCOUNTS.c.name, _ACCOUNTS.c.from_addr).where(
    _ACCOUNTS.c.name.in_(bindparam("p_names", expanding=True))
)
_MESSAGES_BY_KEY = select(
    _MESSAGES.c.id, _MESSAGES.c.account_id, _MESSAGES.c.idempotency_key, _MESSAGES.c.next_attempt_at
).where(
    tuple_(_MESSAGES.c.account_id, _MESSAGES.c.idempotency_key).in_(
        bindparam("p_keys", expanding=True)
    )
)
_NEW_MESSAGE_FIELDS = (
    "account_id",
    "idempotency_key",
    *EMAIL_COLUMNS,
    "attachment_count",
    "size_bytes",
    "status",
    "priority",
    "send_at",
    "created_at",
    "updated_at",
    "deadline",
    "next_attempt_at",
    "due_at",
    "attempt_count",
    "delivered_to",
    "metadata",
    "status_task",
    "status_queue",
    "event_seq",
)
_INSERT_MESSAGE = (
    insert(_MESSAGES)
    .values({name: bindparam(name, type_=_MESSAGES.c[name].type) for name in _NEW_MESSAGE_FIELDS})
    .returning(_MESSAGES.c.id, sort_by_parameter_order=True)
)
_INSERT_ATTACHMENT = insert(_ATTACHMENTS)


def accept(session: Session, request: EmailRequest, *, now: datetime, window_s: float) -> Accepted:
    """Store one validated request, or find its twin by idempotency key.

    Raises `UnknownAccount` or `NoSender`; nothing is stored then.
    """
    result = accept_many(session, [request], now=now, window_s=window_s)[0]
    if isinstance(result, StoreError):
        raise result
    return result


def accept_many(
    session: Session, requests: Sequence[EmailRequest], *, now: datetime, window_s: float
) -> list[Accepted | StoreError]:
    """Store validated requests, each on its own: the result, in order, is the message
    (new, or the twin its idempotency key names) or why that one request was refused.

    One round trip each for the accounts, the known keys and the new rows, whatever the
    number of requests. Two requests of one call with the same key share one message.
    """
    conn = session.connection()
    names = sorted({r.account for r in requests})
    accounts = {row.name: row for row in conn.execute(_ACCOUNTS_BY_NAME, {"p_names": names})}
    keys = sorted(
        {
            (accounts[r.account].id, r.idempotency_key)
            for r in requests
            if r.idempotency_key is not None and r.account in accounts
        }
    )
    twins: dict[tuple[int, str], tuple[int, datetime]] = {}
    if keys:
        for row in conn.execute(_MESSAGES_BY_KEY, {"p_keys": keys}):
            twins[(row.account_id, row.idempotency_key)] = (row.id, row.next_attempt_at)

    results: list[Accepted | StoreError | None] = [None] * len(requests)
    new_rows: list[tuple[int, dict[str, Any]]] = []
    first_of_key: dict[tuple[int, str], int] = {}
    for index, request in enumerate(requests):
        account: Any = accounts.get(request.account)
        if account is None:
            results[index] = UnknownAccount(request.account)
            continue
        key = (account.id, request.idempotency_key) if request.idempotency_key else None
        if key is not None and key in twins:
            twin_id, twin_due = twins[key]
            results[index] = Accepted(twin_id, False, account.id, twin_due)
            continue
        if key is not None and key in first_of_key:
            continue  # settled below, from the first request of this key in the call
        from_addr = request.from_addr or account.from_addr
        if not from_addr:
            results[index] = NoSender(account.name)
            continue
        if key is not None:
            first_of_key[key] = index
        new_rows.append((index, _row(request, account.id, from_addr, now=now, window_s=window_s)))

    if new_rows and not first_of_key:
        # No idempotency key, nothing that a concurrent request could collide with.
        ids = _insert(session, new_rows, requests)
    elif new_rows:
        try:
            # A savepoint: a concurrent twin (same key, committed meanwhile) costs a retry
            # of this call's rows one by one, not the caller's whole transaction.
            with session.begin_nested():
                ids = _insert(session, new_rows, requests)
        except IntegrityError:
            ids = _insert_one_by_one(session, new_rows, requests, twins)
    else:
        ids = []
    for (index, new_row), message_id in zip(new_rows, ids, strict=True):
        # A negative id: a concurrent twin's (see _insert_one_by_one).
        results[index] = Accepted(
            abs(message_id), message_id > 0, new_row["account_id"], new_row["next_attempt_at"]
        )

    for index, request in enumerate(requests):
        if results[index] is None:
            account = accounts[request.account]
            first = results[first_of_key[(account.id, request.idempotency_key or "")]]
            assert isinstance(first, Accepted)
            results[index] = Accepted(first.id, False, first.account_id, first.due_at)
    return [r for r in results if r is not None]


def _row(
    request: EmailRequest, account_id: int, from_addr: str, *, now: datetime, window_s: float
) -> dict[str, Any]:
    start = max(now, request.send_at) if request.send_at is not None else now
    deadline = deadline_for(start, window_s)
    return {
        "account_id": account_id,
        "idempotency_key": request.idempotency_key,
        "message_id_header": new_message_id(from_addr, now=now),
        "from_addr": from_addr,
        "reply_to": request.reply_to,
        "to_addrs": list(request.to),
        "cc_addrs": list(request.cc),
        "bcc_addrs": list(request.bcc),
        "subject": request.subject,
        "text_body": request.text,
        "html_body": request.html,
        "headers": [list(h) for h in request.headers],
        "attachment_count": len(request.attachments),
        "size_bytes": request.size_bytes,
        "status": MessageStatus.PENDING.value,
        "priority": request.priority,
        "send_at": request.send_at,
        "created_at": now,
        "updated_at": now,
        "deadline": deadline,
        "next_attempt_at": start,
        # The sweeper itself looks at the message only at its deadline: until then its
        # account's drains carry it (store.drains).
        "due_at": deadline,
        "attempt_count": 0,
        "delivered_to": {},
        "metadata": request.metadata,
        "status_task": request.status_task,
        "status_queue": request.status_queue,
        "event_seq": 1,  # the `accepted` event, written with the row
    }


def _insert(
    session: Session, new_rows: list[tuple[int, dict[str, Any]]], requests: Sequence[EmailRequest]
) -> list[int]:
    conn = session.connection()
    rows = [row for _, row in new_rows]
    ids = [int(r[0]) for r in conn.execute(_INSERT_MESSAGE, rows)]
    attachments = [
        {
            "message_id": message_id,
            "position": position,
            "filename": a.filename,
            "content_type": a.content_type,
            "data": a.data,
        }
        for (index, _), message_id in zip(new_rows, ids, strict=True)
        for position, a in enumerate(requests[index].attachments)
    ]
    if attachments:
        conn.execute(_INSERT_ATTACHMENT, attachments)
    accepted = [
        event_rows(
            [EventDraft(EventType.ACCEPTED, _accepted_data(row))],
            message_id=message_id,
            account_id=row["account_id"],
            last_seq=1,
            publish_due=row["status_task"] is not None,
            at=row["created_at"],
        )[0]
        for (_, row), message_id in zip(new_rows, ids, strict=True)
    ]
    insert_rows(session, accepted)
    return ids


def _accepted_data(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "priority": Priority(row["priority"]).label,
        "send_at": row["send_at"].isoformat() if row["send_at"] else None,
        "deadline": row["deadline"].isoformat(),
    }


def _insert_one_by_one(
    session: Session,
    new_rows: list[tuple[int, dict[str, Any]]],
    requests: Sequence[EmailRequest],
    twins: dict[tuple[int, str], tuple[int, datetime]],
) -> list[int]:
    """The slow path after a key collided with a concurrent request: each row in its own
    savepoint; a twin is returned as a negative id (not created)."""
    out: list[int] = []
    for entry in new_rows:
        row = entry[1]
        try:
            with session.begin_nested():
                out.append(_insert(session, [entry], requests)[0])
        except IntegrityError:
            key = (row["account_id"], row["idempotency_key"])
            existing = session.connection().execute(_MESSAGES_BY_KEY, {"p_keys": [key]}).first()
            if existing is None:
                raise
            twins[key] = (existing.id, existing.next_attempt_at)
            out.append(-int(existing.id))
    return out
