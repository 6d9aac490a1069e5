"""`outbox.retry` and `outbox.cancel`: operator actions as tasks (Flower, other services)."""

from __future__ import annotations

from typing import Any

from config.celery import app
from tasks.delivery import wake
from tasks.runtime import runtime


@app.task(name="outbox.retry", ignore_result=False)
def retry(message_ids: list[Any]) -> dict[str, Any]:
    report = runtime().operator().retry([int(m) for m in message_ids])
    wake(report.woken)
    return report.as_dict()


@app.task(name="outbox.cancel", ignore_result=False)
def cancel(message_ids: list[Any]) -> dict[str, Any]:
    return runtime().operator().cancel([int(m) for m in message_ids]).as_dict()
