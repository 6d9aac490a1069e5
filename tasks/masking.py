"""Keep message content out of monitoring: Flower, `celery events`, worker logs.

Celery shows a task's arguments in three places, all from strings, never the real
values: the `task-sent` event (the sender's ``argsrepr``/``kwargsrepr``), the worker's
`task-received` event and "Task ... received" log line (the ``argsrepr``/``kwargsrepr``
message headers, which the *sender* chose), and the `inspect active/reserved/scheduled`
replies (`Request.info`). For ``outbox.enqueue`` the keyword arguments are whole emails
(subject, bodies, attachments), so:

* the worker masks them whatever the sender did: ``outbox.enqueue`` runs with
  `MaskedRequest`, which replaces both reprs with `masked_kwargsrepr` and answers
  `inspect` with the same summary;
* the Flower process masks what it sends itself (`install_send_masking`, used by
  `config.flower`), so its `task-sent` event carries the summary too.

Other services cannot be masked from here: their `task-sent` event (only emitted when
their app sets ``task_send_sent_event``) carries whatever ``kwargsrepr`` they sent.
Callers should pass it themselves::

    from tasks.masking import masked_kwargsrepr   # or build the same string yourself

    app.send_task("outbox.enqueue", kwargs=request, kwargsrepr=masked_kwargsrepr(request))

``outbox.send`` and the other tasks carry only ids: nothing to mask.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Task
from celery.worker.request import Request

from worker.contract import ENQUEUE_MANY_TASK, ENQUEUE_TASK

__all__ = [
    "MASKED_TASKS",
    "MaskedRequest",
    "install_send_masking",
    "masked_argsrepr",
    "masked_kwargsrepr",
]

#: Tasks whose arguments are message content.
MASKED_TASKS = frozenset({ENQUEUE_TASK, ENQUEUE_MANY_TASK})
#: At most this many account names are shown for an `outbox.enqueue_many` call.
_MAX_ACCOUNTS_SHOWN = 5

_RECIPIENT_FIELDS = ("to", "cc", "bcc")
#: Long enough for any real account name or idempotency key (255 characters at most).
_MAX_SHOWN = 255


def _short(value: Any) -> Any:
    """A string field as itself (cut to a sane length); anything else by its type only."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if len(value) <= _MAX_SHOWN else value[:_MAX_SHOWN] + "..."
    return f"<{type(value).__name__}>"


def _count(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return 1
    if isinstance(value, Sequence):
        return len(value)
    return 1


def masked_kwargsrepr(kwargs: Any) -> str:
    """What monitoring may show of an ``outbox.enqueue`` request: who, how many, which key.

    >>> masked_kwargsrepr({"account": "acme", "to": ["a@x.test"], "cc": "b@x.test",
    ...                    "subject": "secret", "idempotency_key": "order-77"})
    "{'account': 'acme', 'recipients': 2, 'idempotency_key': 'order-77'}"

    Never the subject, bodies, headers, addresses or attachments; the number of
    attachments is shown when there are any.
    """
    if not isinstance(kwargs, Mapping):
        return f"<hidden {type(kwargs).__name__}>"
    if "requests" in kwargs:
        return _masked_batch(kwargs["requests"])
    summary: dict[str, Any] = {
        "account": _short(kwargs.get("account")),
        "recipients": sum(_count(kwargs.get(name)) for name in _RECIPIENT_FIELDS),
        "idempotency_key": _short(kwargs.get("idempotency_key")),
    }
    attachments = _count(kwargs.get("attachments"))
    if attachments:
        summary["attachments"] = attachments
    return repr(summary)


def _masked_batch(requests: Any) -> str:
    """An `outbox.enqueue_many` call: how many requests, for which accounts."""
    if not isinstance(requests, Sequence) or isinstance(requests, str | bytes):
        return f"{{'requests': <{type(requests).__name__}>}}"
    accounts = sorted(
        {
            str(_short(r.get("account")))
            for r in requests
            if isinstance(r, Mapping) and r.get("account") is not None
        }
    )
    shown: list[str] = accounts[:_MAX_ACCOUNTS_SHOWN]
    if len(accounts) > _MAX_ACCOUNTS_SHOWN:
        shown.append(f"... {len(accounts) - _MAX_ACCOUNTS_SHOWN} more")
    return repr({"requests": len(requests), "accounts": shown})


def masked_argsrepr(args: Any) -> str:
    """``()``, or how many positional arguments there were (the task refuses them)."""
    if not args:
        return "()"
    count = len(args) if isinstance(args, Sequence) else 1
    return f"(<{count} hidden>)"


class MaskedRequest(Request):
    """A worker request whose arguments are never shown, whatever the sender put in the
    headers: `task-received` events, the "received" log line, `repr()` and `inspect`.

    Set on a task with ``@app.task(..., Request="tasks.masking:MaskedRequest")``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Request reads these two headers in __init__ and every property, event, log
        # line and repr uses them from there on.
        self._argsrepr = masked_argsrepr(self._args)
        self._kwargsrepr = masked_kwargsrepr(self._kwargs)

    def info(self, safe: bool = False) -> dict[str, Any]:
        # `inspect reserved/scheduled` ask for the real values (safe=False): never.
        return super().info(safe=True)


def install_send_masking(app: Any) -> Any:
    """Make ``app.send_task`` mask the reprs of `MASKED_TASKS` (idempotent; returns app).

    Used in the Flower process, whose "send task" API would otherwise publish the
    caller's kwargs in the header and in its own `task-sent` event.
    """
    original = app.send_task
    if getattr(original, "_outbox_masked", False):
        return app

    @functools.wraps(original)
    def send_task(name: str, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any):
        if name in MASKED_TASKS:
            options["argsrepr"] = masked_argsrepr(args)
            options["kwargsrepr"] = masked_kwargsrepr(kwargs if kwargs is not None else {})
        return original(name, args, kwargs, *rest, **options)

    send_task._outbox_masked = True  # type: ignore[attr-defined]
    app.send_task = send_task
    return app


class MaskedTask(Task):  # type: ignore[misc]
    """A task whose every publish (first send, autoretry) carries the masked reprs.

    Celery re-publishes a retried task with its full arguments, and the worker's own
    `task-sent` event for that publish would otherwise carry the whole email.
    """

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        options.setdefault("argsrepr", masked_argsrepr(args or ()))
        options.setdefault("kwargsrepr", masked_kwargsrepr(kwargs or {}))
        return super().apply_async(args, kwargs, **options)
