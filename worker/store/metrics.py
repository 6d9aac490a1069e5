"""The exporter's questions, one index-backed query each: what is pending and for how long,
what finished, what is stuck (`worker.metrics` serves the answers).

A scrape costs what is pending, what finished lately and the number of accounts, never
the size of the table:

* pending mail: the partial indexes on `status = 'pending'` (`ix_messages_pending_due`);
* finishes and attempts: *counters*, each a tally of events already counted (in
  `metric_tallies`) plus the rows past its mark (`metric_marks`): finishes after
  `through_at` (`ix_messages_finished_at`), attempts after `through_id` (the primary key).
  A *fold* (`fold_counters`, run by the exporter before it reads) moves rows older than a
  settle time into the tally and the mark forward, so a read sees only recent rows.

Whoever takes a row out of the part past the mark before a fold counted it adds it to the
tally in the same transaction: purge (`tally_removed`) and an operator reopening a failed
message (`tally_reopened`). So the counters count events and never go down: a purge does
not lower them, a failure an operator retried stays counted as a failure and its later
send is counted too. The one hole: a finish committed more than the settle time after its
`finished_at` (the worker's clock), once a fold has moved past that time, is never
counted; the exporter's settle time is twice the lease, the longest a worker goes on
trying to record an attempt.

Every statement renders on PostgreSQL and SQLite (SQLite ignores `FOR UPDATE`/`FOR SHARE`:
its writers are serialised by `BEGIN IMMEDIATE`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, bindparam, case, func, select, text, type_coerce, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.store.db import Database
from worker.store.models import (
    Account,
    Attempt,
    Incident,
    MaintenanceRun,
    Message,
    MessageStatus,
    MetricMark,
    MetricTally,
    SmtpSlot,
    UTCDateTime,
    table,
)

_ACCOUNTS = table(Account)
_MESSAGES = table(Message)
_ATTEMPTS = table(Attempt)
_INCIDENTS = table(Incident)
_SLOTS = table(SmtpSlot)
_TALLIES = table(MetricTally)
_MARKS = table(MetricMark)
_RUNS = table(MaintenanceRun)

PENDING = MessageStatus.PENDING.value
FINISHED = (MessageStatus.SENT.value, MessageStatus.FAILED.value, MessageStatus.CANCELLED.value)
#: The label value for "none": a failed message has no delivering channel, a backup
#: attempt no SMTP verdict, a pending message may have no failure yet.
NONE = "none"
#: The counter families, as named in `metric_tallies` and `metric_marks`.
FINISHED_FAMILY = "messages_finished"
ATTEMPTS_FAMILY = "attempts"
#: The sweeper's name in `maintenance_runs`.
SWEEPER = "sweeper"
#: A mark that has counted nothing yet.
_NEVER = datetime(1970, 1, 1, tzinfo=UTC)
#: A scrape's statements give up after this long (PostgreSQL): an answer that slow is
#: no answer, and `outbox_up 0` says so.
STATEMENT_TIMEOUT_MS = 10_000

#: (status, channel) of finished mail; channel "none" unless it was sent.
FinishedKey = tuple[str, str]
#: (channel, outcome, verdict) of attempts.
AttemptKey = tuple[str, str, str]


@dataclass(frozen=True)
class PendingGroup:
    """Pending mail of one account with one last verdict."""

    account: str
    verdict: str
    count: int
    #: When the oldest of them was first meant to go out: its `send_at`, else its arrival.
    oldest_start: datetime


@dataclass(frozen=True)
class OpenIncident:
    account: str
    opened_at: datetime


@dataclass(frozen=True)
class TaskRun:
    started_at: datetime
    finished_at: datetime


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything one scrape reports, read in one consistent snapshot of the database."""

    taken_at: datetime
    accounts: int
    pending: list[PendingGroup]
    finished: dict[FinishedKey, int]
    attempts: dict[AttemptKey, int]
    incidents: list[OpenIncident]
    #: Connection slots with a live holder (a running drain), by account.
    slots_in_use: dict[str, int]
    #: Accounts whose drain wake-up is queued and not yet taken.
    drains_waiting: int
    #: Pending mail the sweeper should have looked at more than a grace period ago.
    past_grace: int
    last_sweep: TaskRun | None


# -- reading ---------------------------------------------------------------------------


@contextmanager
def snapshot_session(db: Database) -> Iterator[Session]:
    """A read-only transaction that sees one moment of the database (REPEATABLE READ on
    PostgreSQL; a SQLite transaction already does), so a counter's tally, its mark and the
    rows past the mark always agree."""
    with db.engine.connect() as conn:
        if db.dialect == "postgresql":
            conn = conn.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        with Session(bind=conn) as session, session.begin():
            if db.dialect == "postgresql":
                session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
            yield session


