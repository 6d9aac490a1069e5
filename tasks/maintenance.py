"""`outbox.sweep`, `outbox.notify`, `outbox.wake_account`, the webhook dispatcher: the
background housekeeping."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import OperationalError

from config.celery import BACKUP_QUEUE, MAINTENANCE_QUEUE, app
from tasks.delivery import (
    deliver_via_backup,
    drain,
    id_arg,
    publish_drain,
    publish_drain_follow_up,
)
from tasks.runtime import runtime
from worker.contract import (
    DELIVER_WEBHOOKS_TASK,
    NOTIFY_TASK,
    PUBLISH_EVENTS_TASK,
    STATUS_TASK,
    SWEEP_TASK,
    WAKE_ACCOUNT_TASK,
)

log = logging.getLogger("outbox.tasks")


@app.task(name=SWEEP_TASK, ignore_result=False)
def sweep() -> dict[str, int]:
    """Free what dead drains held, hand the window's end to backup, wake idle accounts."""
    totals = {"accounts_woken": 0, "backup": 0, "failed": 0, "interrupted": 0, "returned": 0}
    for batch in runtime().sweeper().run():
        for account_id in batch.accounts:
            try:
                publish_drain(account_id, None)
            except Exception:
                log.exception("could not wake account %s; the next sweep will", account_id)
                break
            totals["accounts_woken"] += 1
        for mid in batch.backup:
            deliver_via_backup.apply_async((mid,), queue=BACKUP_QUEUE)
        totals["backup"] += len(batch.backup)
        totals["failed"] += len(batch.failed)
        totals["interrupted"] += batch.interrupted
        totals["returned"] += batch.returned
    if any(totals.values()):
        log.info("sweep %s", totals, extra={"event": "sweep", **totals})
    return totals


@app.task(
    name=NOTIFY_TASK,
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    retry_backoff_max=600,
    # The email is retried for about the webhooks' retry window: 24 h at the 600 s cap
    # is 144 retries. (The webhook is the dispatcher's, retried from the database.)
    max_retries=160,
    bind=True,
)
def notify(self: Any, incident_id: int, kind: str) -> str:
    """Email an incident notice (or log it), and have its webhook posted now."""
    told = runtime().notifier().send(int(incident_id), str(kind))
    if told.webhook_due:
        try:
            deliver_webhooks.apply_async(queue=MAINTENANCE_QUEUE)
        except Exception:
            log.exception("could not start the webhook dispatcher; its next beat will")
    if told.failed:
        from worker.notify import NoticeFailed

        exc = NoticeFailed(told.failed)
        raise self.retry(exc=exc, countdown=min(600, 10 * 2**self.request.retries))
    return told.outcome


@app.task(name=WAKE_ACCOUNT_TASK)
def wake_account(account_id: int) -> str:
    """Drain the account now (its settings were fixed, its incident is over)."""
    outcome = runtime().engine.drain(int(account_id))
    publish_drain_follow_up(outcome)
    return outcome.skipped or f"sent {outcome.sent}"


@app.task(name=PUBLISH_EVENTS_TASK, ignore_result=True)
def publish_events() -> int:
    """Publish due status events to the callers' tasks (at least once, in order)."""
    return runtime().events().publish_due()


@app.task(name=DELIVER_WEBHOOKS_TASK, ignore_result=True)
def deliver_webhooks() -> int:
    """Post due status events to the webhooks (signed, batched, in order, retried)."""
    return runtime().dispatcher().run()


@app.task(name=STATUS_TASK, ignore_result=False)
def status(message_ids: Any) -> list[dict[str, Any]]:
    """What became of each message: status, why, what to do, next attempt (polling)."""
    ids = message_ids if isinstance(message_ids, list | tuple) else [message_ids]
    if len(ids) > 1000:
        raise ValueError("message_ids: at most 1,000 per call")
    wanted = [id_arg(m) for m in ids]
    return runtime().statuses([m for m in wanted if m is not None])


__all__ = [
    "deliver_webhooks",
    "drain",
    "notify",
    "publish_events",
    "status",
    "sweep",
    "wake_account",
]
