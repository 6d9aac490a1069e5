"""The operator's actions on messages (retry now, cancel), bound to a database and the
retry window. The transitions themselves are the store's (`worker.store.actions`)."""

from __future__ import annotations

from worker.clock import Clock, utcnow
from worker.store.actions import ActionReport, cancel_messages, retry_messages
from worker.store.db import Database

__all__ = ["ActionReport", "Operator"]


class Operator:
    def __init__(self, db: Database, *, window_s: float, clock: Clock = utcnow) -> None:
        self.db = db
        self.window_s = window_s
        self.clock = clock

    def retry(self, message_ids: list[int]) -> ActionReport:
        """Try now; the caller wakes `report.accounts` after this returns (committed)."""
        with self.db.session() as session:
            return retry_messages(session, message_ids, now=self.clock(), window_s=self.window_s)

    def cancel(self, message_ids: list[int]) -> ActionReport:
        with self.db.session() as session:
            return cancel_messages(session, message_ids, now=self.clock())
