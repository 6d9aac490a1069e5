"""Incident notices for the notify webhook: the SQL of writing, claiming and settling them.

A notice row is written in the transaction that makes it due (the incident opened or
closed, its first backup delivery counted), so it is in the database as soon as its
cause is, whatever becomes of the broker. The dispatcher posts it and marks it only
after the receiver's 2xx; a row is held by one dispatcher at a time (`lease_until`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, case, func, or_, select, text, update
from sqlalchemy.orm import Session

from worker.store.models import Account, IncidentNotice, table

_NOTICES = table(IncidentNotice)
#: Why a notice was given up without a POST: its account has no notify webhook (it
#: heard by email or in the log). Not a failure: no alert, not counted as given up.
NO_NOTIFY_WEBHOOK = "no notify webhook configured"

#: One statement, whoever calls: the drain (in the incident's transaction) or an
#: `outbox.notify` of an earlier release. The account comes from the incident. Written
#: as text for the reason store.messages gives (PostgreSQL and SQLite share the syntax;
#: the WHERE keeps SQLite from reading ON CONFLICT as a join's ON).
_ADD = text(
    "INSERT INTO incident_notices (incident_id, account_id, kind, created_at, failures) "
    "SELECT id, account_id, :kind, :now, 0 FROM incidents WHERE id = :incident_id "
    "ON CONFLICT (incident_id, kind) DO NOTHING"
).bindparams(bindparam("now", type_=_NOTICES.c.created_at.type))


def add_notice(session: Session, incident_id: int, kind: str, *, now: datetime) -> None:
    """The incident's notice of this kind is due (again: a no-op)."""
    session.execute(_ADD, {"incident_id": incident_id, "kind": str(kind), "now": now})


@dataclass(frozen=True)
class ClaimedNotice:
    """A notice this dispatcher holds until its lease ends."""

    id: int
    incident_id: int
    kind: str
    failures: int
    failing_since: datetime | None


def _due(now: datetime) -> Any:
    return (
        IncidentNotice.posted_at.is_(None),
        IncidentNotice.given_up_at.is_(None),
        or_(IncidentNotice.next_try_at.is_(None), IncidentNotice.next_try_at <= now),
        or_(IncidentNotice.lease_until.is_(None), IncidentNotice.lease_until < now),
    )


def claim_due_notice(
    session: Session,
    *,
    now: datetime,
    lease_s: float,
    skip: set[int] | frozenset[int] = frozenset(),
) -> ClaimedNotice | None:
    """Take one due notice that no other dispatcher holds (nor one in ``skip``: this run
    had it already). SQLite renders no FOR UPDATE: its write lock, taken at BEGIN
    (store.db), lets one claim run at a time instead."""
    row = session.execute(
        select(IncidentNotice)
        .where(*_due(now), IncidentNotice.id.not_in(skip))
        .order_by(IncidentNotice.next_try_at.nulls_first(), IncidentNotice.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).scalar_one_or_none()
    if row is None:
        return None
    row.lease_until = now + timedelta(seconds=lease_s)
    return ClaimedNotice(row.id, row.incident_id, row.kind, row.failures, row.failing_since)


def posted(session: Session, notice_id: int, *, now: datetime) -> None:
    """The webhook answered 2xx: the notice is done."""
    session.execute(
        update(IncidentNotice)
        .where(IncidentNotice.id == notice_id)
        .values(posted_at=now, lease_until=None, next_try_at=None, last_error=None)
    )


def failed(
    session: Session,
    notice_id: int,
    *,
    error: str,
    failing_since: datetime,
    failures: int,
    next_try_at: datetime | None,
    given_up_reason: str | None,
    now: datetime,
) -> None:
    """A POST failed: when to try again, or (``given_up_reason``) never."""
    session.execute(
        update(IncidentNotice)
        .where(IncidentNotice.id == notice_id)
        .values(
            failures=failures,
            failing_since=failing_since,
            next_try_at=next_try_at,
            last_error=error[:2000],
            lease_until=None,
            given_up_at=now if given_up_reason else None,
            given_up_reason=given_up_reason,
        )
    )


def give_up(session: Session, notice_id: int, *, reason: str, now: datetime) -> None:
    """Nothing to post to: the notice is settled without a POST."""
    session.execute(
        update(IncidentNotice)
        .where(IncidentNotice.id == notice_id)
        .values(given_up_at=now, given_up_reason=reason, lease_until=None, next_try_at=None)
    )


def _count(condition: Any) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def notice_webhooks(session: Session) -> list[dict[str, Any]]:
    """Per account with a notify webhook, or with notices not yet settled: how its
    notices are going (waiting, failing, given up, posted) and the latest error."""
    unsettled = IncidentNotice.posted_at.is_(None) & IncidentNotice.given_up_at.is_(None)
    real_give_up = IncidentNotice.given_up_at.is_not(None) & (
        IncidentNotice.given_up_reason != NO_NOTIFY_WEBHOOK
    )
    counts = (
        select(
            IncidentNotice.account_id.label("account_id"),
            _count(unsettled & (IncidentNotice.failures == 0)).label("waiting"),
            _count(unsettled & (IncidentNotice.failures > 0)).label("failing"),
            _count(real_give_up).label("given_up"),
            _count(IncidentNotice.posted_at.is_not(None)).label("posted"),
            func.min(case((unsettled, IncidentNotice.failing_since))).label("failing_since"),
            func.min(case((unsettled, IncidentNotice.next_try_at))).label("next_try_at"),
            func.max(IncidentNotice.posted_at).label("last_success_at"),
        )
        .group_by(IncidentNotice.account_id)
        .subquery()
    )
    latest = (
        select(IncidentNotice)
        .where(
            IncidentNotice.account_id == Account.id,
            IncidentNotice.last_error.is_not(None),
            IncidentNotice.posted_at.is_(None),
            or_(IncidentNotice.given_up_reason.is_(None), real_give_up),
        )
        .order_by(IncidentNotice.id.desc())
        .limit(1)
    )
    last_error = latest.with_only_columns(IncidentNotice.last_error).scalar_subquery()
    last_given_up = (
        latest.with_only_columns(IncidentNotice.given_up_reason)
        .where(real_give_up)
        .scalar_subquery()
    )
    rows = session.execute(
        select(
            Account.name,
            Account.notify_webhook,
            counts.c.waiting,
            counts.c.failing,
            counts.c.given_up,
            counts.c.posted,
            counts.c.failing_since,
            counts.c.next_try_at,
            counts.c.last_success_at,
            last_error.label("last_error"),
            last_given_up.label("given_up_reason"),
        )
        .outerjoin(counts, counts.c.account_id == Account.id)
        .where(
            or_(
                Account.notify_webhook.is_not(None),
                counts.c.waiting > 0,
                counts.c.failing > 0,
            )
        )
        .order_by(Account.name)
    ).all()
    return [
        {
            "account": r.name,
            "url": r.notify_webhook,
            "waiting": int(r.waiting or 0),
            "failing": int(r.failing or 0),
            "given_up": int(r.given_up or 0),
            "posted": int(r.posted or 0),
            "failing_since": r.failing_since,
            "next_try_at": r.next_try_at,
            "last_success_at": r.last_success_at,
            "last_error": r.last_error,
            "given_up_reason": r.given_up_reason,
        }
        for r in rows
    ]


__all__ = [
    "NO_NOTIFY_WEBHOOK",
    "ClaimedNotice",
    "add_notice",
    "claim_due_notice",
    "failed",
    "give_up",
    "notice_webhooks",
    "posted",
]
