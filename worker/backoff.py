"""The retry schedule: exponential backoff with full jitter, inside the message's window.

Pure: the clock's reading and the random source are passed in, so the schedule is
deterministic under test.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta


def backoff_cap_s(*, retry_number: int, base_s: float, max_s: float) -> float:
    """Upper bound of the wait before retry ``retry_number`` (0 for the first retry)."""
    if retry_number < 0:
        raise ValueError("retry_number must be >= 0")
    # 2**64 seconds is far beyond any cap; stop the exponent there so floats never overflow.
    return min(max_s, base_s * (2 ** min(retry_number, 64)))


def backoff_delay_s(
    *,
    retry_number: int,
    base_s: float,
    max_s: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """Full jitter (AWS Architecture Blog, 2015): uniform in [0, cap).

    Full jitter spreads retries of mail that failed together (a relay outage, a
    greylisting burst) instead of firing them back at the server in one wave.
    """
    return rng() * backoff_cap_s(retry_number=retry_number, base_s=base_s, max_s=max_s)


def final_attempt_lead_s(window_s: float) -> float:
    """How long before the deadline the last SMTP attempt is made.

    One minute for the 24-hour window; proportionally less for compressed windows, so
    the backup provider only takes over after a real last try.
    """
    return min(60.0, window_s * 0.02)


def next_attempt_at(
    *,
    failed_attempts: int,
    now: datetime,
    deadline: datetime,
    window_s: float,
    base_s: float,
    max_s: float,
    rng: Callable[[], float] = random.random,
) -> datetime | None:
    """When to try again after ``failed_attempts`` failures, or None when the window is over.

    No attempt is scheduled past ``deadline - final_attempt_lead_s``; when the backoff
    would jump past it, the retry is moved to that instant instead: one real last try.
    """
    if failed_attempts < 1:
        raise ValueError("failed_attempts must be >= 1")
    delay = backoff_delay_s(retry_number=failed_attempts - 1, base_s=base_s, max_s=max_s, rng=rng)
    last_try = deadline - timedelta(seconds=final_attempt_lead_s(window_s))
    candidate = now + timedelta(seconds=delay)
    if candidate < last_try:
        return candidate
    if now < last_try:
        return last_try
    return None
