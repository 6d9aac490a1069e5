"""An account's queue in the database, and the drains that empty it.

The database holds each account's queue: its pending messages in send order (priority,
then `next_attempt_at`). A *drain* takes one of the account's connection slots
(`smtp_slots`, `max_connections` rows per account, shared by every worker), claims a batch
of the account's due mail with `FOR UPDATE SKIP LOCKED`, sends it over one connection and
gives the slot back. The broker carries only wake-ups, one per account and not one per
email, coalesced through two columns of `accounts`:

* `drain_queued_at`: a drain will start soon. Set when a wake-up is published (by intake,
  by a drain that yields, by the sweeper), or by a drain that found every slot busy: the
  drains holding them look at the queue again when they end. Taken (cleared) by the drain
  that takes a slot. Intake publishes only when it is empty or older than the wake grace,
  and no drain holds a slot (a running drain looks at the queue when it ends).
* `drain_timer_at`: a countdown wake-up is scheduled for that time (the earliest retry or
  scheduled send within `OUTBOX_COUNTDOWN_MAX`); a second one for the same time is not
  published.

No wake-up can be lost between a commit and a drain: a drain's start (take the flag, take
a slot or promise) and its end (give the slot back, look at the queue, publish what
follows) each hold the account's row lock and read with a fresh snapshot; intake sets the
flag only after its message is committed. A wake-up lost anyway (a flushed broker, a
killed worker) leaves the flag stale, and the sweeper wakes every account that has due
mail, no running drain and no fresh flag (`accounts_to_wake`).

Every statement here renders on PostgreSQL and SQLite alike (SQLite ignores `FOR UPDATE`:
its writers are serialised by `BEGIN IMMEDIATE` anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from sqlalchemy import and_, bindparam, exists, func, not_, or_, select, update
from sqlalchemy.orm import Session

from worker.store.db import changed_rows
from worker.store.messages import CLAIM_RETURNING, CLAIM_VALUES, Claimed, claimed_from_rows
from worker.store.models import Account, Incident, Message, MessageStatus, SmtpSlot, table
from worker.store.slots import acquire_statement

_ACCOUNTS = table(Account)
_MESSAGES = table(Message)
_SLOTS = table(SmtpSlot)
_INCIDENTS = table(Incident)
PENDING = MessageStatus.PENDING.value


@dataclass(frozen=True)
class DrainAccount:
    """What a drain needs of its account, read when it starts."""

    id: int
    name: str
    smtp_host: str
    smtp_port: int
    smtp_username: str | None
    smtp_password_encrypted: str | None
    tls_mode: str
    ca_pem: str | None
    settings_version: int
    max_connections: int
    throttle_until: datetime | None
    throttle_level: int
    #: The account's own status-events webhook (None: none, or the global one).
    events_webhook: str | None
    #: The account's open incident, if any; until when its current probe (or the wait
    #: for the next one) runs; the message that tests the server next.
    incident_id: int | None
    probe_until: datetime | None
    probe_message_id: int | None

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id",
        "name",
        "smtp_host",
        "smtp_port",
        "smtp_username",
        "smtp_password_encrypted",
        "tls_mode",
        "ca_pem",
        "settings_version",
        "max_connections",
        "throttle_until",
        "throttle_level",
        "events_webhook",
    )

    def throttled(self, now: datetime) -> bool:
        return self.throttle_until is not None and self.throttle_until > now

    def probe_busy(self, now: datetime) -> bool:
        """An incident is open and its probe (or the wait for the next one) is not over."""
        return (
            self.incident_id is not None and self.probe_until is not None and self.probe_until > now
        )

    def paused_until(self, now: datetime) -> datetime | None:
        """Until when the account may not talk to its server (None: it may now)."""
        candidates = [
            t
            for t in (
                self.throttle_until if self.throttled(now) else None,
                self.probe_until if self.probe_busy(now) else None,
            )
            if t is not None
        ]
        return max(candidates) if candidates else None


@dataclass(frozen=True)
class DrainStart:
    account: DrainAccount
    #: The connection slot this drain holds, or None: every slot was busy, and the
    #: drains holding them were asked to look again (the account's queued flag is set).
    slot: int | None


#: The account's row lock, with its open incident (at most one: a unique partial index)
#: read in the same statement. FOR NO KEY UPDATE, not FOR UPDATE: it must not block the
#: foreign-key share lock that inserting the account's mail takes (intake runs while the
#: account's drains start and end).
_LOCK_ACCOUNT = (
    select(
        *(_ACCOUNTS.c[name] for name in DrainAccount.COLUMNS),
        _ACCOUNTS.c.drain_timer_at,
        _INCIDENTS.c.id.label("incident_id"),
        _INCIDENTS.c.probe_until,
        _INCIDENTS.c.probe_message_id,
    )
    .select_from(
        _ACCOUNTS.outerjoin(
            _INCIDENTS,
            and_(_INCIDENTS.c.account_id == _ACCOUNTS.c.id, _INCIDENTS.c.closed_at.is_(None)),
        )
    )
    .where(_ACCOUNTS.c.id == bindparam("p_account_id"))
    .with_for_update(of=_ACCOUNTS, key_share=True)
)
_ACQUIRE_SLOT = acquire_statement(bindparam("p_account_id"))
_SET_FLAGS = (
    update(_ACCOUNTS)
    .where(_ACCOUNTS.c.id == bindparam("p_account_id"))
    .values(
        drain_queued_at=bindparam("p_queued_at", type_=_ACCOUNTS.c.drain_queued_at.type),
        drain_timer_at=bindparam("p_timer_at", type_=_ACCOUNTS.c.drain_timer_at.type),
    )
)


def _lock_account(session: Session, account_id: int) -> Any:
    return session.connection().execute(_LOCK_ACCOUNT, {"p_account_id": account_id}).first()


def _drain_account(row: Any) -> DrainAccount:
    return DrainAccount(
        **{name: getattr(row, name) for name in DrainAccount.COLUMNS},
        incident_id=row.incident_id,
        probe_until=row.probe_until,
        probe_message_id=row.probe_message_id,
    )


def begin_drain(
    session: Session, account_id: int, *, holder: str, now: datetime, hold_s: float
) -> DrainStart | None:
    """Start a drain of the account: take its queued flag and a connection slot.

    With no free slot, set the queued flag instead (the drains holding the slots look at
    the queue when they end, see `end_drain`) and hold nothing. None: no such account.
    Run in a transaction of its own: it holds the account's row lock until it commits.
    """
    row = _lock_account(session, account_id)
    if row is None:
        return None
    conn = session.connection()
    timer_at = row.drain_timer_at
    slot = conn.execute(
        _ACQUIRE_SLOT,
        {
            "p_account_id": account_id,
            "p_holder": holder,
            "p_now": now,
            "p_slot_expires_at": now + timedelta(seconds=hold_s),
        },
    ).scalar()
    conn.execute(
        _SET_FLAGS,
        {
            "p_account_id": account_id,
            # Taken by this drain; or, with no slot, a promise the running drains keep.
            "p_queued_at": None if slot is not None else now,
            # A timer that is due now is this wake-up (or finds nothing left to do).
            "p_timer_at": timer_at if timer_at is not None and timer_at > now else None,
        },
    )
    return DrainStart(_drain_account(row), slot)


#: Send order, also the order the sweeper assumes when a drain dies (store.sweep).
SEND_ORDER = (_MESSAGES.c.priority, _MESSAGES.c.next_attempt_at, _MESSAGES.c.id)
_CLAIMABLE = and_(
    _MESSAGES.c.account_id == bindparam("p_account_id"),
    _MESSAGES.c.status == PENDING,
    _MESSAGES.c.next_attempt_at <= bindparam("p_due_by"),
    # Past its deadline, a message belongs to the backup provider (the sweeper).
    _MESSAGES.c.deadline > bindparam("p_now"),
    _MESSAGES.c.lease_token.is_(None),
)


def _claim_statement(candidates: Any) -> Any:
    batch = candidates.with_for_update(skip_locked=True).subquery("batch")
    return (
        update(_MESSAGES)
        .where(_MESSAGES.c.id == batch.c.id)
        .values(CLAIM_VALUES)
        .returning(*CLAIM_RETURNING, _MESSAGES.c.priority, _MESSAGES.c.next_attempt_at)
    )


_CLAIM_BATCH = _claim_statement(
    select(_MESSAGES.c.id).where(_CLAIMABLE).order_by(*SEND_ORDER).limit(bindparam("p_limit"))
)
_CLAIM_ONE = _claim_statement(
    select(_MESSAGES.c.id).where(_CLAIMABLE, _MESSAGES.c.id == bindparam("p_first"))
)


def claim_batch(
    session: Session,
    account_id: int,
    *,
    token: str,
    limit: int,
    now: datetime,
    lease_until: datetime,
    early_tolerance_s: float,
    first: int | None = None,
) -> list[Claimed]:
    """Lease up to `limit` of the account's due messages, in send order, in one statement.

    Messages another drain holds are skipped, not waited for. Each claimed message counts
    an attempt; `give_back` uncounts the ones a drain did not get to. `first`: claim this
    message alone if it is claimable (an incident's probe), else the batch.
    """
    params = {
        "p_account_id": account_id,
        "p_due_by": now + timedelta(seconds=early_tolerance_s),
        "p_now": now,
        "p_limit": limit,
        "p_lease_until": lease_until,
        "p_token": token,
    }
    conn = session.connection()
    rows: list[Any] = []
    if first is not None:
        rows = list(conn.execute(_CLAIM_ONE, {**params, "p_first": first}))
    if not rows:
        rows = list(conn.execute(_CLAIM_BATCH, params))
    rows.sort(key=lambda r: (r.priority, r.next_attempt_at, r.id))
    return claimed_from_rows(session, rows, token=token, lease_until=lease_until)


_TAKE_PROBE = (
    update(_INCIDENTS)
    .where(
        _INCIDENTS.c.id == bindparam("p_incident_id"),
        _INCIDENTS.c.closed_at.is_(None),
        or_(_INCIDENTS.c.probe_until.is_(None), _INCIDENTS.c.probe_until <= bindparam("p_now")),
    )
    .values(probe_until=bindparam("p_until"))
    .returning(_INCIDENTS.c.id)
)


def take_probe(session: Session, incident_id: int, *, now: datetime, until: datetime) -> bool:
    """Become the one drain that tests the account's broken server (a circuit breaker)."""
    return (
        session.connection()
        .execute(_TAKE_PROBE, {"p_incident_id": incident_id, "p_now": now, "p_until": until})
        .first()
        is not None
    )


_RENEW_MESSAGES = (
    update(_MESSAGES)
    .where(_MESSAGES.c.lease_token == bindparam("p_token"), _MESSAGES.c.status == PENDING)
    .values(lease_until=bindparam("p_until"), due_at=bindparam("p_until"))
    .returning(_MESSAGES.c.id)
)
_RENEW_SLOT = (
    update(_SLOTS)
    .where(
        _SLOTS.c.account_id == bindparam("p_account_id"), _SLOTS.c.holder == bindparam("p_holder")
    )
    .values(expires_at=bindparam("p_until"))
)


def renew_lease(
    session: Session, *, token: str, account_id: int, holder: str, until: datetime
) -> tuple[set[int], bool]:
    """Extend the lease of the messages a drain still holds, and of its connection slot.

    Returns the ids still held (one the sweeper freed meanwhile is not among them) and
    whether the slot is still held.
    """
    conn = session.connection()
    held = {int(r[0]) for r in conn.execute(_RENEW_MESSAGES, {"p_token": token, "p_until": until})}
    slot = changed_rows(
        conn.execute(
            _RENEW_SLOT, {"p_account_id": account_id, "p_holder": holder, "p_until": until}
        )
    )
    return held, bool(slot)


_GIVE_BACK = (
    update(_MESSAGES)
    .where(
        _MESSAGES.c.lease_token == bindparam("p_token"),
        _MESSAGES.c.status == PENDING,
        _MESSAGES.c.id != bindparam("p_keep"),
    )
    .values(
        lease_until=None,
        lease_token=None,
        attempt_count=_MESSAGES.c.attempt_count - 1,
        due_at=_MESSAGES.c.deadline,
        updated_at=bindparam("p_now"),
    )
)


def give_back(session: Session, *, token: str, now: datetime, keep: int | None = None) -> int:
    """Return the messages a drain claimed but did not send, uncounting their attempt;
    they keep their place in the queue. `keep`: a message that may have gone out without
    its record; it stays leased for the sweeper to judge."""
    params = {"p_token": token, "p_now": now, "p_keep": keep if keep is not None else 0}
    return changed_rows(session.connection().execute(_GIVE_BACK, params))


@dataclass(frozen=True)
class QueueState:
    """An account's queue as a drain sees it when it ends (under the account's lock)."""

    account: DrainAccount
    #: Due mail nobody holds, counted up to the limit the caller gave.
    due_now: int
    #: Connection slots nobody holds (including the one just given back).
    free_slots: int
    #: The earliest mail not due yet (None: nothing else is pending).
    next_due_at: datetime | None
    #: The flags as they were: a countdown already scheduled need not be published again.
    timer_at: datetime | None


_RELEASE_SLOT = (
    update(_SLOTS)
    .where(
        _SLOTS.c.account_id == bindparam("p_account_id"), _SLOTS.c.holder == bindparam("p_holder")
    )
    .values(holder=None, expires_at=None)
)
_WAITING = and_(
    _MESSAGES.c.account_id == bindparam("p_account_id"),
    _MESSAGES.c.status == PENDING,
    _MESSAGES.c.deadline > bindparam("p_now"),
    _MESSAGES.c.lease_token.is_(None),
)
_DUE_NOW = (
    select(func.count())
    .select_from(
        select(_MESSAGES.c.id)
        .where(_WAITING, _MESSAGES.c.next_attempt_at <= bindparam("p_due_by"))
        .limit(bindparam("p_limit"))
        .subquery()
    )
    .scalar_subquery()
)
_NEXT_DUE = (
    select(func.min(_MESSAGES.c.next_attempt_at))
    .where(_WAITING, _MESSAGES.c.next_attempt_at > bindparam("p_due_by"))
    .scalar_subquery()
)
_FREE_SLOTS = (
    select(func.count())
    .where(
        _SLOTS.c.account_id == bindparam("p_account_id"),
        or_(_SLOTS.c.holder.is_(None), _SLOTS.c.expires_at < bindparam("p_now")),
    )
    .scalar_subquery()
)
#: What a drain's end looks at, in one round trip.
_QUEUE_STATE = select(
    _DUE_NOW.label("due_now"), _FREE_SLOTS.label("free_slots"), _NEXT_DUE.label("next_due_at")
)


def end_drain(
    session: Session,
    account_id: int,
    *,
    holder: str,
    token: str,
    now: datetime,
    count_up_to: int,
    early_tolerance_s: float,
    keep: int | None = None,
) -> QueueState | None:
    """Give back the drain's unsent mail (`give_back`, except `keep`) and its connection
    slot, then look at the account's queue.

    In the same transaction, the caller decides what follows (`decide.plan_after_drain`)
    and writes it with `set_drain_flags`; the account's row lock held from here to the
    commit orders this with every other drain's start and end, so a drain that found no
    free slot meanwhile is always answered (see the module docstring).
    """
    row = _lock_account(session, account_id)
    if row is None:
        return None
    conn = session.connection()
    give_back(session, token=token, now=now, keep=keep)
    conn.execute(_RELEASE_SLOT, {"p_account_id": account_id, "p_holder": holder})
    params = {
        "p_account_id": account_id,
        "p_now": now,
        "p_due_by": now + timedelta(seconds=early_tolerance_s),
        "p_limit": count_up_to,
    }
    state = conn.execute(_QUEUE_STATE, params).one()
    return QueueState(
        account=_drain_account(row),
        due_now=int(state.due_now),
        free_slots=int(state.free_slots),
        next_due_at=state.next_due_at,
        timer_at=row.drain_timer_at,
    )


def set_drain_flags(
    session: Session,
    account_id: int,
    *,
    queued_at: datetime | None,
    timer_at: datetime | None,
) -> None:
    """Write what follows a drain: a wake-up queued now, a countdown scheduled."""
    session.connection().execute(
        _SET_FLAGS,
        {"p_account_id": account_id, "p_queued_at": queued_at, "p_timer_at": timer_at},
    )


def timer_needed(
    scheduled_at: datetime | None, wanted_at: datetime, *, now: datetime, stale_s: float
) -> bool:
    """Is a countdown for `wanted_at` still to be published, given the one scheduled?

    Not when one is already scheduled for that time or earlier (it will find the mail),
    unless that one is so old it must have been lost.
    """
    if scheduled_at is None:
        return True
    if scheduled_at < now - timedelta(seconds=stale_s):
        return True
    return scheduled_at > wanted_at + timedelta(seconds=1.0)


_HELD_SLOT = exists(
    select(1).where(
        _SLOTS.c.account_id == bindparam("p_account_id"),
        _SLOTS.c.holder.is_not(None),
        _SLOTS.c.expires_at >= bindparam("p_now"),
    )
)
_LOCK_FOR_REQUEST = (
    select(_ACCOUNTS.c.id)
    .where(_ACCOUNTS.c.id == bindparam("p_account_id"))
    .with_for_update(key_share=True)
)
_REQUEST_NOW = (
    update(_ACCOUNTS)
    .where(
        _ACCOUNTS.c.id == bindparam("p_account_id"),
        or_(
            _ACCOUNTS.c.drain_queued_at.is_(None),
            _ACCOUNTS.c.drain_queued_at < bindparam("p_stale_before"),
        ),
        # A running drain looks at the queue when it ends (end_drain), under this lock.
        not_(_HELD_SLOT),
    )
    .values(drain_queued_at=bindparam("p_now"))
    .returning(_ACCOUNTS.c.id)
)
_REQUEST_LATER = (
    update(_ACCOUNTS)
    .where(
        _ACCOUNTS.c.id == bindparam("p_account_id"),
        or_(
            _ACCOUNTS.c.drain_timer_at.is_(None),
            _ACCOUNTS.c.drain_timer_at < bindparam("p_stale_before"),
            _ACCOUNTS.c.drain_timer_at > bindparam("p_at_late"),
        ),
    )
    .values(drain_timer_at=bindparam("p_at"))
    .returning(_ACCOUNTS.c.id)
)


def request_drain(
    session: Session,
    account_id: int,
    *,
    now: datetime,
    at: datetime | None = None,
    stale_s: float,
) -> bool:
    """Mail of the account is due at `at` (default now): must a wake-up be published?

    True once per account while no drain of it is pending or running, or again after
    `stale_s` (the wake-up may have been lost). Run in the transaction that stored the
    mail, or in one of its own after that committed.

    Why no wake-up while a drain runs: that drain's end (`end_drain`) looks at the queue
    under the account's row lock and publishes what it finds. This takes the same lock
    first, then looks for a held slot in a statement of its own (a fresh snapshot): either
    the drain's end committed before (its slot is free: this publishes), or it waits for
    this transaction and then sees this mail.
    """
    stale_before = now - timedelta(seconds=stale_s)
    conn = session.connection()
    if at is None or at <= now + timedelta(seconds=1.0):
        if conn.execute(_LOCK_FOR_REQUEST, {"p_account_id": account_id}).first() is None:
            return False
        result = conn.execute(
            _REQUEST_NOW,
            {"p_account_id": account_id, "p_now": now, "p_stale_before": stale_before},
        )
    else:
        result = conn.execute(
            _REQUEST_LATER,
            {
                "p_account_id": account_id,
                "p_at": at,
                "p_at_late": at + timedelta(seconds=1.0),
                "p_stale_before": stale_before,
            },
        )
    return result.first() is not None


_LIVE_SLOT = exists(
    select(1).where(
        _SLOTS.c.account_id == _ACCOUNTS.c.id,
        _SLOTS.c.holder.is_not(None),
        _SLOTS.c.expires_at >= bindparam("p_now"),
    )
)
_PROBE_WAITING = exists(
    select(1).where(
        _INCIDENTS.c.account_id == _ACCOUNTS.c.id,
        _INCIDENTS.c.closed_at.is_(None),
        _INCIDENTS.c.probe_until > bindparam("p_now"),
    )
)
_HAS_DUE_MAIL = exists(
    select(1).where(
        _MESSAGES.c.account_id == _ACCOUNTS.c.id,
        _MESSAGES.c.status == PENDING,
        _MESSAGES.c.next_attempt_at <= bindparam("p_now"),
        _MESSAGES.c.deadline > bindparam("p_now"),
        _MESSAGES.c.lease_token.is_(None),
    )
)
_UNATTENDED = (
    select(_ACCOUNTS.c.id)
    .where(
        or_(
            _ACCOUNTS.c.drain_queued_at.is_(None),
            _ACCOUNTS.c.drain_queued_at < bindparam("p_stale_before"),
        ),
        or_(_ACCOUNTS.c.throttle_until.is_(None), _ACCOUNTS.c.throttle_until <= bindparam("p_now")),
        not_(_LIVE_SLOT),
        not_(_PROBE_WAITING),
        _HAS_DUE_MAIL,
    )
    .order_by(_ACCOUNTS.c.id)
    .limit(bindparam("p_limit"))
    .with_for_update(skip_locked=True)
    .subquery("unattended")
)
_MARK_WOKEN = (
    update(_ACCOUNTS)
    .where(_ACCOUNTS.c.id == _UNATTENDED.c.id)
    .values(drain_queued_at=bindparam("p_now"))
    .returning(_ACCOUNTS.c.id)
)


def accounts_to_wake(
    session: Session,
    *,
    now: datetime,
    stale_s: float,
    limit: int,
    extra: frozenset[int] | set[int] = frozenset(),
) -> list[int]:
    """Accounts with due mail that nobody is draining or about to: their wake-up was lost
    (flushed broker, killed worker), their retries were parked in the database, or their
    pause ended. Marked as woken in the same statement: two sweeps never both wake one.

    `extra`: accounts the caller freed mail of (expired leases) and wants woken now even if
    their flag is fresh: that flag may belong to the drain that died.
    """
    params = {"p_now": now, "p_stale_before": now - timedelta(seconds=stale_s), "p_limit": limit}
    woken = [int(r[0]) for r in session.connection().execute(_MARK_WOKEN, params)]
    if extra:
        rest = sorted(set(extra) - set(woken))
        if rest:
            session.execute(
                update(Account)
                .where(Account.id.in_(rest))
                .values(drain_queued_at=now)
                .execution_options(synchronize_session=False)
            )
            woken.extend(rest)
    return woken


def account_of_message(session: Session, message_id: int) -> int | None:
    """The account of a pending message (None when it is missing or finished): an old
    `outbox.send(message_id)` wake-up drains that account."""
    return session.scalar(
        select(Message.account_id).where(Message.id == message_id, Message.status == PENDING)
    )


#: How much earlier than due a wake-up may find mail (clock skew between hosts).
EARLY_TOLERANCE_S = 1.0

__all__ = [
    "EARLY_TOLERANCE_S",
    "SEND_ORDER",
    "DrainAccount",
    "DrainStart",
    "QueueState",
    "account_of_message",
    "accounts_to_wake",
    "begin_drain",
    "claim_batch",
    "end_drain",
    "give_back",
    "renew_lease",
    "request_drain",
    "set_drain_flags",
    "take_probe",
    "timer_needed",
]
