"""The sweeper's queries: what nobody is handling, found in bounded batches.

Two questions, each index-backed, so a sweep costs what is due, not the size of the table:

* Messages whose `due_at` passed (a partial index on `due_at WHERE status = 'pending'`):
  a lease that ran out (the drain's worker died: the message it was sending is recorded as
  an `interrupted` attempt, the rest of its batch goes back to the queue uncounted), or a
  deadline that passed (the backup provider's turn). Rows are taken with
  `FOR UPDATE SKIP LOCKED` and their `due_at` pushed forward in the same transaction, so
  two sweeps at once take disjoint rows.
* Accounts with due mail and no drain running or about to (`store.drains.accounts_to_wake`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.orm import Session

from worker.store import drains
from worker.store.events import EventDraft, append
from worker.store.models import (
    Attempt,
    AttemptOutcome,
    Channel,
    EventType,
    MessageStatus,
    table,
)
from worker.store.models import Message as MessageRow

NO_PROVIDER = (
    "Not delivered within the retry window, and no backup provider is configured "
    "(OUTBOX_BACKUP_PROVIDER)."
)
INTERRUPTED = (
    "The worker handling this attempt stopped before recording a result (its lease "
    "expired); the mail may or may not have reached the server. It is tried again."
)


@dataclass
class SweepBatch:
    backup: list[int] = field(default_factory=list)  #: past the deadline: backup's turn
    failed: list[int] = field(default_factory=list)  #: past the deadline, no backup
    interrupted: int = 0  #: attempts whose worker died mid-send (leases that expired)
    #: Messages given back to their account's queue after their drain died, uncounted.
    returned: int = 0
    #: Accounts whose mail must be drained now (freed leases, lost wake-ups).
    accounts: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Messages this batch took (what bounds a sweep's batches)."""
        return len(self.backup) + len(self.failed) + self.interrupted + self.returned


def sweep_messages(
    session: Session,
    *,
    now: datetime,
    limit: int,
    wake_grace_s: float,
    backup_enabled: bool,
) -> tuple[SweepBatch, set[int]]:
    """One batch of messages whose `due_at` passed; returns it and the accounts whose
    mail it freed (to be woken even if their queued flag looks fresh)."""
    rows = session.execute(
        select(
            MessageRow.id,
            MessageRow.account_id,
            MessageRow.deadline,
            MessageRow.lease_until,
            MessageRow.lease_token,
            MessageRow.attempt_count,
            MessageRow.next_attempt_at,
            MessageRow.priority,
        )
        .where(MessageRow.status == MessageStatus.PENDING.value, MessageRow.due_at <= now)
        .order_by(MessageRow.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    batch = SweepBatch()
    freed: set[int] = set()
    if not rows:
        return batch, freed
    # A dead drain's batch: the first unrecorded message in send order may have been on
    # the wire; the others were never tried.
    expired: dict[str, list[Any]] = {}
    for row in rows:
        if row.lease_token is not None and row.lease_until is not None and row.lease_until < now:
            expired.setdefault(row.lease_token, []).append(row)
    interrupted: set[int] = set()
    for group in expired.values():
        first = min(group, key=lambda r: (r.priority, r.next_attempt_at, r.id))
        if first.attempt_count > 0:
            _record_interrupted(session, first.id, first.attempt_count, first.lease_until, now)
            interrupted.add(first.id)
    batch.interrupted = len(interrupted)

    to_queue: list[int] = []
    never_tried: list[int] = []
    regrace: dict[float, list[int]] = {}
    for row in rows:
        if row.lease_token is not None and row.id not in interrupted:
            never_tried.append(row.id)
        if now >= row.deadline:
            (batch.backup if backup_enabled else batch.failed).append(row.id)
            regrace.setdefault(
                next_look_s((now - row.next_attempt_at).total_seconds(), wake_grace_s), []
            ).append(row.id)
        else:
            to_queue.append(row.id)
            freed.add(row.account_id)
    batch.returned = sum(1 for mid in never_tried if mid not in interrupted)
    if never_tried:
        session.execute(
            update(MessageRow)
            .where(MessageRow.id.in_(never_tried), MessageRow.attempt_count > 0)
            .values(attempt_count=MessageRow.attempt_count - 1)
            .execution_options(synchronize_session=False)
        )
    if to_queue:
        # Back in its account's queue; the sweeper itself looks again at the deadline.
        session.execute(
            update(MessageRow)
            .where(MessageRow.id.in_(to_queue), MessageRow.status == MessageStatus.PENDING.value)
            .values(due_at=MessageRow.deadline, lease_until=None, lease_token=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    for wait_s, touched in regrace.items():
        session.execute(
            update(MessageRow)
            .where(MessageRow.id.in_(touched), MessageRow.status == MessageStatus.PENDING.value)
            .values(
                due_at=now + timedelta(seconds=wait_s),
                lease_until=None,
                lease_token=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
    if batch.failed:
        session.execute(
            update(MessageRow)
            .where(MessageRow.id.in_(batch.failed))
            .values(status=MessageStatus.FAILED.value, finished_at=now, last_error=NO_PROVIDER)
            .execution_options(synchronize_session=False)
        )
        for mid in batch.failed:
            append(session, mid, [EventDraft(EventType.FAILED, {"reason": NO_PROVIDER})], now=now)
    return batch, freed


def sweep_accounts(
    session: Session, *, now: datetime, wake_grace_s: float, limit: int, freed: set[int]
) -> list[int]:
    """Accounts to drain now: with due mail nobody is handling, or whose mail was freed."""
    return drains.accounts_to_wake(session, now=now, stale_s=wake_grace_s, limit=limit, extra=freed)


def next_look_s(waiting_s: float, grace_s: float) -> float:
    """The grace period, doubled until it covers how long the message has waited: a
    backlog that is merely slow is looked at again a few times, not once per grace."""
    wait = grace_s
    while wait < waiting_s:
        wait *= 2
    return wait


#: One statement, no savepoint: if the worker recorded the attempt after all, its record
#: stands. Text for the reason store.messages gives (ON CONFLICT constructs are compiled
#: anew on every call); PostgreSQL and SQLite share the syntax.
_INSERT_INTERRUPTED = text(
    "INSERT INTO attempts (message_id, number, channel, started_at, finished_at, outcome, "
    "server_text) VALUES (:message_id, :number, :channel, :started_at, :finished_at, "
    ":outcome, :server_text) ON CONFLICT (message_id, number) DO NOTHING"
).bindparams(
    bindparam("started_at", type_=table(Attempt).c.started_at.type),
    bindparam("finished_at", type_=table(Attempt).c.finished_at.type),
)


def _record_interrupted(
    session: Session, message_id: int, number: int, lease_until: datetime, now: datetime
) -> None:
    session.execute(
        _INSERT_INTERRUPTED,
        {
            "message_id": message_id,
            "number": number,
            "channel": Channel.SMTP.value,
            # The attempt started at some point of the lease; its end is the last
            # moment it could have been alive.
            "started_at": min(lease_until, now),
            "finished_at": now,
            "outcome": AttemptOutcome.INTERRUPTED.value,
            "server_text": INTERRUPTED,
        },
    )