def read_snapshot(
    session: Session, *, now: datetime, wake_grace_s: float, drain_fresh_s: float
) -> MetricsSnapshot:
    """Every answer, in the caller's (snapshot) transaction."""
    return MetricsSnapshot(
        taken_at=now,
        accounts=count_accounts(session),
        pending=pending_groups(session),
        finished=finished_totals(session),
        attempts=attempt_totals(session),
        incidents=open_incidents(session),
        slots_in_use=slots_in_use(session, now=now),
        drains_waiting=drains_waiting(session, now=now, fresh_s=drain_fresh_s),
        past_grace=past_grace(session, now=now, grace_s=wake_grace_s),
        last_sweep=last_run(session, SWEEPER),
    )


_COUNT_ACCOUNTS = select(func.count()).select_from(_ACCOUNTS)


def count_accounts(session: Session) -> int:
    return int(session.execute(_COUNT_ACCOUNTS).scalar_one())


# The moment a pending message was first meant to go out (`max(created_at, send_at)`).
_START = case(
    (_MESSAGES.c.send_at > _MESSAGES.c.created_at, _MESSAGES.c.send_at),
    else_=_MESSAGES.c.created_at,
)
_PENDING_GROUPS = (
    select(
        _ACCOUNTS.c.name,
        _MESSAGES.c.last_verdict,
        func.count(),
        # SQLite hands back MIN() of a datetime as text: the type parses it.
        type_coerce(func.min(_START), UTCDateTime()),
    )
    .select_from(_MESSAGES.join(_ACCOUNTS, _ACCOUNTS.c.id == _MESSAGES.c.account_id))
    .where(_MESSAGES.c.status == PENDING)
    .group_by(_ACCOUNTS.c.name, _MESSAGES.c.last_verdict)
)


def pending_groups(session: Session) -> list[PendingGroup]:
    """Pending mail by account and last verdict: one pass over the pending rows."""
    return [
        PendingGroup(account=name, verdict=verdict or NONE, count=int(n), oldest_start=oldest)
        for name, verdict, n, oldest in session.execute(_PENDING_GROUPS)
    ]


_OPEN_INCIDENTS = (
    select(_ACCOUNTS.c.name, _INCIDENTS.c.opened_at)
    .select_from(_INCIDENTS.join(_ACCOUNTS, _ACCOUNTS.c.id == _INCIDENTS.c.account_id))
    .where(_INCIDENTS.c.closed_at.is_(None))
)


def open_incidents(session: Session) -> list[OpenIncident]:
    """At most one a account (`uq_incidents_open_per_account`, which this reads)."""
    return [OpenIncident(name, opened) for name, opened in session.execute(_OPEN_INCIDENTS)]


_SLOTS_IN_USE = (
    select(_ACCOUNTS.c.name, func.count())
    .select_from(_SLOTS.join(_ACCOUNTS, _ACCOUNTS.c.id == _SLOTS.c.account_id))
    .where(_SLOTS.c.holder.is_not(None), _SLOTS.c.expires_at >= bindparam("p_now"))
    .group_by(_ACCOUNTS.c.name)
)


def slots_in_use(session: Session, *, now: datetime) -> dict[str, int]:
    """Slots whose holder is alive: each is a drain running (or its connection kept open
    for reuse, which counts against the account's cap all the same)."""
    return {name: int(n) for name, n in session.execute(_SLOTS_IN_USE, {"p_now": now})}


_DRAINS_WAITING = select(func.count()).where(
    _ACCOUNTS.c.drain_queued_at >= bindparam("p_fresh_after")
)


def drains_waiting(session: Session, *, now: datetime, fresh_s: float) -> int:
    """Accounts with a fresh queued flag: a wake-up published (or promised by a running
    drain) and not yet taken by a drain. A stale flag is a lost wake-up, the sweeper's."""
    return int(
        session.execute(
            _DRAINS_WAITING, {"p_fresh_after": now - timedelta(seconds=fresh_s)}
        ).scalar_one()
    )


_PAST_GRACE = select(func.count()).where(
    _MESSAGES.c.status == PENDING, _MESSAGES.c.due_at < bindparam("p_before")
)


def past_grace(session: Session, *, now: datetime, grace_s: float) -> int:
    """Pending mail whose `due_at` (when the sweeper must look at it) passed more than a
    grace period ago: a sweeper that is not running or not keeping up. Reads the range of
    `ix_messages_pending_due` before that moment only."""
    return int(
        session.execute(_PAST_GRACE, {"p_before": now - timedelta(seconds=grace_s)}).scalar_one()
    )


_LAST_RUN = select(_RUNS.c.started_at, _RUNS.c.finished_at).where(
    _RUNS.c.task == bindparam("p_task")
)


