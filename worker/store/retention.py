"""Retention: finished mail and its attempts are deleted in bounded batches; the
exporter's counters keep counting what was deleted (`store.metrics.tally_removed`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from worker.store.metrics import tally_removed
from worker.store.models import AttachmentRow, Attempt, MessageStatus
from worker.store.models import Message as MessageRow

FINISHED = (MessageStatus.SENT.value, MessageStatus.FAILED.value, MessageStatus.CANCELLED.value)


def count_purgeable(session: Session, *, cutoff: datetime) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(MessageRow)
            .where(MessageRow.status.in_(FINISHED), MessageRow.finished_at < cutoff)
        )
        or 0
    )


def purge_batch(session: Session, *, cutoff: datetime, limit: int) -> int:
    """Delete up to `limit` finished messages older than `cutoff`; never pending mail."""
    ids = list(
        session.scalars(
            select(MessageRow.id)
            .where(MessageRow.status.in_(FINISHED), MessageRow.finished_at < cutoff)
            .order_by(MessageRow.id)
            .limit(limit)
        )
    )
    if not ids:
        return 0
    tally_removed(session, ids)
    session.execute(delete(Attempt).where(Attempt.message_id.in_(ids)))
    session.execute(delete(AttachmentRow).where(AttachmentRow.message_id.in_(ids)))
    session.execute(delete(MessageRow).where(MessageRow.id.in_(ids)))
    return len(ids)
