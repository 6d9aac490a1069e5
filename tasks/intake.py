"""`outbox.enqueue`: the contract other services use, by task name, without our code.

Validation and storage are the engine's (`worker.client`); this task only turns a
refusal into a task failure the caller can read, with a log line naming the
idempotency key.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import OperationalError

from config.celery import app
from tasks.masking import MaskedTask
from tasks.runtime import runtime
from worker.intake import InvalidRequest

log = logging.getLogger("outbox.intake")


class EnqueueRefused(ValueError):
    """The request was refused; its message names each bad field. Nothing was stored."""


@app.task(
    name="outbox.enqueue",
    base=MaskedTask,
    Request="tasks.masking:MaskedRequest",  # no message content in events, logs, inspect
    ignore_result=False,
    autoretry_for=(OperationalError,),
    retry_backoff=2,
    retry_backoff_max=30,
    max_retries=5,
)
def enqueue(*args: Any, **kwargs: Any) -> dict[str, Any]:
    if args:
        raise EnqueueRefused(
            "request: outbox.enqueue takes keyword arguments only (kwargs={...}), "
            f"got {len(args)} positional argument(s)"
        )
    key = kwargs.get("idempotency_key")
    try:
        accepted = runtime().client().enqueue(**kwargs)
    except InvalidRequest as exc:
        log.warning(
            "enqueue refused: %s",
            exc,
            extra={
                "event": "enqueue_refused",
                "idempotency_key": key if isinstance(key, str) else None,
                "account": kwargs.get("account")
                if isinstance(kwargs.get("account"), str)
                else None,
            },
        )
        raise EnqueueRefused(str(exc)) from None
    return {"id": accepted.id, "created": accepted.created}
