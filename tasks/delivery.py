"""`outbox.drain`, `outbox.send` and `outbox.deliver_via_backup`: thin wrappers around the engine.

They unpack the id, call the engine, and publish what it decided: more drains at the back
of the queue, a countdown for the next retry, hand-offs to the backup provider, notices.
A malformed wake-up is dropped with a log line: the database, not the broker, says what
must be sent.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import OperationalError

from config.celery import BACKUP_QUEUE, MAINTENANCE_QUEUE, RETRY_QUEUE, SEND_QUEUE, app
from tasks.runtime import runtime
from worker.backup.engine import BackupStep
from worker.contract import (
    BACKUP_TASK,
    DELIVER_WEBHOOKS_TASK,
    DRAIN_TASK,
    NOTIFY_TASK,
    SEND_TASK,
)
from worker.delivery import Action, DrainOutcome, NoticeDue
from worker.kicks import Coalescer

log = logging.getLogger("outbox.tasks")


def id_arg(value: Any) -> int | None:
    """The one argument a wake-up carries; anything else is refused, not guessed at."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    # A database id is a positive 64-bit integer; anything else is not one of ours.
    return number if 0 < number < 2**63 else None


#: A wake-up whose database was briefly unreachable is tried again by Celery; the claims
#: make the second run safe.
DB_RETRY = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "max_retries": 10,
}


@app.task(name=DRAIN_TASK, **DB_RETRY)
def drain(account_id: Any) -> str:
    """Send a batch of one account's due mail over one connection."""
    aid = id_arg(account_id)
    if aid is None:
        log.error("%s refused a malformed account id: %r", DRAIN_TASK, account_id)
        return "refused"
    outcome = runtime().engine.drain(aid)
    publish_drain_follow_up(outcome)
    return (
        outcome.skipped
        or f"sent {outcome.sent}, failed {outcome.failed}, pending {outcome.deferred}"
    )


@app.task(name=SEND_TASK, **DB_RETRY)
def send(message_id: Any) -> str:
    """A wake-up for one message, as published before the drains: drain its account."""
    mid = id_arg(message_id)
    if mid is None:
        log.error("%s refused a malformed message id: %r", SEND_TASK, message_id)
        return "refused"
    outcome = runtime().engine.deliver(mid)
    if outcome is None:
        return "skipped"
    publish_drain_follow_up(outcome)
    return outcome.skipped or f"sent {outcome.sent}"


@app.task(name=BACKUP_TASK, **DB_RETRY)
def deliver_via_backup(message_id: Any) -> str:
    mid = id_arg(message_id)
    if mid is None:
        log.error("%s refused a malformed message id: %r", BACKUP_TASK, message_id)
        return "refused"
    step = runtime().backup_engine().deliver(mid)
    publish_backup_follow_up(step)
    publish_events_now()
    return step.action.value


def publish_events_now() -> None:
    """The status events the run just wrote go out at once (beat's `outbox.publish_events`
    is only the backstop). A failure here costs latency, never an event."""
    try:
        runtime().events().publish_due(max_batches=5)
    except Exception:
        log.exception("could not publish status events; the next run will")


#: A process asks for at most one webhook run this often (worker.kicks): a receiver hears
#: of a drain's mail within about this long, for one Celery message a second at most.
WEBHOOK_KICK_INTERVAL_S = 0.5
_webhook_kicks = Coalescer(WEBHOOK_KICK_INTERVAL_S)


def kick_webhooks(outcome: DrainOutcome) -> None:
    """Ask for a webhook run after a drain that recorded mail whose events a webhook
    takes (the account's own, or the global one). Losing the kick costs latency only:
    beat's `outbox.deliver_webhooks` runs every OUTBOX_EVENTS_INTERVAL."""
    if not outcome.attempts or not (outcome.webhook or runtime().settings.events_webhook):
        return
    countdown = _webhook_kicks.countdown()
    if countdown is None:
        return
    try:
        app.send_task(DELIVER_WEBHOOKS_TASK, queue=MAINTENANCE_QUEUE, countdown=countdown or None)
    except Exception:
        _webhook_kicks.forget()
        log.exception("could not ask for a webhook run; beat's will post the events")


def publish_drain_follow_up(outcome: DrainOutcome) -> None:
    """Publish what a drain decided. If publishing fails, the sweeper makes up for it."""
    try:
        for _ in range(outcome.continuations):
            drain.apply_async((outcome.account_id,), queue=SEND_QUEUE)
        if outcome.timer_s is not None:
            drain.apply_async((outcome.account_id,), countdown=outcome.timer_s, queue=RETRY_QUEUE)
        for handoff in outcome.backups:
            deliver_via_backup.apply_async(
                (handoff.message_id,), countdown=handoff.countdown_s, queue=BACKUP_QUEUE
            )
        _publish_notices(outcome.notices)
    except Exception:
        log.exception(
            "could not publish what follows the drain of account %s; the sweeper will",
            outcome.account_id,
        )
    if outcome.events_due:  # only mail with a status_task has events to publish by name
        publish_events_now()
    kick_webhooks(outcome)


def publish_backup_follow_up(step: BackupStep) -> None:
    try:
        if step.action is Action.BACKUP:
            deliver_via_backup.apply_async(
                (step.message_id,), countdown=step.countdown_s or 0, queue=BACKUP_QUEUE
            )
        elif step.action is Action.RETRY and step.account_id is not None:
            runtime().wakeups().mail_due(step.account_id)
        _publish_notices(step.notices)
    except Exception:
        log.exception(
            "could not publish the follow-up of message %s; the sweeper will", step.message_id
        )


def _publish_notices(notices: list[NoticeDue] | tuple[NoticeDue, ...]) -> None:
    for notice in notices:
        app.send_task(NOTIFY_TASK, args=(notice.incident_id, notice.kind), queue=MAINTENANCE_QUEUE)


def publish_drain(account_id: int, countdown_s: float | None) -> None:
    """The worker's own `Publish` (worker.wakeups): a drain now, or after a countdown."""
    if countdown_s:
        drain.apply_async((account_id,), countdown=countdown_s, queue=RETRY_QUEUE)
    else:
        drain.apply_async((account_id,), queue=SEND_QUEUE)
