"""Writing an SMTP attempt's result: the message's new state and the attempt's row.

This runs once for every message a drain sends, as soon as the server's reply is known,
so it is the hottest write of the system. The database decides how, once, when the
`Database` is built (`Database.attempts`):

* PostgreSQL: one data-modifying statement (UPDATE the message, INSERT the attempt), run
  without BEGIN/COMMIT: atomic by itself, one round trip. The rare cases it cannot settle
  (the sweeper already wrote this attempt as interrupted, or the lease was lost but the
  mail went out) are written again the long way, in a real transaction.
* SQLite (the embedded default): the same writes one after another in one transaction.

Both give the same result (tests/integration/test_sending_store.py runs both).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import JSON, bindparam, cast, column, func, insert, select, true, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.store.messages import (
    ATTEMPT_FIELDS,
    RECORD_RETURNING,
    RECORD_VALUES,
    AttemptRecord,
    Claimed,
    MessageUpdate,
    attempt_params,
    record,
    record_params,
)
from worker.store.models import Attempt, Event, Message, MessageStatus, table

if TYPE_CHECKING:
    from worker.store.db import Database

_MESSAGES = table(Message)
_ATTEMPTS = table(Attempt)
_EVENTS = table(Event)


class AttemptWriter(Protocol):
    """Records one attempt and the message's new state; returns whether the lease was
    still this sender's (a stale sender's retry schedule is not kept, a delivery is)."""

    def record(
        self,
        db: Database,
        claimed: Claimed,
        attempt: AttemptRecord,
        update_: MessageUpdate,
        *,
        now: datetime,
        give_up_after_s: float,
    ) -> bool: ...


class TransactionalAttemptWriter:
    """The message and its attempt, one statement after another, in one transaction."""

    def record(
        self,
        db: Database,
        claimed: Claimed,
        attempt: AttemptRecord,
        update_: MessageUpdate,
        *,
        now: datetime,
        give_up_after_s: float,
    ) -> bool:
        return db.run(
            lambda session: record(session, claimed, attempt, update_, now=now),
            give_up_after_s=give_up_after_s,
        )


def _record_in_one() -> Any:
    updated = (
        update(_MESSAGES)
        .where(_MESSAGES.c.id == bindparam("p_id"), _MESSAGES.c.lease_token == bindparam("p_token"))
        .values(RECORD_VALUES)
        .returning(*RECORD_RETURNING)
        .cte("updated")
    )
    # A plain INSERT: SQLAlchemy caches it, not its ON CONFLICT form. The one conflict
    # (the sweeper wrote this attempt as interrupted) fails the whole statement, and the
    # transactional path then lets the real result win.
    attempt = (
        insert(_ATTEMPTS)
        .values(
            {
                name: bindparam(f"a_{name}", type_=_ATTEMPTS.c[name].type)
                for name in ("message_id", "number", *ATTEMPT_FIELDS)
            }
        )
        .returning(_ATTEMPTS.c.id)
        .cte("attempt")
    )
    # The change's events, numbered after the message's new event_seq, only if the
    # message row changed: `p_events` is a JSON array of {event_id, type, data}.
    drafts = (
        func.jsonb_array_elements(bindparam("p_events", type_=JSONB))
        .table_valued(column("value", JSONB), with_ordinality="ord")
        .render_derived()
    )
    events = (
        insert(_EVENTS)
        .from_select(
            ["event_id", "message_id", "account_id", "seq", "type", "at", "data", "publish_due"],
            select(
                drafts.c.value["event_id"].astext,
                updated.c.id,
                updated.c.account_id,
                updated.c.event_seq - bindparam("p_event_count") + drafts.c.ord,
                drafts.c.value["type"].astext,
                bindparam("p_now"),
                cast(drafts.c.value["data"], JSON),
                updated.c.status_task.is_not(None),
            )
            .select_from(updated)
            .join(drafts, true()),
        )
        .returning(_EVENTS.c.id)
        .cte("events")
    )
    return select(
        select(func.count()).select_from(updated).scalar_subquery().label("owned"),
        select(func.count()).select_from(attempt).scalar_subquery().label("attempts"),
        select(func.count()).select_from(events).scalar_subquery().label("events"),
    )


_RECORD_IN_ONE = _record_in_one()


class SingleStatementAttemptWriter:
    """PostgreSQL: the message and its attempt in one statement, without BEGIN/COMMIT."""

    def __init__(self) -> None:
        self._fallback = TransactionalAttemptWriter()

    def record(
        self,
        db: Database,
        claimed: Claimed,
        attempt: AttemptRecord,
        update_: MessageUpdate,
        *,
        now: datetime,
        give_up_after_s: float,
    ) -> bool:
        params = record_params(claimed, update_, now=now)
        params.update({f"a_{k}": v for k, v in attempt_params(claimed, attempt).items()})
        params["p_events"] = [
            {"event_id": e.event_id, "type": e.type.value, "data": e.data} for e in update_.events
        ]

        def write(session: Session) -> bool | None:
            try:
                owned = bool(session.connection().execute(_RECORD_IN_ONE, params).one().owned)
            except IntegrityError:
                return None  # the sweeper wrote this attempt meanwhile: the long way
            if owned or update_.status != MessageStatus.SENT.value:
                return owned
            return None  # the lease was lost but the mail went out: still record it as sent

        owned = db.run(write, give_up_after_s=give_up_after_s, single_statement=True)
        if owned is not None:
            return owned
        return self._fallback.record(
            db, claimed, attempt, update_, now=now, give_up_after_s=give_up_after_s
        )


def attempt_writer_for(dialect: str) -> AttemptWriter:
    """The writer for a database of this dialect."""
    if dialect == "postgresql":
        return SingleStatementAttemptWriter()
    return TransactionalAttemptWriter()
