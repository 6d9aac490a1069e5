"""Webhook destinations and what each still has to get: the SQL of signed webhooks.

An event is due to a destination while its `hooked_at` is empty: the account's own
destination takes the account's events, the global one the events of accounts without
their own. Marked only after the receiver's 2xx, so a dispatcher that dies loses
nothing (the batch is posted again, with the same webhook id). Rows are read in id
order; a message's later event is written after its earlier one committed (the message
row is locked to number it), so id order is each message's order, and a row whose
transaction commits late is still due (no cursor skips it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, or_, select, text, update
from sqlalchemy.orm import Session

from worker.store.db import changed_rows
from worker.store.events import event_dict
from worker.store.models import Account, Event, WebhookDestination, table
from worker.store.models import Message as MessageRow

_EVENTS = table(Event)
GLOBAL_KEY = "global"


def account_key(account_id: int) -> str:
    return f"account:{account_id}"


@dataclass(frozen=True)
class Claimed:
    """A destination this dispatcher holds until `lease_until`."""

    id: int
    key: str
    account_id: int | None
    url: str
    start_event_id: int
    failing_since: datetime | None
    failures: int
    #: The account's encrypted `whsec_` secret (None: sign with the global secrets).
    secret_encrypted: str | None


@dataclass(frozen=True)
class DueEvent:
    row_id: int
    event: dict[str, Any]


def _last_event_id(session: Session) -> int:
    return int(session.execute(select(func.coalesce(func.max(Event.id), 0))).scalar_one())


def _upsert(
    session: Session, *, key: str, account_id: int | None, url: str, from_start: bool = False
) -> None:
    """Create or re-point a destination; setting it (again) re-enables it. A new one
    gets the events written from now on, or (``from_start``) every one still due."""
    row = session.execute(
        select(WebhookDestination).where(WebhookDestination.key == key).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        session.add(
            WebhookDestination(
                key=key,
                account_id=account_id,
                url=url,
                start_event_id=0 if from_start else _last_event_id(session) + 1,
                failures=0,
                delivered=0,
            )
        )
        session.flush()
        return
    row.url = url
    row.disabled_at = None
    row.disabled_reason = None
    row.failing_since = None
    row.failures = 0
    row.next_try_at = None
    row.last_error = None


def set_account_webhook(
    session: Session, account_id: int, *, url: str | None, secret_encrypted: str | None
) -> None:
    """The account's own events webhook (None: remove it; its events go to the global
    one from then on). ``secret_encrypted`` None keeps the stored secret."""
    values: dict[str, Any] = {"events_webhook": url}
    if secret_encrypted is not None or url is None:
        values["events_secret_encrypted"] = secret_encrypted
    session.execute(update(Account).where(Account.id == account_id).values(**values))
    key = account_key(account_id)
    if url is None:
        session.execute(delete(WebhookDestination).where(WebhookDestination.key == key))
    else:
        _upsert(session, key=key, account_id=account_id, url=url)


def ensure_global(session: Session, url: str | None) -> None:
    """The global destination follows OUTBOX_EVENTS_WEBHOOK (a new URL re-enables it).
    It is created by the first dispatcher run, after events may have been written with
    the setting already on: it takes every event still in the table that no webhook got."""
    row = session.execute(
        select(WebhookDestination.url).where(WebhookDestination.key == GLOBAL_KEY)
    ).scalar_one_or_none()
    if url is None:
        if row is not None:
            session.execute(delete(WebhookDestination).where(WebhookDestination.key == GLOBAL_KEY))
    elif row != url:
        _upsert(session, key=GLOBAL_KEY, account_id=None, url=url, from_start=True)


def claim_next(
    session: Session,
    *,
    now: datetime,
    lease_s: float,
    skip: set[int] | frozenset[int] = frozenset(),
) -> Claimed | None:
    """Take one enabled destination that is due and held by no other dispatcher (and
    not in ``skip``: those this run has served already)."""
    row = session.execute(
        select(WebhookDestination, Account.events_secret_encrypted)
        .outerjoin(Account, Account.id == WebhookDestination.account_id)
        .where(
            WebhookDestination.disabled_at.is_(None),
            or_(WebhookDestination.lease_until.is_(None), WebhookDestination.lease_until < now),
            or_(WebhookDestination.next_try_at.is_(None), WebhookDestination.next_try_at <= now),
            WebhookDestination.id.not_in(skip),
        )
        .order_by(WebhookDestination.lease_until.nulls_first(), WebhookDestination.id)
        .limit(1)
        .with_for_update(of=WebhookDestination, skip_locked=True)
    ).first()
    if row is None:
        return None
    dest: WebhookDestination = row[0]
    dest.lease_until = now + timedelta(seconds=lease_s)
    return Claimed(
        id=dest.id,
        key=dest.key,
        account_id=dest.account_id,
        url=dest.url,
        start_event_id=dest.start_event_id,
        failing_since=dest.failing_since,
        failures=dest.failures,
        secret_encrypted=row[1] if dest.account_id is not None else None,
    )


#: A due event as a receiver gets it. The account's name and the caller's metadata are
#: looked up per returned row (scalar subqueries), not joined: a join lets the planner
#: start from the accounts and read every waiting event of them before it sorts and
#: keeps a batch, as it does while a fast-growing table's statistics are stale (the
#: global webhook's batch then cost 4 ms at 2,000 waiting, not 1).
_DUE_COLUMNS = (
    _EVENTS.c.id,
    _EVENTS.c.event_id,
    _EVENTS.c.type,
    _EVENTS.c.message_id,
    _EVENTS.c.at,
    _EVENTS.c.seq,
    _EVENTS.c.data,
    select(Account.name)
    .where(Account.id == _EVENTS.c.account_id)
    .scalar_subquery()
    .label("account"),
    select(MessageRow.caller_metadata)
    .where(MessageRow.id == _EVENTS.c.message_id)
    .scalar_subquery()
    .label("caller_metadata"),
)
#: The event's account has no webhook of its own: the global one takes its events. A
#: scalar subquery, checked row by row as the scan goes in id order (an anti-join would
#: read every waiting event to sort them).
_NO_OWN_WEBHOOK = (
    select(Account.events_webhook)
    .where(Account.id == _EVENTS.c.account_id)
    .scalar_subquery()
    .is_(None)
)


def _due_where(dest: Claimed) -> list[Any]:
    where = [_EVENTS.c.hooked_at.is_(None), _EVENTS.c.id >= dest.start_event_id]
    if dest.account_id is not None:
        return [*where, _EVENTS.c.account_id == dest.account_id]
    return [*where, _NO_OWN_WEBHOOK]


def due_batch(dest: Claimed, *, limit: int) -> Any:
    """The query of the destination's next batch (tests read its plan)."""
    return select(*_DUE_COLUMNS).where(*_due_where(dest)).order_by(_EVENTS.c.id).limit(limit)


