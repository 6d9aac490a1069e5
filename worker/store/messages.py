"""Messages in the database: accept once, claim for one sender, record each attempt.

The claim is a compare-and-set UPDATE (still pending, no live lease, due): of two
deliveries of the same wake-up, exactly one gets the row; the other is a no-op. No
transaction stays open while a message is on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.intake import EmailRequest, FieldError, InvalidRequest, deadline_for, new_message_id
from worker.message import Attachment, OutgoingEmail
from worker.store.db import changed_rows
from worker.store.models import (
    Account,
    AttachmentRow,
    Attempt,
    MessageStatus,
)
from worker.store.models import Message as MessageRow


@dataclass(frozen=True)
class Accepted:
    id: int
    created: bool  #: False when the idempotency key matched an earlier request


def accept(
    session: Session,
    request: EmailRequest,
    *,
    now: datetime,
    window_s: float,
    wake_grace_s: float,
) -> Accepted:
    """Store a validated request (or find its twin by idempotency key).

    The caller wakes the worker after commit; if that wake-up is lost, the sweeper
    finds the message once `due_at` (now + grace) has passed.
    """
    account = session.scalar(select(Account).where(Account.name == request.account))
    if account is None:
        raise InvalidRequest([FieldError("account", f"no account named {request.account!r}")])
    if request.idempotency_key is not None:
        existing = _by_key(session, account.id, request.idempotency_key)
        if existing is not None:
            return Accepted(existing, created=False)
    from_addr = request.from_addr or account.from_addr
    if not from_addr:
        raise InvalidRequest(
            [FieldError("from_addr", f"is required: account {account.name!r} has no default From")]
        )
    row = MessageRow(
        account_id=account.id,
        idempotency_key=request.idempotency_key,
        message_id_header=new_message_id(from_addr, now=now),
        from_addr=from_addr,
        reply_to=request.reply_to,
        to_addrs=list(request.to),
        cc_addrs=list(request.cc),
        bcc_addrs=list(request.bcc),
        subject=request.subject,
        text_body=request.text,
        html_body=request.html,
        headers=[list(h) for h in request.headers],
        attachment_count=len(request.attachments),
        size_bytes=request.size_bytes,
        status=MessageStatus.PENDING.value,
        created_at=now,
        updated_at=now,
        deadline=deadline_for(now, window_s),
        next_attempt_at=now,
        due_at=now + timedelta(seconds=wake_grace_s),
        attempt_count=0,
        delivered_to={},
    )
    row.attachments = [
        AttachmentRow(position=i, filename=a.filename, content_type=a.content_type, data=a.data)
        for i, a in enumerate(request.attachments)
    ]
    if request.idempotency_key is None:
        # No key, no twin to find: an IntegrityError could only be re-raised anyway, so
        # the savepoint (two round trips) buys nothing.
        session.add(row)
        session.flush()
        return Accepted(row.id, created=True)
    try:
        # A savepoint, so a concurrent twin with the same key costs a re-read, not the
        # caller's whole transaction.
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        existing = (
            _by_key(session, account.id, request.idempotency_key)
            if request.idempotency_key
            else None
        )
        if existing is None:
            raise
        return Accepted(existing, created=False)
    return Accepted(row.id, created=True)


def _by_key(session: Session, account_id: int, key: str) -> int | None:
    return session.scalar(
        select(MessageRow.id).where(
            MessageRow.account_id == account_id, MessageRow.idempotency_key == key
        )
    )


@dataclass(frozen=True)
class Claimed:
    """A message this worker now holds a lease on, with all it needs to send it."""

    id: int
    token: str
    attempt_number: int
    account_id: int
    email: OutgoingEmail
    #: Envelope recipients still to deliver (those not accepted by an earlier attempt).
    recipients: tuple[str, ...]
    delivered_to: dict[str, Any]
    deadline: datetime
    created_at: datetime
    lease_until: datetime

    def record_time_s(self, now: datetime) -> float:
        """How long recording this attempt may keep retrying: until shortly before the
        lease ends (after it, the sweeper may hand the message to another worker)."""
        left = (self.lease_until - now).total_seconds()
        # Keep a margin for the last try's own round trip: a tenth, at most 10 s.
        return max(1.0, left - min(10.0, left / 10))


@dataclass(frozen=True)
class NotClaimed:
    """Why a wake-up found nothing to do."""

    reason: str  #: "missing" | "sent" | "failed" | "cancelled" | "leased" | "not_due"
    next_attempt_at: datetime | None = None
    status: str | None = None


def claim(
    session: Session,
    message_id: int,
    *,
    now: datetime,
    lease_s: float,
    token: str,
    early_tolerance_s: float = 1.0,
) -> Claimed | NotClaimed:
    """Take the message for one attempt, or say why not.

    `early_tolerance_s` lets a countdown that fires a little early (clock skew between
    hosts) still count as due.
    """
    lease_until = now + timedelta(seconds=lease_s)
    stmt = (
        update(MessageRow)
        .where(
            MessageRow.id == message_id,
            MessageRow.status == MessageStatus.PENDING.value,
            or_(MessageRow.lease_until.is_(None), MessageRow.lease_until < now),
            MessageRow.next_attempt_at <= now + timedelta(seconds=early_tolerance_s),
        )
        .values(
            lease_until=lease_until,
            lease_token=token,
            # If this worker dies, the sweeper looks again when the lease ends.
            due_at=lease_until,
            attempt_count=MessageRow.attempt_count + 1,
            updated_at=now,
        )
        # The whole row comes back with the claim: one round trip, not UPDATE + SELECT.
        .returning(MessageRow)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    row = session.scalars(stmt).one_or_none()
    if row is None:
        return _why_not(session, message_id, now=now)
    return _claimed(row, token=token, attempt_number=row.attempt_count, lease_until=lease_until)


def _claimed(row: MessageRow, *, token: str, attempt_number: int, lease_until: datetime) -> Claimed:
    attachments: tuple[Attachment, ...] = ()
    if row.attachment_count:
        attachments = tuple(
            Attachment(filename=a.filename, content_type=a.content_type, data=a.data)
            for a in row.attachments
        )
    email = outgoing_email(row, attachments)
    done = dict(row.delivered_to or {})
    remaining = tuple(r for r in email.recipients if r not in done)
    return Claimed(
        id=row.id,
        token=token,
        attempt_number=attempt_number,
        account_id=row.account_id,
        email=email,
        recipients=remaining,
        delivered_to=done,
        deadline=row.deadline,
        created_at=row.created_at,
        lease_until=lease_until,
    )


def outgoing_email(row: MessageRow, attachments: tuple[Attachment, ...]) -> OutgoingEmail:
    return OutgoingEmail(
        message_id=row.message_id_header,
        from_addr=row.from_addr,
        to=tuple(row.to_addrs),
        cc=tuple(row.cc_addrs or ()),
        bcc=tuple(row.bcc_addrs or ()),
        reply_to=row.reply_to,
        subject=row.subject,
        text=row.text_body,
        html=row.html_body,
        headers=tuple((h[0], h[1]) for h in row.headers or ()),
        attachments=attachments,
        date=row.created_at,
    )


def _why_not(session: Session, message_id: int, *, now: datetime) -> NotClaimed:
    row = session.execute(
        select(MessageRow.status, MessageRow.lease_until, MessageRow.next_attempt_at).where(
            MessageRow.id == message_id
        )
    ).first()
    if row is None:
        return NotClaimed("missing")
    status, lease_until, next_at = row
    if status != MessageStatus.PENDING.value:
        return NotClaimed(status, status=status)
    if lease_until is not None and lease_until >= now:
        return NotClaimed("leased", next_attempt_at=next_at, status=status)
    return NotClaimed("not_due", next_attempt_at=next_at, status=status)


def release(
    session: Session,
    claimed: Claimed,
    *,
    now: datetime,
    next_attempt_at: datetime,
    due_at: datetime,
) -> None:
    """Give the lease back without counting an attempt (no connection slot, circuit open)."""
    session.execute(
        update(MessageRow)
        .where(MessageRow.id == claimed.id, MessageRow.lease_token == claimed.token)
        .values(
            lease_until=None,
            lease_token=None,
            attempt_count=MessageRow.attempt_count - 1,
            next_attempt_at=next_attempt_at,
            due_at=due_at,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )


@dataclass
class AttemptRecord:
    """One finished attempt, ready to be written with the message's new state."""

    channel: str
    started_at: datetime
    finished_at: datetime
    outcome: str
    verdict: str | None
    stage: str | None
    reply_code: int | None
    enhanced_code: str | None
    server_text: str | None
    recipients: dict[str, Any] | None = None
    provider_message_id: str | None = None
    worker: str | None = None


