"""The Python door for services that share Outbox's database: validate, store, wake.

    from worker import enqueue, enqueue_many
    message_id = enqueue(account="acme", to=["a@example.com"], subject="Hi", text="...")
    results = enqueue_many([{...}, {...}])   # up to 1,000; one result per request

The drain wake-up is published by task name after the rows are committed, once per
account; if publishing fails, the mail is still stored and the sweeper sends it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from worker.clock import Clock, utcnow
from worker.contract import DRAIN_TASK, RETRY_QUEUE, SEND_QUEUE, broker_transport_options
from worker.intake import FieldError, InvalidRequest, Limits, validate_batch, validate_request
from worker.store.accept import Accepted, accept_many
from worker.store.db import Database
from worker.store.errors import StoreError
from worker.wakeups import Publish, WakeUp, Wakeups

__all__ = ["Accepted", "BatchResult", "IntakeClient", "broker_publisher", "enqueue", "enqueue_many"]


@dataclass(frozen=True)
class BatchResult:
    """One request's result in an `enqueue_many` call: its message, or why it was refused."""

    accepted: Accepted | None
    refused: InvalidRequest | None

    def as_dict(self) -> dict[str, Any]:
        """The contract's form: {"id", "created"} or {"errors": [{"field", "reason"}]}."""
        if self.accepted is not None:
            return {"id": self.accepted.id, "created": self.accepted.created}
        assert self.refused is not None
        return {"errors": [{"field": e.field, "reason": e.reason} for e in self.refused.errors]}


def _refusal(error: StoreError) -> InvalidRequest:
    return InvalidRequest([FieldError(error.field, str(error))])


class IntakeClient:
    """Validates, stores and schedules mail in the caller's process (every door uses one)."""

    def __init__(
        self,
        db: Database,
        *,
        limits: Limits,
        window_s: float,
        wakeups: Wakeups | None,
        clock: Clock = utcnow,
    ) -> None:
        self.db = db
        self.limits = limits
        self.window_s = window_s
        self.wakeups = wakeups
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Any, *, publish: Publish | None = None) -> IntakeClient:
        """A client on the configured database, waking drains through the broker."""
        db = Database(settings.database_url)
        return cls(
            db,
            limits=limits_from(settings),
            window_s=settings.retry_window_s,
            wakeups=Wakeups(
                db,
                publish or broker_publisher(settings.broker_url),
                grace_s=settings.wake_grace_s,
                countdown_max_s=settings.countdown_max_s,
            ),
        )

    def enqueue(self, **fields: Any) -> Accepted:
        """Validate, store and schedule one email; raises `InvalidRequest` naming the field."""
        now = self.clock()
        request = validate_request(fields, limits=self.limits, now=now)
        with self.db.session() as session:
            result = accept_many(session, [request], now=now, window_s=self.window_s)[0]
            wake = self._wake_ups(session, [result])
        if isinstance(result, StoreError):
            raise _refusal(result)
        self._publish(wake)
        return result

    def enqueue_many(self, requests: Sequence[Any]) -> list[BatchResult]:
        """Validate and store up to 1,000 requests, each on its own; one result each, in
        order. Raises `InvalidRequest` only when the call itself is wrong (not a list, or
        too long): then nothing is stored."""
        now = self.clock()
        validated = validate_batch(requests, limits=self.limits, now=now)
        good = [r for r in validated if not isinstance(r, InvalidRequest)]
        stored: list[Accepted | StoreError] = []
        wake: list[WakeUp] = []
        if good:
            with self.db.session() as session:
                stored = accept_many(session, good, now=now, window_s=self.window_s)
                wake = self._wake_ups(session, stored)
        results: list[BatchResult] = []
        done = iter(stored)
        for item in validated:
            if isinstance(item, InvalidRequest):
                results.append(BatchResult(None, item))
                continue
            outcome = next(done)
            if isinstance(outcome, StoreError):
                results.append(BatchResult(None, _refusal(outcome)))
            else:
                results.append(BatchResult(outcome, None))
        self._publish(wake)
        return results

    def _wake_ups(self, session: Session, stored: Sequence[Accepted | StoreError]) -> list[WakeUp]:
        """The drains to wake for the new mail, decided in the transaction that stores it
        (one commit for both); published once it committed."""
        created = [a for a in stored if isinstance(a, Accepted) and a.created]
        if self.wakeups is None or not created:
            return []
        return self.wakeups.requested(session, ((a.account_id, a.due_at) for a in created))

    def _publish(self, wake: list[WakeUp]) -> None:
        if self.wakeups is not None and wake:
            self.wakeups.publish(wake)


def limits_from(settings: Any) -> Limits:
    return Limits(
        max_message_bytes=settings.max_message_bytes,
        max_recipients=settings.max_recipients,
        send_at_horizon_s=settings.send_at_horizon_s,
    )


def broker_publisher(broker_url: str) -> Publish:
    """Publish `outbox.drain` by name: no import of the worker's Celery app needed."""
    from celery import Celery

    producer = Celery("outbox-client", broker=broker_url, set_as_current=False)
    producer.conf.broker_connection_retry_on_startup = True
    producer.conf.broker_transport_options = broker_transport_options(broker_url)

    def publish(account_id: int, countdown_s: float | None) -> None:
        if countdown_s:
            producer.send_task(
                DRAIN_TASK, args=(account_id,), countdown=countdown_s, queue=RETRY_QUEUE
            )
        else:
            producer.send_task(DRAIN_TASK, args=(account_id,), queue=SEND_QUEUE)

    return publish


_default: IntakeClient | None = None


def _client() -> IntakeClient:
    global _default
    if _default is None:
        from config.settings import get_settings

        _default = IntakeClient.from_settings(get_settings())
    return _default


def enqueue(**fields: Any) -> int:
    """Enqueue with the settings from the environment; returns the message id."""
    return _client().enqueue(**fields).id


def enqueue_many(requests: Sequence[Any]) -> list[dict[str, Any]]:
    """Enqueue up to 1,000 requests; one result per request, in order: {"id", "created"}
    or {"errors": [{"field", "reason"}, ...]}."""
    return [r.as_dict() for r in _client().enqueue_many(requests)]
