"""`outbox.send` and `outbox.deliver_via_backup`: thin wrappers around the engine.

They unpack the message id, call the engine, and turn its decision into a countdown,
a hand-off or a notice. A malformed wake-up is dropped with a log line: the database,
not the broker, says what must be sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import OperationalError

from config.celery import BACKUP_QUEUE, MAINTENANCE_QUEUE, RETRY_QUEUE, app
from tasks.runtime import runtime
from worker.delivery import Action, Outcome

log = logging.getLogger("outbox.tasks")


def message_id_arg(value: Any) -> int | None:
    """The one argument a wake-up carries; anything else is refused, not guessed at."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    # A database id is a positive 64-bit integer; anything else is not a message of ours.
    return number if 0 < number < 2**63 else None


#: A wake-up whose database was briefly unreachable is tried again by Celery; the claim
#: makes the second run safe.
DB_RETRY = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "max_retries": 10,
}


@app.task(name="outbox.send", **DB_RETRY)
def send(message_id: Any) -> str:
    return _run("outbox.send", message_id, lambda mid: runtime().engine.deliver(mid))


@app.task(name="outbox.deliver_via_backup", **DB_RETRY)
def deliver_via_backup(message_id: Any) -> str:
    return _run(
        "outbox.deliver_via_backup", message_id, lambda mid: runtime().backup_engine().deliver(mid)
    )


def _run(task: str, message_id: Any, deliver: Callable[[int], Outcome]) -> str:
    mid = message_id_arg(message_id)
    if mid is None:
        log.error("%s refused a malformed message id: %r", task, message_id)
        return "refused"
    outcome = deliver(mid)
    follow_up(outcome)
    return outcome.action.value


def follow_up(outcome: Outcome) -> None:
    """Publish what the engine decided. If publishing fails, the sweeper makes up for it."""
    try:
        if outcome.action is Action.RETRY:
            send.apply_async(
                (outcome.message_id,), countdown=outcome.countdown_s, queue=RETRY_QUEUE
            )
        elif outcome.action is Action.BACKUP:
            deliver_via_backup.apply_async(
                (outcome.message_id,), countdown=outcome.countdown_s or 0, queue=BACKUP_QUEUE
            )
        for notice in outcome.notices:
            app.send_task(
                "outbox.notify", args=(notice.incident_id, notice.kind), queue=MAINTENANCE_QUEUE
            )
        if outcome.wake_account_id is not None:
            app.send_task(
                "outbox.wake_account", args=(outcome.wake_account_id,), queue=MAINTENANCE_QUEUE
            )
    except Exception:
        log.exception(
            "could not publish the follow-up of message %s (%s); the sweeper will pick it up",
            outcome.message_id,
            outcome.action.value,
        )


def wake(message_ids: list[int], *, queue: str | None = None) -> int:
    """Send wake-ups; returns how many were published."""
    published = 0
    for mid in message_ids:
        try:
            send.apply_async((mid,), queue=queue) if queue else send.delay(mid)
            published += 1
        except Exception:
            log.exception("could not publish a wake-up for message %s; the sweeper will", mid)
            break
    return published
