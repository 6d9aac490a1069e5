"""`outbox.retry` and `outbox.cancel`: operator actions as tasks (Flower, other services)."""

from __future__ import annotations

from typing import Any

from config.celery import app
from tasks.runtime import runtime
from worker.contract import CANCEL_TASK, RETRY_TASK


@app.task(name=RETRY_TASK, ignore_result=False)
def retry(message_ids: list[Any]) -> dict[str, Any]:
    rt = runtime()
    report = rt.operator().retry([int(m) for m in message_ids])
    rt.wakeups().accounts_due((account_id, None) for account_id in report.accounts)
    return report.as_dict()


@app.task(name=CANCEL_TASK, ignore_result=False)
def cancel(message_ids: list[Any]) -> dict[str, Any]:
    return runtime().operator().cancel([int(m) for m in message_ids]).as_dict()