@dataclass
class MessageUpdate:
    """The message's state after an attempt."""

    status: str
    next_attempt_at: datetime | None = None
    due_at: datetime | None = None
    sent_via: str | None = None
    delivered_to: dict[str, Any] = field(default_factory=dict)
    last_verdict: str | None = None
    last_code: int | None = None
    last_enhanced: str | None = None
    last_error: str | None = None


def record(
    session: Session,
    claimed: Claimed,
    attempt: AttemptRecord,
    update_: MessageUpdate,
    *,
    now: datetime,
) -> bool:
    """Write the attempt and the message's new state in one transaction.

    Returns False when the lease had been lost (the send outlived it and the sweeper
    freed the message): the attempt is still written, and a delivery is still recorded
    as sent, but a retry schedule from a stale holder is not.
    """
    values: dict[str, Any] = {
        "status": update_.status,
        "lease_until": None,
        "lease_token": None,
        "updated_at": now,
        "delivered_to": update_.delivered_to,
        "last_verdict": update_.last_verdict,
        "last_code": update_.last_code,
        "last_enhanced": update_.last_enhanced,
        "last_error": update_.last_error,
    }
    if update_.sent_via is not None:
        values["sent_via"] = update_.sent_via
    if update_.status == MessageStatus.PENDING.value:
        assert update_.next_attempt_at is not None and update_.due_at is not None
        values["next_attempt_at"] = update_.next_attempt_at
        values["due_at"] = update_.due_at
    else:
        values["finished_at"] = now
    result = session.execute(
        update(MessageRow)
        .where(MessageRow.id == claimed.id, MessageRow.lease_token == claimed.token)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    owned = bool(changed_rows(result))
    if not owned and update_.status == MessageStatus.SENT.value:
        # Mail that went out is recorded as sent even if the lease was lost meanwhile.
        session.execute(
            update(MessageRow)
            .where(MessageRow.id == claimed.id, MessageRow.status == MessageStatus.PENDING.value)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    _write_attempt(session, claimed, attempt)
    return owned


def _write_attempt(session: Session, claimed: Claimed, attempt: AttemptRecord) -> None:
    fields = {
        "channel": attempt.channel,
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
        "outcome": attempt.outcome,
        "verdict": attempt.verdict,
        "stage": attempt.stage,
        "reply_code": attempt.reply_code,
        "enhanced_code": attempt.enhanced_code,
        "server_text": attempt.server_text,
        "recipients": attempt.recipients,
        "provider_message_id": attempt.provider_message_id,
        "worker": attempt.worker,
    }
    # If the sweeper already wrote this attempt as interrupted, the real result wins:
    # one INSERT ... ON CONFLICT DO UPDATE; no savepoint round trips, no ORM flush.
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(Attempt).values(message_id=claimed.id, number=claimed.attempt_number, **fields)
    session.execute(
        stmt.on_conflict_do_update(index_elements=["message_id", "number"], set_=fields)
    )


def due_of_account(
    session: Session, account_id: int, *, now: datetime, limit: int = 10_000
) -> list[int]:
    """Pending messages of the account that may be tried now (and nobody holds)."""
    return list(
        session.scalars(
            select(MessageRow.id)
            .where(
                and_(
                    MessageRow.account_id == account_id,
                    MessageRow.status == MessageStatus.PENDING.value,
                    MessageRow.next_attempt_at <= now,
                    or_(MessageRow.lease_until.is_(None), MessageRow.lease_until < now),
                )
            )
            .order_by(MessageRow.id)
            .limit(limit)
        )
    )
