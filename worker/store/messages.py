"""Messages in the database: claim for one sender, record each attempt.

A claim is a compare-and-set UPDATE (still pending, no live lease, due): of two senders
reaching for the same message, exactly one gets the row; the other is a no-op. No
transaction stays open while a message is on the wire. (Accepting mail: store.accept;
an account's batch claim: store.drains.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, or_, select, text, update
from sqlalchemy.orm import Session

from worker.message import Attachment, OutgoingEmail
from worker.store.db import changed_rows
from worker.store.events import EventDraft, append, event_rows, insert_rows
from worker.store.models import AttachmentRow, Attempt, Channel, EventType, MessageStatus, table
from worker.store.models import Message as MessageRow

_MESSAGES = table(MessageRow)
_ATTEMPTS = table(Attempt)
_ATTACHMENTS = table(AttachmentRow)

# The statements of claim and record are built once, on the Core tables, with named
# parameters: building one per call, or letting the ORM plan a flush, costs more CPU than
# the round trip itself; and a value written into a statement (a dict for a JSON column)
# even defeats SQLAlchemy's compiled-statement cache.

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
    #: The caller's task for status events (None: nobody listens by task name).
    status_task: str | None = None

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

#: What a claim returns: everything a sender needs of the message.
CLAIM_RETURNING = tuple(
    _MESSAGES.c[name]
    for name in (
        "id",
        "account_id",
        "attempt_count",
        "deadline",
        "created_at",
        "delivered_to",
        "attachment_count",
        "status_task",
        *EMAIL_COLUMNS,
    )
)
#: What claiming a message writes, for one message or a drain's batch (parameters
#: p_lease_until, p_token, p_now): if the claimer dies, the sweeper looks again when the
#: lease ends, and the attempt is counted (a give-back uncounts it).
CLAIM_VALUES = {
    "lease_until": bindparam("p_lease_until"),
    "lease_token": bindparam("p_token"),
    "due_at": bindparam("p_lease_until"),
    "attempt_count": _MESSAGES.c.attempt_count + 1,
    "updated_at": bindparam("p_now"),
}

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
    .values(CLAIM_VALUES)
    # What a sender needs comes back with the claim: one round trip, not UPDATE + SELECT.
    .returning(*CLAIM_RETURNING)
)

_ATTACHMENTS_OF = (
    select(
        _ATTACHMENTS.c.message_id,
        _ATTACHMENTS.c.filename,
        _ATTACHMENTS.c.content_type,
        _ATTACHMENTS.c.data,
    )
    .where(_ATTACHMENTS.c.message_id.in_(bindparam("p_ids", expanding=True)))
    .order_by(_ATTACHMENTS.c.message_id, _ATTACHMENTS.c.position)
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
    # The events this change writes take the next numbers (store.events).
    "event_seq": _MESSAGES.c.event_seq + bindparam("p_event_count"),
}
#: What a record returns to number and route its events.
RECORD_RETURNING = (
    _MESSAGES.c.id,
    _MESSAGES.c.account_id,
    _MESSAGES.c.event_seq,
    _MESSAGES.c.status_task,
)
_RECORD = (
    update(_MESSAGES)
    .where(_MESSAGES.c.id == bindparam("p_id"), _MESSAGES.c.lease_token == bindparam("p_token"))
    .values(RECORD_VALUES)
    .returning(*RECORD_RETURNING)
)
#: Mail that went out is recorded as sent even if the lease was lost meanwhile.
_RECORD_SENT_WITHOUT_LEASE = (
    update(_MESSAGES)
    .where(
        _MESSAGES.c.id == bindparam("p_id"),
        _MESSAGES.c.status == MessageStatus.PENDING.value,
    )
    .values(RECORD_VALUES)
    .returning(*RECORD_RETURNING)
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
    return claimed_from_rows(session, [row], token=token, lease_until=lease_until)[0]


def claimed_from_rows(
    session: Session, rows: Sequence[Any], *, token: str, lease_until: datetime
) -> list[Claimed]:
    """`Claimed` messages from the rows a claim returned, in their order; the attachments
    of all of them read in one query (none when none has any)."""
    with_files = [row.id for row in rows if row.attachment_count]
    files: dict[int, list[Attachment]] = {}
    if with_files:
        for a in session.connection().execute(_ATTACHMENTS_OF, {"p_ids": with_files}):
            files.setdefault(a.message_id, []).append(
                Attachment(filename=a.filename, content_type=a.content_type, data=a.data)
            )
    return [
        _claimed(row, tuple(files.get(row.id, ())), token=token, lease_until=lease_until)
        for row in rows
    ]


def _claimed(
    row: Any, attachments: tuple[Attachment, ...], *, token: str, lease_until: datetime
) -> Claimed:
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
        status_task=row.status_task,
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
    #: The events this change means for the sender (deferred, sent, failed...).
    events: tuple[EventDraft, ...] = ()


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
    changed = conn.execute(_RECORD, params).first()
    owned = changed is not None
    if not owned and update_.status == MessageStatus.SENT.value:
        changed = conn.execute(_RECORD_SENT_WITHOUT_LEASE, params).first()
    conn.execute(_UPSERT_ATTEMPT, attempt_params(claimed, attempt))
    if changed is not None:  # events only for a change that happened
        insert_rows(
            session,
            event_rows(
                update_.events,
                message_id=changed.id,
                account_id=changed.account_id,
                last_seq=changed.event_seq,
                publish_due=changed.status_task is not None,
                at=now,
            ),
        )
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
        "p_event_count": len(update_.events),
    }


def attempt_params(claimed: Claimed, attempt: AttemptRecord) -> dict[str, Any]:
    """One `attempts` row: the claim's attempt number and the attempt's fields."""
    return {
        "message_id": claimed.id,
        "number": claimed.attempt_number,
        **{name: getattr(attempt, name) for name in ATTEMPT_FIELDS},
    }


_SETTLE = (
    update(_MESSAGES)
    .where(_MESSAGES.c.id == bindparam("p_id"), _MESSAGES.c.lease_token == bindparam("p_token"))
    .values(
        status=bindparam("p_status"),
        finished_at=bindparam("p_now"),
        updated_at=bindparam("p_now"),
        lease_until=None,
        lease_token=None,
        attempt_count=_MESSAGES.c.attempt_count - 1,
    )
)


def settle_without_sending(session: Session, claimed: Claimed, *, now: datetime) -> str:
    """Every recipient was settled by earlier attempts and only the status lagged: end the
    message (sent if anyone got it, else failed) without counting an attempt."""
    from worker.decide import is_sent

    any_sent = any(is_sent(v) for v in claimed.delivered_to.values())
    status = MessageStatus.SENT.value if any_sent else MessageStatus.FAILED.value
    changed = changed_rows(
        session.connection().execute(
            _SETTLE,
            {"p_id": claimed.id, "p_token": claimed.token, "p_status": status, "p_now": now},
        )
    )
    # A `sent` event already went out with each delivery; only an end in failure is news.
    if changed and status == MessageStatus.FAILED.value:
        append(
            session,
            claimed.id,
            [EventDraft(EventType.FAILED, {"reason": "Every recipient was refused."})],
            now=now,
        )
    return status


def attempts_through(session: Session, message_id: int, channel: Channel) -> int:
    """How many attempts of the message went through this channel (its backup tries)."""
    count = session.scalar(
        select(func.count())
        .select_from(Attempt)
        .where(Attempt.message_id == message_id, Attempt.channel == channel.value)
    )
    return int(count or 0)
