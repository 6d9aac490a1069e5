"""The sweeper's query: find what is due and nobody is handling, in bounded batches.

"Due" means `status = 'pending' AND due_at <= now`, served by a partial index on
`due_at`: the cost follows the number of due rows, not the size of the table. Rows are
taken with `FOR UPDATE SKIP LOCKED` and their `due_at` pushed forward in the same
transaction, so two sweeps running at once take disjoint rows (claim semantics; no
advisory lock needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.store.models import Attempt, AttemptOutcome, Channel, MessageStatus
from worker.store.models import Message as MessageRow


@dataclass
class SweepBatch:
    wake: list[int] = field(default_factory=list)  #: never tried yet: wake on the send queue
    #: Tried before (parked retries, freed leases): woken on the retry queue, so they
    #: never hold up fresh mail.
    wake_retry: list[int] = field(default_factory=list)
    backup: list[int] = field(default_factory=list)  #: past the deadline: backup's turn
    failed: list[int] = field(default_factory=list)  #: past the deadline, no backup
    interrupted: int = 0  #: leases that expired: the worker died mid-attempt

    @property
    def size(self) -> int:
        return len(self.wake) + len(self.wake_retry) + len(self.backup) + len(self.failed)


def sweep_batch(
    session: Session,
    *,
    now: datetime,
    limit: int,
    wake_grace_s: float,
    lease_s: float,
    backup_enabled: bool,
) -> SweepBatch:
    rows = session.execute(
        select(
            MessageRow.id,
            MessageRow.deadline,
            MessageRow.lease_until,
            MessageRow.attempt_count,
            MessageRow.next_attempt_at,
        )
        .where(MessageRow.status == MessageStatus.PENDING.value, MessageRow.due_at <= now)
        .order_by(MessageRow.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    batch = SweepBatch()
    if not rows:
        return batch
    # How long until the sweeper looks again, per row: the grace, doubled for as long as
    # the message has already been waiting. A backlog that is merely slow to drain is
    # then re-woken a few times (logarithmically), not once per grace period.
    regrace: dict[float, list[int]] = {}
    for mid, deadline, lease_until, attempt_count, next_attempt_at in rows:
        regrace.setdefault(
            next_look_s((now - next_attempt_at).total_seconds(), wake_grace_s), []
        ).append(mid)
        if lease_until is not None and lease_until < now and attempt_count > 0:
            _record_interrupted(
                session, mid, attempt_count, lease_until - timedelta(seconds=lease_s), now
            )
            batch.interrupted += 1
        if now >= deadline:
            (batch.backup if backup_enabled else batch.failed).append(mid)
        else:
            (batch.wake_retry if attempt_count else batch.wake).append(mid)
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
            .values(
                status=MessageStatus.FAILED.value,
                finished_at=now,
                last_error=(
                    "Not delivered within the retry window, and no backup provider is "
                    "configured (OUTBOX_BACKUP_PROVIDER)."
                ),
            )
            .execution_options(synchronize_session=False)
        )
    return batch


def next_look_s(waiting_s: float, grace_s: float) -> float:
    """The grace period, doubled until it covers how long the message has waited."""
    wait = grace_s
    while wait < waiting_s:
        wait *= 2
    return wait


def _record_interrupted(
    session: Session, message_id: int, number: int, started: datetime, now: datetime
) -> None:
    exists = session.scalar(
        select(Attempt.id).where(Attempt.message_id == message_id, Attempt.number == number)
    )
    if exists is not None:
        return
    try:
        with session.begin_nested():
            session.add(
                Attempt(
                    message_id=message_id,
                    number=number,
                    channel=Channel.SMTP.value,
                    started_at=started,
                    finished_at=now,
                    outcome=AttemptOutcome.INTERRUPTED.value,
                    server_text=(
                        "The worker handling this attempt stopped before recording a result "
                        "(its lease expired). The message is tried again."
                    ),
                )
            )
            session.flush()
    except IntegrityError:
        pass  # the worker recorded it after all
