"""The database schema: accounts, messages, attempts, incidents and SMTP connection slots.

The database is the source of truth; a Celery message is only a wake-up call. Every
time here is timezone-aware UTC (`UTCDateTime` keeps it so on SQLite too).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from worker.smtp import TlsMode

#: Integer ids that are 64-bit on PostgreSQL and rowid aliases on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the backend stores."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class MessageStatus(StrEnum):
    PENDING = "pending"  #: accepted, not yet delivered; being retried
    SENT = "sent"  #: accepted by the account's server or the backup provider
    FAILED = "failed"  #: ended without delivery; `last_error` says why
    CANCELLED = "cancelled"  #: an operator cancelled it before it was sent


class Channel(StrEnum):
    SMTP = "smtp"  #: the account's own SMTP server
    BACKUP = "backup"  #: the backup provider's HTTP API


class Priority(IntEnum):
    """Order within an account's queue: lower goes first.

    Stored as its number, not its name, because the drain's claim orders by it through an
    index (`ix_messages_account_queue`); callers and operators only ever see the names.
    """

    HIGH = 0  #: password resets, sign-in codes: ahead of everything else of the account
    NORMAL = 1  #: the default
    BULK = 2  #: newsletters and campaigns: after the account's other mail

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Priority:
        return cls[label.upper()]


class AttemptOutcome(StrEnum):
    SENT = "sent"  #: delivered (possibly with some recipients refused)
    DEFERRED = "deferred"  #: transient failure; will be retried
    FAILED = "failed"  #: permanent failure; the message ends failed
    INTERRUPTED = "interrupted"  #: the worker died mid-attempt (lease expired)


class Base(DeclarativeBase):
    pass


def table(model: type[Base]) -> Table:
    """A model's Core table, typed as one (`__table__` is typed as any FromClause): the
    hot paths build their statements on tables, not on the ORM."""
    return cast(Table, model.__table__)


def _now() -> datetime:
    return datetime.now(UTC)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    smtp_host: Mapped[str] = mapped_column(String(255))
    smtp_port: Mapped[int] = mapped_column(Integer)
    smtp_username: Mapped[str | None] = mapped_column(String(255))
    #: Fernet token; never the plaintext (see worker.crypto).
    smtp_password_encrypted: Mapped[str | None] = mapped_column(Text)
    tls_mode: Mapped[str] = mapped_column(String(16), default=TlsMode.STARTTLS.value)
    #: `tls_mode=none` to a non-loopback host needs this explicit opt-in.
    allow_plaintext: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Extra CA (PEM) trusted for this account's relay, for private CAs.
    ca_pem: Mapped[str | None] = mapped_column(Text)
    from_addr: Mapped[str | None] = mapped_column(String(512))
    notify_email: Mapped[str | None] = mapped_column(String(320))
    notify_webhook: Mapped[str | None] = mapped_column(String(2048))
    max_connections: Mapped[int] = mapped_column(Integer, default=2)
    #: The account's own status-events webhook (else the global OUTBOX_EVENTS_WEBHOOK).
    events_webhook: Mapped[str | None] = mapped_column(String(2048))
    #: Its `whsec_` secret, a Fernet token like the SMTP password; never the plaintext.
    events_secret_encrypted: Mapped[str | None] = mapped_column(Text)
    #: The account's From is verified at the backup provider, so fallback mail keeps it.
    backup_verified: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Bumped whenever SMTP settings change: cached connections of older versions close.
    settings_version: Mapped[int] = mapped_column(Integer, default=1)
    #: The server asked us to slow down (421, 4.7.x): no new session before this time.
    throttle_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Consecutive slow-down requests; the pause doubles with each, and resets on success.
    throttle_level: Mapped[int] = mapped_column(Integer, default=0)
    #: A drain of this account will start soon: a wake-up was published and not yet taken,
    #: or every connection slot was busy and a running drain will look again when it ends.
    #: Intake publishes a wake-up only when this is empty or stale (worker.store.drains).
    drain_queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: A wake-up is scheduled on the broker (a countdown) for this time: the account's
    #: earliest retry or scheduled send; later intake for that time needs no second one.
    drain_timer_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now, onupdate=_now)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("account_id", "idempotency_key", name="uq_messages_account_idempotency"),
        # "What is due now" walks only pending rows in due order: O(due), not O(table).
        Index(
            "ix_messages_pending_due",
            "due_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index("ix_messages_account_status", "account_id", "status"),
        Index("ix_messages_created_at", "created_at"),
        # The drain's claim: an account's pending mail in send order.
        Index(
            "ix_messages_account_queue",
            "account_id",
            "priority",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # "Has the account mail due now, and when is its next?" (sweeper, end of a drain).
        Index(
            "ix_messages_account_next",
            "account_id",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # The lease keeper renews, and a drain gives back, the messages of one lease.
        Index(
            "ix_messages_lease_token",
            "lease_token",
            postgresql_where=text("lease_token IS NOT NULL"),
            sqlite_where=text("lease_token IS NOT NULL"),
        ),
        # Finishes in time order: the exporter's counters read only the recent ones
        # (worker.store.metrics), and purge finds what is old enough without a table scan.
        Index(
            "ix_messages_finished_at",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
            sqlite_where=text("finished_at IS NOT NULL"),
        ),
        CheckConstraint("priority BETWEEN 0 AND 2", name="ck_messages_priority"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    #: The RFC 5322 Message-ID, fixed at intake and sent with every attempt.
    message_id_header: Mapped[str] = mapped_column(String(255))
    from_addr: Mapped[str] = mapped_column(String(512))
    reply_to: Mapped[str | None] = mapped_column(String(512))
    to_addrs: Mapped[list[str]] = mapped_column(JSON)
    cc_addrs: Mapped[list[str]] = mapped_column(JSON, default=list)
    bcc_addrs: Mapped[list[str]] = mapped_column(JSON, default=list)
    subject: Mapped[str] = mapped_column(Text)
    text_body: Mapped[str | None] = mapped_column(Text)
    html_body: Mapped[str | None] = mapped_column(Text)
    #: Extra headers as [[name, value], ...], in the caller's order.
    headers: Mapped[list[list[str]]] = mapped_column(JSON, default=list)
    attachment_count: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)

    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.PENDING.value)
    #: `Priority` as its number (see there why).
    priority: Mapped[int] = mapped_column(SmallInteger, default=Priority.NORMAL.value)
    #: The caller's "not before" time, if any (the window starts then); shown to people.
    send_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The caller's `metadata` object, returned in every event ("metadata" is a name
    #: SQLAlchemy's declarative classes keep for themselves).
    caller_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    #: The caller's task that receives this mail's events by name, and its queue.
    status_task: Mapped[str | None] = mapped_column(String(200))
    status_queue: Mapped[str | None] = mapped_column(String(200))
    #: The last event's sequence number (events.seq), bumped with each change.
    event_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    sent_via: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    #: The first moment SMTP may be tried (created_at, or send_at) + the retry window:
    #: past it, the backup provider takes over.
    deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The earliest moment the next attempt may run (what people are shown).
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: When the sweeper must look at this message itself if nothing else has: the end of
    #: its lease (the worker may have died), its deadline (the backup's turn), or a grace
    #: period after a backup hand-off was published. Its account's drains wake up without
    #: it: they follow `next_attempt_at` (worker.store.drains).
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_token: Mapped[str | None] = mapped_column(String(64))
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    #: Recipients already settled by an earlier attempt: {address: {"outcome": "sent" |
    #: "refused", "code": ..., "enhanced": ..., "text": ..., "verdict": ...}}. Retries go
    #: only to the others, so a greylisted Cc never makes the To receive a second copy.
    delivered_to: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The latest failure, for lists and the "why is it pending" question.
    last_verdict: Mapped[str | None] = mapped_column(String(16))
    last_code: Mapped[int | None] = mapped_column(Integer)
    last_enhanced: Mapped[str | None] = mapped_column(String(16))
    last_error: Mapped[str | None] = mapped_column(Text)

    account: Mapped[Account] = relationship(lazy="joined")
    attachments: Mapped[list[AttachmentRow]] = relationship(
        order_by="AttachmentRow.position", cascade="all, delete-orphan", lazy="select"
    )
    attempts: Mapped[list[Attempt]] = relationship(
        order_by="Attempt.number", cascade="all, delete-orphan", lazy="select"
    )


class AttachmentRow(Base):
    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class EventType(StrEnum):
    ACCEPTED = "accepted"  #: stored; will be sent
    DEFERRED = "deferred"  #: an attempt failed for now; retried (why, what to do, when)
    SENT = "sent"  #: the account's server or the backup provider accepted it
    RECIPIENT_FAILED = "recipient_failed"  #: one recipient was refused for good
    FAILED = "failed"  #: it ended without delivery
    CANCELLED = "cancelled"  #: an operator cancelled it


class Event(Base):
    """A change a sender cares about, written in the transaction that made the change, so
    an event can never be lost or describe what did not happen. Delivered to the
    message's `status_task` (by name) from here, at least once, in order per message."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("message_id", "seq", name="uq_events_message_seq"),
        # What still has to be published: only those rows, in order.
        Index(
            "ix_events_to_publish",
            "id",
            postgresql_where=text("publish_due AND published_at IS NULL"),
            sqlite_where=text("publish_due AND published_at IS NULL"),
        ),
        Index("ix_events_account_at", "account_id", "at"),
        # What a webhook still has to get, per account in order (worker.store.webhooks).
        Index(
            "ix_events_to_hook",
            "account_id",
            "id",
            postgresql_where=text("hooked_at IS NULL"),
            sqlite_where=text("hooked_at IS NULL"),
        ),
        # ... and in id order over all accounts, for the global webhook: a batch reads
        # what is still to post, not every event posted before it (migration 0007).
        Index(
            "ix_events_to_hook_by_id",
            "id",
            postgresql_where=text("hooked_at IS NULL"),
            sqlite_where=text("hooked_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    #: The event's public id (a UUID): a redelivered event carries the same one.
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    #: 1, 2, 3... per message, in the order the changes happened.
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(24))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The fields of this type of event (verdict, code, meaning, advice, recipients...).
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: The message has a `status_task`: this event is to be published to it.
    publish_due: Mapped[bool] = mapped_column(Boolean, default=False)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When a webhook answered 2xx to the POST that carried this event.
    hooked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookDestination(Base):
    """Where status events are posted and how that is going: one row per account with
    its own webhook, one (`account_id` NULL, key "global") for OUTBOX_EVENTS_WEBHOOK."""

    __tablename__ = "webhook_destinations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    #: "account:<id>" or "global".
    key: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    #: Events before this row id predate the destination: they are not posted.
    start_event_id: Mapped[int] = mapped_column(BigId, default=0)
    #: A dispatcher holds the destination until then (one at a time; a dead one's ends).
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The first failed POST of the current run of failures.
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Set on 410 Gone or when the retry window ran out; cleared by setting the URL again.
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_reason: Mapped[str | None] = mapped_column(String(200))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered: Mapped[int] = mapped_column(BigInteger, default=0)


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("message_id", "number", name="uq_attempts_message_number"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16))
    verdict: Mapped[str | None] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(16))
    reply_code: Mapped[int | None] = mapped_column(Integer)
    enhanced_code: Mapped[str | None] = mapped_column(String(16))
    server_text: Mapped[str | None] = mapped_column(Text)
    #: {address: {"code": int|None, "enhanced": str|None, "text": str, "verdict": str}}
    recipients: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The backup provider's id for the accepted message.
    provider_message_id: Mapped[str | None] = mapped_column(String(255))
    worker: Mapped[str | None] = mapped_column(String(255))