def last_run(session: Session, task: str) -> TaskRun | None:
    row = session.execute(_LAST_RUN, {"p_task": task}).first()
    return None if row is None else TaskRun(row.started_at, row.finished_at)


def note_run(session: Session, task: str, *, started_at: datetime, finished_at: datetime) -> None:
    """Record a completed run of a periodic task (one row per task, overwritten)."""
    insert = _insert_for(session)(_RUNS).values(
        task=task, started_at=started_at, finished_at=finished_at
    )
    session.execute(
        insert.on_conflict_do_update(
            index_elements=["task"],
            set_={
                "started_at": insert.excluded.started_at,
                "finished_at": insert.excluded.finished_at,
            },
        )
    )


# -- counters --------------------------------------------------------------------------


def _labels(*values: str) -> str:
    return "/".join(values)


_TALLY = select(_TALLIES.c.labels, _TALLIES.c.value).where(
    _TALLIES.c.family == bindparam("p_family")
)
_MARK = select(_MARKS.c.through_at, _MARKS.c.through_id).where(
    _MARKS.c.family == bindparam("p_family")
)


def _finished_counts(where: Any) -> Select[Any]:
    return (
        select(_MESSAGES.c.status, _MESSAGES.c.sent_via, func.count())
        .where(_MESSAGES.c.status.in_(FINISHED), where)
        .group_by(_MESSAGES.c.status, _MESSAGES.c.sent_via)
    )


def _attempt_counts(where: Any) -> Select[Any]:
    return (
        select(_ATTEMPTS.c.channel, _ATTEMPTS.c.outcome, _ATTEMPTS.c.verdict, func.count())
        .where(where)
        .group_by(_ATTEMPTS.c.channel, _ATTEMPTS.c.outcome, _ATTEMPTS.c.verdict)
    )


_FINISHED_SINCE = _finished_counts(_MESSAGES.c.finished_at > bindparam("p_since"))
_ATTEMPTS_SINCE = _attempt_counts(_ATTEMPTS.c.id > bindparam("p_since_id"))


def _finished_key(status: str, sent_via: str | None) -> str:
    return _labels(status, sent_via or NONE)


def _attempt_key(channel: str, outcome: str, verdict: str | None) -> str:
    return _labels(channel, outcome, verdict or NONE)


def _tally(session: Session, family: str) -> dict[str, int]:
    return {labels: int(v) for labels, v in session.execute(_TALLY, {"p_family": family})}


def _mark(session: Session, family: str) -> tuple[datetime, int]:
    row = session.execute(_MARK, {"p_family": family}).first()
    if row is None:
        return _NEVER, 0
    return row.through_at or _NEVER, int(row.through_id or 0)


def finished_totals(session: Session) -> dict[FinishedKey, int]:
    """Messages that reached a final status, by (status, channel), ever (see the module
    docstring): the tally plus the finishes past its mark."""
    totals = _tally(session, FINISHED_FAMILY)
    since, _ = _mark(session, FINISHED_FAMILY)
    for status, via, n in session.execute(_FINISHED_SINCE, {"p_since": since}):
        key = _finished_key(status, via)
        totals[key] = totals.get(key, 0) + int(n)
    out: dict[FinishedKey, int] = {}
    for labels, n in totals.items():
        status, channel = labels.split("/")
        out[(status, channel)] = n
    return out


def attempt_totals(session: Session) -> dict[AttemptKey, int]:
    """Attempts by (channel, outcome, verdict), ever: the tally plus those past its mark."""
    totals = _tally(session, ATTEMPTS_FAMILY)
    _, since_id = _mark(session, ATTEMPTS_FAMILY)
    for channel, outcome, verdict, n in session.execute(_ATTEMPTS_SINCE, {"p_since_id": since_id}):
        key = _attempt_key(channel, outcome, verdict)
        totals[key] = totals.get(key, 0) + int(n)
    out: dict[AttemptKey, int] = {}
    for labels, n in totals.items():
        channel, outcome, verdict = labels.split("/")
        out[(channel, outcome, verdict)] = n
    return out


def _insert_for(session: Session) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (both spell it the same way)."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def _add(session: Session, family: str, counts: Mapping[str, int]) -> None:
    rows = [{"family": family, "labels": k, "value": v} for k, v in counts.items() if v]
    if not rows:
        return
    insert = _insert_for(session)(_TALLIES)
    session.execute(
        insert.on_conflict_do_update(
            index_elements=["family", "labels"],
            set_={"value": _TALLIES.c.value + insert.excluded.value},
        ),
        rows,
    )


def _ensure_marks(session: Session) -> None:
    insert = _insert_for(session)(_MARKS)
    session.execute(
        insert.on_conflict_do_nothing(index_elements=["family"]),
        [{"family": FINISHED_FAMILY}, {"family": ATTEMPTS_FAMILY}],
    )


