"""The sweeper: the relay that makes the database, not the broker, the source of truth.

It frees the mail of drains whose worker died (their leases ran out), hands mail past its
deadline to the backup provider, and wakes every account that has due mail and nobody
draining it: a wake-up lost with a flushed broker or a killed worker, a retry parked in the
database, a pause that ended. Bounded batches, each its own transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from worker.clock import Clock, utcnow
from worker.store.db import Database
from worker.store.metrics import SWEEPER, note_run
from worker.store.sweep import SweepBatch, sweep_accounts, sweep_messages


@dataclass(frozen=True)
class SweepConfig:
    batch_size: int = 500
    #: At most this many batches per run, so one sweep never runs for long; the next
    #: run continues where it stopped.
    max_batches: int = 40
    wake_grace_s: float = 60.0
    backup_enabled: bool = True


class Sweeper:
    def __init__(self, db: Database, config: SweepConfig, *, clock: Clock = utcnow) -> None:
        self.db = db
        self.config = config
        self.clock = clock

    def run(self) -> Iterator[SweepBatch]:
        """Yield batches after their transaction commits (publish wake-ups after commit).

        A run that went through to the end is recorded (`outbox_sweeper_last_run_*`: a
        sweeper that stopped running shows there)."""
        started = self.clock()
        yield from self._batches()
        with self.db.session() as session:
            note_run(session, SWEEPER, started_at=started, finished_at=self.clock())

    def _batches(self) -> Iterator[SweepBatch]:
        freed: set[int] = set()
        for _ in range(self.config.max_batches):
            with self.db.session() as session:
                batch, batch_freed = sweep_messages(
                    session,
                    now=self.clock(),
                    limit=self.config.batch_size,
                    wake_grace_s=self.config.wake_grace_s,
                    backup_enabled=self.config.backup_enabled,
                )
            freed |= batch_freed
            if batch.size:
                yield batch
            if batch.size < self.config.batch_size:
                break
        for _ in range(self.config.max_batches):
            with self.db.session() as session:
                accounts = sweep_accounts(
                    session,
                    now=self.clock(),
                    wake_grace_s=self.config.wake_grace_s,
                    limit=self.config.batch_size,
                    freed=freed,
                )
            freed = set()
            if accounts:
                yield SweepBatch(accounts=accounts)
            if len(accounts) < self.config.batch_size:
                return
