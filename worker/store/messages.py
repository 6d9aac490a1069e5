"""Messages in the database: accept once, claim for one sender, record each attempt.

The claim is a compare-and-set UPDATE (still pending, no live lease, due): of two
deliveries of the same wake-up, exactly one gets the row; the other is a no-op. No
transaction stays open while a message is on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, text, update
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
    table,
)
from worker.store.models import Message as MessageRow


@dataclass(frozen=True)
class Accepted:
    id: int
    created: bool  #: False when the idempotency key matched an earlier request


_ACCOUNTS = table(Account)
_MESSAGES = table(MessageRow)
_ATTEMPTS = table(Attempt)
_ATTACHMENTS = table(AttachmentRow)

# The statements of intake, claim and record are built once, on the Core tables, with
# named parameters: building one per call, or letting the ORM plan a flush, cost more CPU
# than the round trip itself (bench/profile_deliver.py); and a value written into a
# statement (a dict for a JSON column) even defeats SQLAlchemy's compiled-statement cache.

_ACCOUNT_BY_NAME = select(_ACCOUNTS.c.id, _ACCOUNTS.c.name, _ACCOUNTS.c.from_addr).where(
    _ACCOUNTS.c.name == bindparam("p_name")
)
_MESSAGE_BY_KEY = select(_MESSAGES.c.id).where(
    _MESSAGES.c.account_id == bindparam("p_account_id"),
    _MESSAGES.c.idempotency_key == bindparam("p_key"),
)
#: The columns that hold the email itself (what `outgoing_email` reads).
EMAIL_COLUMNS = (
    "message_id_header",
    "from_addr",
    "reply_to",
    "to_addrs",
    "cc_addrs",
    "bcc_addrs",
    "subject",
    "text_body",
    "html_body",
    "headers",
)
_NEW_MESSAGE_FIELDS = (
    "account_id",
    "idempotency_key",
    *EMAIL_COLUMNS,
    "attachment_count",
    "size_bytes",
    "status",
    "created_at",
    "updated_at",
    "deadline",
    "next_attempt_at",
    "due_at",
    "attempt_count",
    "delivered_to",
)
_INSERT_MESSAGE = (
    insert(_MESSAGES)
    .values({name: bindparam(name, type_=_MESSAGES.c[name].type) for name in _NEW_MESSAGE_FIELDS})
    .returning(_MESSAGES.c.id)
)
_INSERT_ATTACHMENT = insert(_ATTACHMENTS)


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
    conn = session.connection()
    account = conn.execute(_ACCOUNT_BY_NAME, {"p_name": request.account}).first()
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
    row = {
        "account_id": account.id,
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
        "created_at": now,
        "updated_at": now,
        "deadline": deadline_for(now, window_s),
        "next_attempt_at": now,
        "due_at": now + timedelta(seconds=wake_grace_s),
        "attempt_count": 0,
        "delivered_to": {},
    }
    if request.idempotency_key is None:
        # No key, no twin to find: an IntegrityError could only be re-raised anyway, so
        # the savepoint (two round trips) buys nothing.
        return Accepted(_insert(session, row, request), created=True)
    try:
        # A savepoint, so a concurrent twin with the same key costs a re-read, not the
        # caller's whole transaction.
        with session.begin_nested():
            message_id = _insert(session, row, request)
    except IntegrityError:
        existing = _by_key(session, account.id, request.idempotency_key)
        if existing is None:
            raise
        return Accepted(existing, created=False)
    return Accepted(message_id, created=True)


def _insert(session: Session, row: dict[str, Any], request: EmailRequest) -> int:
    conn = session.connection()
    message_id = int(conn.execute(_INSERT_MESSAGE, row).scalar_one())
    if request.attachments:
        conn.execute(
            _INSERT_ATTACHMENT,
            [
                {
                    "message_id": message_id,
                    "position": i,
                    "filename": a.filename,
                    "content_type": a.content_type,
                    "data": a.data,
                }
                for i, a in enumerate(request.attachments)
            ],
        )
    return message_id


def _by_key(session: Session, account_id: int, key: str) -> int | None:
    return (
        session.connection()
        .execute(_MESSAGE_BY_KEY, {"p_account_id": account_id, "p_key": key})
        .scalar()
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


#: A wake-up (a countdown) that fires this much early still counts as due: clock skew
#: between hosts.
EARLY_TOLERANCE_S = 1.0

#: The compare-and-set claim (parameters p_id, p_now, p_due_by, p_lease_until, p_token);
#: also the first part of store.sending's one-statement claim.
CLAIM = (
    update(_MESSAGES)
    .where(
        _MESSAGES.c.id == bindparam("p_id"),
        _MESSAGES.c.status == MessageStatus.PENDING.value,
        or_(_MESSAGES.c.lease_until.is_(None), _MESSAGES.c.lease_until < bindparam("p_now")),
        _MESSAGES.c.next_attempt_at <= bindparam("p_due_by"),
    )
    .values(
        lease_until=bindparam("p_lease_until"),
        lease_token=bindparam("p_token"),
        # If this worker dies, the sweeper looks again when the lease ends.
        due_at=bindparam("p_lease_until"),
        attempt_count=_MESSAGES.c.attempt_count + 1,
        updated_at=bindparam("p_now"),
    )
    # What a sender needs comes back with the claim: one round trip, not UPDATE + SELECT.
    .returning(
        *(
            _MESSAGES.c[name]
            for name in (
                "id",
                "account_id",
                "attempt_count",
                "deadline",
                "created_at",
                "delivered_to",
                "attachment_count",
                *EMAIL_COLUMNS,
            )
        )
    )
)

_ATTACHMENTS_OF = (
    select(_ATTACHMENTS.c.filename, _ATTACHMENTS.c.content_type, _ATTACHMENTS.c.data)
    .where(_ATTACHMENTS.c.message_id == bindparam("p_id"))
    .order_by(_ATTACHMENTS.c.position)
)

_WHY_NOT = select(_MESSAGES.c.status, _MESSAGES.c.lease_until, _MESSAGES.c.next_attempt_at).where(
    _MESSAGES.c.id == bindparam("p_id")
)

_RELEASE = (
    update(_MESSAGES)
    .where(_MESSAGES.c.id == bindparam("p_id"), _MESSAGES.c.lease_token == bindparam("p_token"))
    .values(
        lease_until=None,
        lease_token=None,
        attempt_count=_MESSAGES.c.attempt_count - 1,
        next_attempt_at=bindparam("p_next_attempt_at"),
        due_at=bindparam("p_due_at"),
        updated_at=bindparam("p_now"),
    )
)

#: The state after an attempt; `next_attempt_at`, `due_at` and `sent_via` keep their old
#: value when given NULL (a finished message has no next attempt).
RECORD_VALUES = {
    "status": bindparam("p_status"),
    "lease_until": None,
    "lease_token": None,
    "updated_at": bindparam("p_now"),
    "finished_at": bindparam("p_finished_at"),
    "delivered_to": bindparam("p_delivered_to", type_=_MESSAGES.c.delivered_to.type),
    "last_verdict": bindparam("p_last_verdict"),
    "last_code": bindparam("p_last_code"),
    "last_enhanced": bindparam("p_last_enhanced"),
    "last_error": bindparam("p_last_error"),
    "sent_via": func.coalesce(
        bindparam("p_sent_via", type_=_MESSAGES.c.sent_via.type), _MESSAGES.c.sent_via
    ),
    "next_attempt_at": func.coalesce(
        bindparam("p_next_attempt_at", type_=_MESSAGES.c.next_attempt_at.type),
        _MESSAGES.c.next_attempt_at,
    ),
    "due_at": func.coalesce(
        bindparam("p_due_at", type_=_MESSAGES.c.due_at.type), _MESSAGES.c.due_at
    ),
}
_RECORD = (
    update(_MESSAGES)
    .where(_MESSAGES.c.id == bindparam("p_id"), _MESSAGES.c.lease_token == bindparam("p_token"))
    .values(RECORD_VALUES)
)
#: Mail that went out is recorded as sent even if the lease was lost meanwhile.
_RECORD_SENT_WITHOUT_LEASE = (
    update(_MESSAGES)
    .where(
        _MESSAGES.c.id == bindparam("p_id"),
        _MESSAGES.c.status == MessageStatus.PENDING.value,
    )
    .values(RECORD_VALUES)
)

#: The columns of an `attempts` row that an `AttemptRecord` fills.
ATTEMPT_FIELDS = (
    "channel",
    "started_at",
    "finished_at",
    "outcome",
    "verdict",
    "stage",
    "reply_code",
    "enhanced_code",
    "server_text",
    "recipients",
    "provider_message_id",
    "worker",
)


#: If the sweeper already wrote this attempt as interrupted, the real result wins: one
#: INSERT ... ON CONFLICT DO UPDATE, no savepoint. Written as text because SQLAlchemy never
#: caches its dialect-specific ON CONFLICT constructs (they would compile on every call);
#: PostgreSQL and SQLite share this syntax.
_UPSERT_ATTEMPT = text(
    f"INSERT INTO attempts (message_id, number, {', '.join(ATTEMPT_FIELDS)}) "
    f"VALUES (:message_id, :number, {', '.join(':' + name for name in ATTEMPT_FIELDS)}) "
    "ON CONFLICT (message_id, number) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in ATTEMPT_FIELDS)
).bindparams(
    *(
        bindparam(name, type_=_ATTEMPTS.c[name].type)
        for name in ("message_id", "number", *ATTEMPT_FIELDS)
    )
)


def claim(
    session: Session,
    message_id: int,
    *,
    now: datetime,
    lease_s: float,
    token: str,
    early_tolerance_s: float = EARLY_TOLERANCE_S,
) -> Claimed | NotClaimed:
    """Take the message for one attempt, or say why not.

    `early_tolerance_s` lets a countdown that fires a little early (clock skew between
    hosts) still count as due.
    """
    lease_until = now + timedelta(seconds=lease_s)
    row = (
        session.connection()
        .execute(
            CLAIM,
            {
                "p_id": message_id,
                "p_now": now,
                "p_due_by": now + timedelta(seconds=early_tolerance_s),
                "p_lease_until": lease_until,
                "p_token": token,
            },
        )
        .one_or_none()
    )
    if row is None:
        return why_not(session, message_id, now=now)
    return claimed_from_row(session, row, token=token, lease_until=lease_until)


def claimed_from_row(session: Session, row: Any, *, token: str, lease_until: datetime) -> Claimed:
    """What a sender needs, from the row the claim returned (attachments read if any)."""
    attachments: tuple[Attachment, ...] = ()
    if row.attachment_count:
        attachments = tuple(
            Attachment(filename=a.filename, content_type=a.content_type, data=a.data)
            for a in session.connection().execute(_ATTACHMENTS_OF, {"p_id": row.id})
        )
    email = outgoing_email(row, attachments)
    done = dict(row.delivered_to or {})
    return Claimed(
        id=row.id,
        token=token,
        attempt_number=row.attempt_count,
        account_id=row.account_id,
        email=email,
        recipients=tuple(r for r in email.recipients if r not in done),
        delivered_to=done,
        deadline=row.deadline,
        created_at=row.created_at,
        lease_until=lease_until,
    )


def outgoing_email(row: Any, attachments: tuple[Attachment, ...]) -> OutgoingEmail:
    """The email held in a `messages` row (an ORM object or a Core row: same names)."""
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


def why_not(session: Session, message_id: int, *, now: datetime) -> NotClaimed:
    row = session.connection().execute(_WHY_NOT, {"p_id": message_id}).first()
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
    session.connection().execute(
        _RELEASE,
        {
            "p_id": claimed.id,
            "p_token": claimed.token,
            "p_next_attempt_at": next_attempt_at,
            "p_due_at": due_at,
            "p_now": now,
        },
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
    conn = session.connection()
    params = record_params(claimed, update_, now=now)
    owned = bool(changed_rows(conn.execute(_RECORD, params)))
    if not owned and update_.status == MessageStatus.SENT.value:
        conn.execute(_RECORD_SENT_WITHOUT_LEASE, params)
    conn.execute(_UPSERT_ATTEMPT, attempt_params(claimed, attempt))
    return owned


def record_params(claimed: Claimed, update_: MessageUpdate, *, now: datetime) -> dict[str, Any]:
    """The parameters of `RECORD_VALUES` (and of the claim's token check)."""
    pending = update_.status == MessageStatus.PENDING.value
    if pending:
        assert update_.next_attempt_at is not None and update_.due_at is not None
    return {
        "p_id": claimed.id,
        "p_token": claimed.token,
        "p_status": update_.status,
        "p_now": now,
        "p_finished_at": None if pending else now,
        "p_delivered_to": update_.delivered_to,
        "p_last_verdict": update_.last_verdict,
        "p_last_code": update_.last_code,
        "p_last_enhanced": update_.last_enhanced,
        "p_last_error": update_.last_error,
        "p_sent_via": update_.sent_via,
        "p_next_attempt_at": update_.next_attempt_at if pending else None,
        "p_due_at": update_.due_at if pending else None,
    }


def attempt_params(claimed: Claimed, attempt: AttemptRecord) -> dict[str, Any]:
    """One `attempts` row: the claim's attempt number and the attempt's fields."""
    return {
        "message_id": claimed.id,
        "number": claimed.attempt_number,
        **{name: getattr(attempt, name) for name in ATTEMPT_FIELDS},
    }


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
