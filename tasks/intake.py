"""`outbox.enqueue` and `outbox.enqueue_many`: the contract other services use by task name.

Validation and storage are the engine's (`worker.client`); these tasks only turn a
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
from worker.contract import ENQUEUE_MANY_TASK, ENQUEUE_TASK
from worker.intake import InvalidRequest

log = logging.getLogger("outbox.intake")


class EnqueueRefused(ValueError):
    """The request was refused; its message names each bad field. Nothing was stored."""


_INTAKE_OPTIONS: dict[str, Any] = {
    "base": MaskedTask,
    "Request": "tasks.masking:MaskedRequest",  # no message content in events, logs, inspect
    "ignore_result": False,
    "autoretry_for": (OperationalError,),
    "retry_backoff": 2,
    "retry_backoff_max": 30,
    "max_retries": 5,
}


def _log_refusal(exc: InvalidRequest, request: Any) -> None:
    fields = request if isinstance(request, dict) else {}
    key = fields.get("idempotency_key")
    account = fields.get("account")
    log.warning(
        "enqueue refused: %s",
        exc,
        extra={
            "event": "enqueue_refused",
            "idempotency_key": key if isinstance(key, str) else None,
            "account": account if isinstance(account, str) else None,
        },
    )


def _keywords_only(task: str, args: tuple[Any, ...]) -> None:
    if args:
        raise EnqueueRefused(
            f"request: {task} takes keyword arguments only (kwargs={{...}}), "
            f"got {len(args)} positional argument(s)"
        )


@app.task(name=ENQUEUE_TASK, **_INTAKE_OPTIONS)
def enqueue(*args: Any, **kwargs: Any) -> dict[str, Any]:
    _keywords_only(ENQUEUE_TASK, args)
    try:
        accepted = runtime().client().enqueue(**kwargs)
    except InvalidRequest as exc:
        _log_refusal(exc, kwargs)
        raise EnqueueRefused(str(exc)) from None
    return {"id": accepted.id, "created": accepted.created}


@app.task(name=ENQUEUE_MANY_TASK, **_INTAKE_OPTIONS)
def enqueue_many(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """`requests`: up to 1,000 requests of the `outbox.enqueue` schema. Returns
    {"results": [...]}, one per request, in order: {"id", "created"} or {"errors": [...]}."""
    _keywords_only(ENQUEUE_MANY_TASK, args)
    unknown = sorted(set(kwargs) - {"requests"})
    if unknown:
        raise EnqueueRefused(
            f"{unknown[0][:40]!r}: is not an argument of {ENQUEUE_MANY_TASK} "
            "(it takes requests=[...])"
        )
    try:
        results = runtime().client().enqueue_many(kwargs.get("requests"))
    except InvalidRequest as exc:
        _log_refusal(exc, {})
        raise EnqueueRefused(str(exc)) from None
    for result, request in zip(results, kwargs["requests"], strict=True):
        if result.refused is not None:
            _log_refusal(result.refused, request)
    return {"results": [r.as_dict() for r in results]}