def _lock_marks(session: Session, *, exclusive: bool) -> dict[str, tuple[datetime, int]] | None:
    """Both marks, locked: exclusively for a fold (None if another fold holds them: it
    does the work), shared for whoever removes rows (waits for a running fold)."""
    _ensure_marks(session)
    query = select(_MARKS.c.family, _MARKS.c.through_at, _MARKS.c.through_id).where(
        _MARKS.c.family.in_((FINISHED_FAMILY, ATTEMPTS_FAMILY))
    )
    query = (
        query.with_for_update(skip_locked=True) if exclusive else query.with_for_update(read=True)
    )
    rows = {
        r.family: (r.through_at or _NEVER, int(r.through_id or 0)) for r in session.execute(query)
    }
    return rows if len(rows) == 2 else None


_FOLD_FINISHED = _finished_counts(
    (_MESSAGES.c.finished_at > bindparam("p_since"))
    & (_MESSAGES.c.finished_at <= bindparam("p_through"))
)
_FOLD_THROUGH_ID = select(func.max(_ATTEMPTS.c.id)).where(
    _ATTEMPTS.c.id > bindparam("p_since_id"),
    func.coalesce(_ATTEMPTS.c.finished_at, _ATTEMPTS.c.started_at) <= bindparam("p_through"),
)
_FOLD_ATTEMPTS = _attempt_counts(
    (_ATTEMPTS.c.id > bindparam("p_since_id")) & (_ATTEMPTS.c.id <= bindparam("p_through_id"))
)
_SET_MARK = (
    update(_MARKS)
    .where(_MARKS.c.family == bindparam("p_family"))
    .values(
        through_at=bindparam("p_through_at", type_=UTCDateTime()),
        through_id=bindparam("p_through_id_value"),
    )
)


def fold_counters(session: Session, *, now: datetime, settle_s: float) -> bool:
    """Move finishes and attempts older than `settle_s` into the tallies, and the marks
    past them. False when another fold is running (it does the same work)."""
    marks = _lock_marks(session, exclusive=True)
    if marks is None:
        return False
    through = now - timedelta(seconds=settle_s)
    since, _ = marks[FINISHED_FAMILY]
    if through > since:
        counts = session.execute(_FOLD_FINISHED, {"p_since": since, "p_through": through})
        _add(session, FINISHED_FAMILY, {_finished_key(s, v): int(n) for s, v, n in counts})
        session.execute(
            _SET_MARK,
            {"p_family": FINISHED_FAMILY, "p_through_at": through, "p_through_id_value": None},
        )
    _, since_id = marks[ATTEMPTS_FAMILY]
    through_id = session.execute(
        _FOLD_THROUGH_ID, {"p_since_id": since_id, "p_through": through}
    ).scalar()
    if through_id is not None:
        counts = session.execute(
            _FOLD_ATTEMPTS, {"p_since_id": since_id, "p_through_id": through_id}
        )
        _add(session, ATTEMPTS_FAMILY, {_attempt_key(c, o, v): int(n) for c, o, v, n in counts})
        session.execute(
            _SET_MARK,
            {"p_family": ATTEMPTS_FAMILY, "p_through_at": None, "p_through_id_value": through_id},
        )
    return True


def tally_removed(session: Session, message_ids: Iterable[int]) -> None:
    """These messages and their attempts are about to be deleted (purge): count the ones
    no fold has counted yet, so the counters keep them. Same transaction as the delete."""
    ids = list(message_ids)
    if not ids:
        return
    marks = _lock_marks(session, exclusive=False)
    assert marks is not None  # a shared lock waits; it never skips
    since, _ = marks[FINISHED_FAMILY]
    _, since_id = marks[ATTEMPTS_FAMILY]
    finished = session.execute(
        _finished_counts(_MESSAGES.c.id.in_(ids) & (_MESSAGES.c.finished_at > since))
    )
    _add(session, FINISHED_FAMILY, {_finished_key(s, v): int(n) for s, v, n in finished})
    attempts = session.execute(
        _attempt_counts(_ATTEMPTS.c.message_id.in_(ids) & (_ATTEMPTS.c.id > since_id))
    )
    _add(session, ATTEMPTS_FAMILY, {_attempt_key(c, o, v): int(n) for c, o, v, n in attempts})


def tally_reopened(
    session: Session, *, status: str, sent_via: str | None, finished_at: datetime | None
) -> None:
    """A finished message goes back to pending (an operator's retry): its finish stays
    counted. Same transaction as the reopening."""
    marks = _lock_marks(session, exclusive=False)
    assert marks is not None
    since, _ = marks[FINISHED_FAMILY]
    if finished_at is not None and finished_at > since:
        _add(session, FINISHED_FAMILY, {_finished_key(status, sent_via): 1})