#: For the batch's transaction on PostgreSQL: walk the index in id order and stop at the
#: batch, rather than read every waiting event and sort them, which the planner prefers
#: whenever its statistics say the table is small (a table that just filled up quickly:
#: 3.8 ms a batch at 2,000 waiting, growing with the backlog; 0.3 ms this way).
_NO_SORT = text("SET LOCAL enable_sort = off")


def due_events(session: Session, dest: Claimed, *, limit: int) -> list[DueEvent]:
    """The destination's next batch, oldest first (each message's events in order)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(_NO_SORT)
    rows = conn.execute(due_batch(dest, limit=limit)).all()
    return [
        DueEvent(r.id, event_dict(r, account=r.account, metadata=r.caller_metadata)) for r in rows
    ]


#: Built once: the ids are bound at execution ("expanding"), not coerced one by one.
_MARK_HOOKED = (
    update(_EVENTS)
    .where(_EVENTS.c.id.in_(bindparam("p_ids", expanding=True)))
    .values(hooked_at=bindparam("p_now", type_=_EVENTS.c.hooked_at.type))
)


def delivered(session: Session, dest_id: int, row_ids: list[int], *, now: datetime) -> None:
    """The receiver answered 2xx: the events are done, the failures forgotten."""
    if row_ids:
        session.connection().execute(_MARK_HOOKED, {"p_ids": row_ids, "p_now": now})
    session.execute(
        update(WebhookDestination)
        .where(WebhookDestination.id == dest_id)
        .values(
            failing_since=None,
            failures=0,
            next_try_at=None,
            last_error=None,
            last_success_at=now,
            delivered=WebhookDestination.delivered + len(row_ids),
        )
    )


def failed(
    session: Session,
    dest_id: int,
    *,
    error: str,
    failing_since: datetime,
    failures: int,
    next_try_at: datetime | None,
    disabled_reason: str | None,
    now: datetime,
) -> None:
    """A POST failed: when to try again, or (``disabled_reason``) no more tries."""
    session.execute(
        update(WebhookDestination)
        .where(WebhookDestination.id == dest_id)
        .values(
            failing_since=failing_since,
            failures=failures,
            next_try_at=next_try_at,
            last_error=error[:2000],
            lease_until=None,
            disabled_at=now if disabled_reason else None,
            disabled_reason=disabled_reason,
        )
    )


def renew(session: Session, dest_id: int, *, until: datetime) -> None:
    """Hold the destination longer: the next POST is about to go out."""
    session.execute(
        update(WebhookDestination).where(WebhookDestination.id == dest_id).values(lease_until=until)
    )


def release(session: Session, dest_id: int) -> None:
    session.execute(
        update(WebhookDestination).where(WebhookDestination.id == dest_id).values(lease_until=None)
    )


def redeliver(session: Session, *, message_id: int) -> int:
    """Post the message's events again to its webhook: same ids, same order."""
    return changed_rows(
        session.execute(
            update(Event)
            .where(Event.message_id == message_id, Event.hooked_at.is_not(None))
            .values(hooked_at=None)
            .execution_options(synchronize_session=False)
        )
    )


