"""Publishing status events to the callers' own tasks, by name, from the database.

At least once and in order per message: an event is marked published only after the
broker took it (publisher confirms on RabbitMQ), and a message's next event waits until
the one before it went out. A publisher that dies between the publish and the mark
publishes that event again: the receiver sees the same event `id` twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from worker.clock import Clock, utcnow
from worker.store import events
from worker.store.db import Database

log = logging.getLogger("outbox.events")

#: send(task_name, queue, event) publishes one event; raises if the broker did not take it.
Send = Callable[[str, str, dict[str, Any]], None]


class EventPublisher:
    """Publishes what is due, batch after batch, until nothing is or the broker fails."""

    def __init__(
        self,
        db: Database,
        send: Send,
        *,
        default_queue: str,
        batch: int = 200,
        clock: Clock = utcnow,
    ) -> None:
        self.db = db
        self.send = send
        self.default_queue = default_queue
        self.batch = batch
        self.clock = clock

    def publish_due(self, *, max_batches: int = 50) -> int:
        """Publish due events; returns how many went out."""
        total = 0
        for _ in range(max_batches):
            with self.db.session() as session:
                due = events.to_publish(session, limit=self.batch)
                done: list[int] = []
                failed = False
                for item in due:
                    try:
                        self.send(item.task, item.queue or self.default_queue, item.event)
                    except Exception:
                        log.exception("could not publish event %s; the next run will", item.row_id)
                        failed = True
                        break
                    done.append(item.row_id)
                events.mark_published(session, done, now=self.clock())
            total += len(done)
            # A batch holds one event per message (the next waits for its predecessor),
            # so a short batch does not mean nothing is left: stop only when none was due.
            if failed or not due:
                break
        return total
