"""Outbox's delivery engine: usable and testable without Celery.

`worker.enqueue(...)` and `worker.enqueue_many([...])` are the Python door for services
that share the database.
"""

from __future__ import annotations

from typing import Any


def enqueue(**fields: Any) -> int:
    """Validate, store and schedule one email; returns its id. See `worker.client`."""
    from worker.client import enqueue as _enqueue

    return _enqueue(**fields)


def enqueue_many(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate and store up to 1,000 emails, each on its own; one result per request, in
    order: {"id": ..., "created": ...} or {"errors": [...]}. See `worker.client`."""
    from worker.client import enqueue_many as _enqueue_many

    return _enqueue_many(requests)


__all__ = ["enqueue", "enqueue_many"]
