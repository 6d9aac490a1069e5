"""The Python client for services that share Outbox's database: validate, store, wake.

    from worker import enqueue
    message_id = enqueue(account="acme", to=["a@example.com"], subject="Hi", text="...")

The wake-up is published by task name after the row is committed; if publishing fails,
the message is still stored and the sweeper sends it (`OUTBOX_WAKE_GRACE` later).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from worker.clock import Clock, utcnow
from worker.contract import SEND_QUEUE, SEND_TASK
from worker.intake import Limits, validate_request
from worker.store.db import Database
from worker.store.messages import Accepted, accept

log = logging.getLogger("outbox.client")

Wake = Callable[[int], None]


class Outbox:
    def __init__(
        self,
        db: Database,
        *,
        limits: Limits,
        window_s: float,
        wake_grace_s: float,
        wake: Wake | None,
        clock: Clock = utcnow,
    ) -> None:
        self.db = db
        self.limits = limits
        self.window_s = window_s
        self.wake_grace_s = wake_grace_s
        self._wake = wake
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Any, *, wake: Wake | None = None) -> Outbox:
        """A client on the configured database, waking workers through the broker."""
        if wake is None:
            wake = broker_waker(settings.broker_url)
        return cls(
            Database(settings.database_url),
            limits=Limits(
                max_message_bytes=settings.max_message_bytes,
                max_recipients=settings.max_recipients,
            ),
            window_s=settings.retry_window_s,
            wake_grace_s=settings.wake_grace_s,
            wake=wake,
        )

    def enqueue(self, **fields: Any) -> Accepted:
        """Validate, store and schedule one email; raises `InvalidRequest` naming the field."""
        request = validate_request(fields, limits=self.limits)
        with self.db.session() as session:
            accepted = accept(
                session,
                request,
                now=self.clock(),
                window_s=self.window_s,
                wake_grace_s=self.wake_grace_s,
            )
        if accepted.created and self._wake is not None:
            try:
                self._wake(accepted.id)
            except Exception:
                log.warning(
                    "message %s is stored but its wake-up could not be published; "
                    "the sweeper will send it",
                    accepted.id,
                    exc_info=True,
                )
        return accepted


def broker_waker(broker_url: str) -> Wake:
    """Publish `outbox.send` by name: no import of the worker's Celery app needed."""
    from celery import Celery

    producer = Celery("outbox-client", broker=broker_url, set_as_current=False)
    producer.conf.broker_connection_retry_on_startup = True

    def wake(message_id: int) -> None:
        producer.send_task(SEND_TASK, args=(message_id,), queue=SEND_QUEUE)

    return wake


_default: Outbox | None = None


def enqueue(**fields: Any) -> int:
    """Enqueue with the settings from the environment; returns the message id."""
    global _default
    if _default is None:
        from config.settings import get_settings

        _default = Outbox.from_settings(get_settings())
    return _default.enqueue(**fields).id