def destinations(session: Session) -> list[dict[str, Any]]:
    """Every destination with its state and how many events it is behind."""
    rows = session.execute(
        select(WebhookDestination, Account.name)
        .outerjoin(Account, Account.id == WebhookDestination.account_id)
        .order_by(WebhookDestination.id)
    ).all()
    out = []
    for dest, name in rows:
        claimed = Claimed(
            dest.id, dest.key, dest.account_id, dest.url, dest.start_event_id, None, 0, None
        )
        behind = session.execute(
            select(func.count()).select_from(_EVENTS).where(*_due_where(claimed))
        ).scalar_one()
        out.append(
            {
                "destination": name or GLOBAL_KEY,
                "url": dest.url,
                "failing_since": dest.failing_since,
                "failures": dest.failures,
                "next_try_at": dest.next_try_at,
                "disabled_at": dest.disabled_at,
                "disabled_reason": dest.disabled_reason,
                "last_error": dest.last_error,
                "last_success_at": dest.last_success_at,
                "delivered": dest.delivered,
                "behind": int(behind),
            }
        )
    return out


def destination_of(session: Session, account_id: int) -> dict[str, Any] | None:
    key = account_key(account_id)
    for row in destinations_by_key(session, key):
        return row
    return None


def destinations_by_key(session: Session, key: str) -> list[dict[str, Any]]:
    dest = session.execute(
        select(WebhookDestination).where(WebhookDestination.key == key)
    ).scalar_one_or_none()
    if dest is None:
        return []
    return [
        {
            "url": dest.url,
            "failing_since": dest.failing_since,
            "next_try_at": dest.next_try_at,
            "disabled_at": dest.disabled_at,
            "disabled_reason": dest.disabled_reason,
            "last_error": dest.last_error,
        }
    ]


__all__ = [
    "GLOBAL_KEY",
    "Claimed",
    "DueEvent",
    "account_key",
    "claim_next",
    "delivered",
    "destination_of",
    "destinations",
    "due_events",
    "ensure_global",
    "failed",
    "redeliver",
    "release",
    "renew",
    "set_account_webhook",
]
