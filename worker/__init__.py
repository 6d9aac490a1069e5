"""Outbox's delivery engine: usable and testable without Celery.

`worker.enqueue(...)` is the Python door for services that share the database.
"""

from __future__ import annotations

from typing import Any


def enqueue(**fields: Any) -> int:
    """Validate, store and schedule one email; returns its id. See `worker.client`."""
    from worker.client import enqueue as _enqueue

    return _enqueue(**fields)


__all__ = ["enqueue"]
