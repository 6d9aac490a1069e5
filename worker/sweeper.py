"""The sweeper: the relay that makes the database, not the broker, the source of truth.

It wakes waits parked in the database, wake-ups that were lost (broker flushed, worker
killed, publish failed after commit), frees leases of dead workers, and hands mail past
its deadline to the backup provider. Bounded batches, each its own transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from worker.clock import Clock, utcnow
from worker.store.db import Database
from worker.store.sweep import SweepBatch, sweep_batch


@dataclass(frozen=True)
class SweepConfig:
    batch_size: int = 500
    #: At most this many batches per run, so one sweep never runs for long; the next
    #: run continues where it stopped.
    max_batches: int = 40
    wake_grace_s: float = 300.0
    lease_s: float = 300.0
    backup_enabled: bool = False


class Sweeper:
    def __init__(self, db: Database, config: SweepConfig, *, clock: Clock = utcnow) -> None:
        self.db = db
        self.config = config
        self.clock = clock

    def run(self) -> Iterator[SweepBatch]:
        """Yield batches after their transaction commits (publish wake-ups after commit)."""
        for _ in range(self.config.max_batches):
            with self.db.session() as session:
                batch = sweep_batch(
                    session,
                    now=self.clock(),
                    limit=self.config.batch_size,
                    wake_grace_s=self.config.wake_grace_s,
                    lease_s=self.config.lease_s,
                    backup_enabled=self.config.backup_enabled,
                )
            if batch.size:
                yield batch
            if batch.size < self.config.batch_size:
                return
