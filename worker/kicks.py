"""Asking for a run of a background job right after a commit, at most once an interval.

A drain that recorded mail of an account with an events webhook asks for a webhook run
(`outbox.deliver_webhooks`) so the receiver hears of it in about a second rather than at
the next beat. Publishing one task per drain would add a Celery message to every drain;
`Coalescer` lets a process publish at most one per interval, and never skips a request
unless the run it already published is still to start: a run that starts later than the
request's commit sees what that commit wrote. Beat's schedule stays the backstop for a
kick that is lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Coalescer:
    """When to publish the next run, given when the last one was published to start."""

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s < 0:
            raise ValueError("interval_s must be >= 0")
        self.interval_s = interval_s
        self.clock = clock
        #: When the run published last starts (its publish time plus its countdown).
        self._starts_at: float | None = None
        self._lock = threading.Lock()

    def countdown(self) -> float | None:
        """The countdown of a run to publish now, or None: the run already published has
        not started yet, and it will see what was committed before this call."""
        with self._lock:
            now = self.clock()
            if self._starts_at is not None and now < self._starts_at:
                return None
            wait = 0.0
            if self._starts_at is not None:
                wait = max(0.0, self._starts_at + self.interval_s - now)
            self._starts_at = now + wait
            return wait

    def forget(self) -> None:
        """The publish failed: the next request publishes again."""
        with self._lock:
            self._starts_at = None


__all__ = ["Coalescer"]
