"""Enqueue many messages quickly, and wait for many to finish, without sleeping blindly."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from sqlalchemy import func, select

from standins.services import wait_until
from worker.client import IntakeClient
from worker.store.db import Database
from worker.store.models import Message


def enqueue_many(
    client: IntakeClient,
    account: str,
    count: int,
    *,
    prefix: str = "u",
    domain: str = "example.com",
    recipient: Callable[[int], str] | None = None,
    start: int = 0,
) -> list[int]:
    """`count` one-recipient messages; recipient i is ``{prefix}{i}@{domain}`` by default."""
    ids = []
    for i in range(start, start + count):
        to = recipient(i) if recipient else f"{prefix}{i}@{domain}"
        ids.append(
            client.enqueue(account=account, to=[to], subject=f"Message {i}", text=f"Body {i}").id
        )
    return ids


def count_by_status(db: Database, ids: Iterable[int] | None = None) -> dict[str, int]:
    with db.session() as session:
        query = select(Message.status, func.count()).group_by(Message.status)
        if ids is not None:
            query = query.where(Message.id.in_(list(ids)))
        return dict(session.execute(query).all())


def wait_until_finished(
    db: Database,
    *,
    expected: int,
    timeout: float,
    finished: tuple[str, ...] = ("sent", "failed", "cancelled"),
    interval: float = 0.25,
) -> float:
    """Wait until `expected` messages are in a finished state; returns seconds waited."""
    started = time.monotonic()

    def done() -> bool:
        counts = count_by_status(db)
        return sum(counts.get(s, 0) for s in finished) >= expected

    try:
        wait_until(done, timeout=timeout, interval=interval, message=f"{expected} finished")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; statuses now: {count_by_status(db)}") from None
    return time.monotonic() - started
