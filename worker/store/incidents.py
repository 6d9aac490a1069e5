"""Incidents: an account's SMTP setup is broken, and what Outbox does about it.

While an incident is open the account's mail is not fired at the broken server one by
one: a single message at a time probes it (a circuit breaker), the rest wait. Opening
and closing are the moments people are told, once each.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.replies import Explanation
from worker.store.db import changed_rows
from worker.store.models import Account, Incident, MessageStatus
from worker.store.models import Message as MessageRow

#: The incident column that records when each kind of notice was emailed (or logged):
#: `outbox.notify`'s claim. Its webhook's state is its row (worker.store.notices).
NOTICE_COLUMNS = {
    "opened": "notified_at",
    "backup": "backup_notified_at",
    "recovered": "recovery_notified_at",
}


@dataclass(frozen=True)
class Circuit:
    allowed: bool  #: this message may talk to the server now
    incident_id: int | None = None
    wait_until: datetime | None = None  #: when the current probe's turn ends


def open_incident(session: Session, account_id: int) -> Incident | None:
    return session.scalar(
        select(Incident).where(Incident.account_id == account_id, Incident.closed_at.is_(None))
    )


def open_incident_id(account_id: Any) -> Any:
    """A scalar subquery: the account's open incident id, or NULL."""
    return (
        select(Incident.id)
        .where(Incident.account_id == account_id, Incident.closed_at.is_(None))
        .limit(1)
        .scalar_subquery()
    )


def check_circuit(
    session: Session,
    account_id: int,
    message_id: int,
    *,
    now: datetime,
    lease_s: float,
    incident_id: int | None,
) -> Circuit:
    """With no open incident, anyone may send; with one, only the probe may.

    `incident_id`: the account's open incident as the caller read it in this transaction
    (`open_incident_id`, in the same query as the account: one round trip less).
    """
    if incident_id is None:
        return Circuit(allowed=True)
    # Lock the incident first: a probe that succeeds meanwhile closes it and wakes the
    # account's mail, and that must wait until this message is either sending or back
    # in the queue (not still leased, which the wake-up would skip).
    session.execute(select(Incident.id).where(Incident.id == incident_id).with_for_update())
    took = session.execute(
        update(Incident)
        .where(
            Incident.id == incident_id,
            or_(
                Incident.probe_until.is_(None),
                Incident.probe_until < now,
                Incident.probe_message_id == message_id,
            ),
        )
        .values(probe_message_id=message_id, probe_until=now + timedelta(seconds=lease_s))
        .returning(Incident.id)
        .execution_options(synchronize_session=False)
    ).scalar()
    if took is not None:
        return Circuit(allowed=True, incident_id=incident_id)
    wait_until = session.scalar(select(Incident.probe_until).where(Incident.id == incident_id))
    return Circuit(allowed=False, incident_id=incident_id, wait_until=wait_until)


def note_account_failure(
    session: Session,
    account_id: int,
    explanation: Explanation,
    *,
    now: datetime,
    message_id: int,
    next_probe_at: datetime,
) -> tuple[int, bool]:
    """Open the account's incident, or update the open one. Returns (id, newly_opened).

    The failing message stays the probe until its next attempt: nobody else tries the
    broken server before then.
    """
    reply = explanation.reply
    values = {
        "verdict": explanation.verdict.value,
        "reason": explanation.meaning,
        "last_code": reply.code,
        "last_enhanced": reply.enhanced,
        "last_reply": str(reply)[:1000],
        "probe_message_id": message_id,
        "probe_until": next_probe_at,
    }
    existing = open_incident(session, account_id)
    if existing is not None:
        for key, value in values.items():
            setattr(existing, key, value)
        session.flush()
        return existing.id, False
    incident = Incident(account_id=account_id, opened_at=now, backup_deliveries=0, **values)
    try:
        with session.begin_nested():
            session.add(incident)
            session.flush()
    except IntegrityError:
        # Another worker opened it a moment ago (one open incident per account).
        existing = open_incident(session, account_id)
        assert existing is not None
        return existing.id, False
    return incident.id, True


def close_incident(session: Session, account_id: int, *, now: datetime) -> int | None:
    """Close the account's open incident; returns its id when there was one."""
    return session.execute(
        update(Incident)
        .where(Incident.account_id == account_id, Incident.closed_at.is_(None))
        .values(closed_at=now, probe_message_id=None, probe_until=None)
        .returning(Incident.id)
        .execution_options(synchronize_session=False)
    ).scalar()


def reopen_probe(session: Session, account_id: int) -> None:
    """Settings were corrected: let the next message probe at once."""
    session.execute(
        update(Incident)
        .where(Incident.account_id == account_id, Incident.closed_at.is_(None))
        .values(probe_message_id=None, probe_until=None)
        .execution_options(synchronize_session=False)
    )


def claim_notice(session: Session, incident_id: int, kind: str, *, now: datetime) -> bool:
    """Take the one email (or log line) of this kind of notice for the incident; False:
    it is someone else's."""
    column = getattr(Incident, NOTICE_COLUMNS[kind])
    result = session.execute(
        update(Incident)
        .where(Incident.id == incident_id, column.is_(None))
        .values({NOTICE_COLUMNS[kind]: now})
        .execution_options(synchronize_session=False)
    )
    return bool(changed_rows(result))


def unclaim_notice(session: Session, incident_id: int, kind: str) -> None:
    """The notice could not be sent: let its retry claim it again."""
    session.execute(
        update(Incident)
        .where(Incident.id == incident_id)
        .values({NOTICE_COLUMNS[kind]: None})
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True)
class NoticeSubject:
    """What a notice about an incident tells: the incident, its account, mail waiting."""

    incident: Incident
    account: Account
    pending: int


def notice_subject(session: Session, incident_id: int) -> NoticeSubject | None:
    incident = session.get(Incident, incident_id)
    if incident is None:
        return None
    account = session.get(Account, incident.account_id)
    assert account is not None
    pending = session.scalar(
        select(func.count())
        .select_from(MessageRow)
        .where(
            MessageRow.account_id == account.id,
            MessageRow.status == MessageStatus.PENDING.value,
        )
    )
    return NoticeSubject(incident, account, int(pending or 0))


def count_backup_delivery(session: Session, account_id: int) -> int | None:
    """A mail of the account went out through the backup during its open incident: count
    it. Returns the incident's id when its "backup" notice is still to be sent."""
    incident = open_incident(session, account_id)
    if incident is None:
        return None
    session.execute(
        update(Incident)
        .where(Incident.id == incident.id)
        .values(backup_deliveries=Incident.backup_deliveries + 1)
    )
    return incident.id if incident.backup_notified_at is None else None
