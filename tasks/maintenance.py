"""`outbox.sweep`, `outbox.notify`, `outbox.wake_account`: the background housekeeping."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import OperationalError

from config.celery import BACKUP_QUEUE, RETRY_QUEUE, app
from tasks.delivery import deliver_via_backup, wake
from tasks.runtime import runtime

log = logging.getLogger("outbox.tasks")


@app.task(name="outbox.sweep", ignore_result=False)
def sweep() -> dict[str, int]:
    """Wake what is due, free what a dead worker held, hand the window's end to backup."""
    rt = runtime()
    totals = {"woken": 0, "backup": 0, "failed": 0, "interrupted": 0}
    for batch in rt.sweeper().run():
        totals["woken"] += wake(batch.wake) + wake(batch.wake_retry, queue=RETRY_QUEUE)
        for mid in batch.backup:
            deliver_via_backup.apply_async((mid,), queue=BACKUP_QUEUE)
        totals["backup"] += len(batch.backup)
        totals["failed"] += len(batch.failed)
        totals["interrupted"] += batch.interrupted
    if any(totals.values()):
        log.info("sweep %s", totals, extra={"event": "sweep", **totals})
    return totals


@app.task(
    name="outbox.notify",
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    retry_backoff_max=600,
    max_retries=12,
    bind=True,
)
def notify(self: Any, incident_id: int, kind: str) -> str:
    try:
        return runtime().notifier().send(int(incident_id), str(kind))
    except Exception as exc:
        from worker.notify import NoticeFailed

        if isinstance(exc, NoticeFailed):
            raise self.retry(exc=exc, countdown=min(600, 10 * 2**self.request.retries)) from exc
        raise


@app.task(name="outbox.wake_account")
def wake_account(account_id: int) -> int:
    """Send every due pending message of the account now (settings fixed, incident over)."""
    ids = runtime().due_of_account(int(account_id))
    return wake(ids)