class Incident(Base):
    """An account's SMTP setup is broken; one notice per incident, one probe at a time."""

    __tablename__ = "incidents"
    __table_args__ = (
        # At most one open incident per account, whatever the races.
        Index(
            "uq_incidents_open_per_account",
            "account_id",
            unique=True,
            postgresql_where=text("closed_at IS NULL"),
            sqlite_where=text("closed_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    verdict: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    last_code: Mapped[int | None] = mapped_column(Integer)
    last_enhanced: Mapped[str | None] = mapped_column(String(16))
    last_reply: Mapped[str | None] = mapped_column(Text)
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    recovery_notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When the account was told its mail started going out through the backup.
    backup_notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Messages delivered by the backup provider while the incident was open.
    backup_deliveries: Mapped[int] = mapped_column(Integer, default=0)
    #: The one message allowed to test the broken server, and until when.
    probe_message_id: Mapped[int | None] = mapped_column(BigId)
    probe_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class NoticeKind(StrEnum):
    """What an incident notice tells its account (the incident column that the email
    channel claims: `worker.store.incidents.NOTICE_COLUMNS`)."""

    OPENED = "opened"  #: its SMTP server is failing: an incident opened
    BACKUP = "backup"  #: its mail started going out through the backup provider
    RECOVERED = "recovered"  #: its SMTP server accepts mail again: the incident closed


class IncidentNotice(Base):
    """An incident notice still to be posted to the account's `notify_webhook`, or how
    that went. Written in the transaction that opened or closed the incident (or counted
    its first backup delivery), so a lost broker message never loses a notice; posted by
    the webhook dispatcher (worker.webhooks) with the events' signing, backoff and
    retry window. Every notice gets a row; one whose account has no notify webhook when
    it is due is given up as `NO_NOTIFY_WEBHOOK` (worker.store.notices), without alert."""

    __tablename__ = "incident_notices"
    __table_args__ = (
        UniqueConstraint("incident_id", "kind", name="uq_incident_notices_incident_kind"),
        # What the dispatcher still has to post: only those rows.
        Index(
            "ix_incident_notices_due",
            "next_try_at",
            postgresql_where=text("posted_at IS NULL AND given_up_at IS NULL"),
            sqlite_where=text("posted_at IS NULL AND given_up_at IS NULL"),
        ),
        CheckConstraint(
            "kind IN ('opened', 'backup', 'recovered')", name="ck_incident_notices_kind"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id", ondelete="CASCADE"))
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    #: A `NoticeKind` value.
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: When the webhook answered 2xx: done.
    posted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Failed POSTs in a row, and when the first of them was (the retry window's start).
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Not posted again before this time (backoff); None: as soon as a dispatcher runs.
    next_try_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: A dispatcher is posting it until then (one at a time; a dead one's ends).
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Set on 410 Gone, at the retry window's end, or with no webhook to post to: done.
    given_up_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    given_up_reason: Mapped[str | None] = mapped_column(String(200))


class SmtpSlot(Base):
    """One of an account's `max_connections` SMTP connection permits, across all workers."""

    __tablename__ = "smtp_slots"

    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class MetricTally(Base):
    """Events already counted out of their tables, so the exporter's counters stay
    monotonic and cheap: a counter is its tally plus the rows past its mark
    (worker.store.metrics)."""

    __tablename__ = "metric_tallies"

    family: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: The label values, joined with "/" (e.g. "sent/smtp").
    labels: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class MetricMark(Base):
    """How far a family's tally has counted its table."""

    __tablename__ = "metric_marks"

    family: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: Messages: every finish up to this `finished_at` is in the tally (None: none yet).
    through_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Attempts: every attempt up to this id is in the tally (None: none yet).
    through_id: Mapped[int | None] = mapped_column(BigId)


class MaintenanceRun(Base):
    """The last completed run of a periodic task (the sweeper), for the exporter."""

    __tablename__ = "maintenance_runs"

    task: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)
