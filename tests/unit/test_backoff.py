"""Unit tests for the retry schedule (worker.backoff): full jitter inside the window."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest

from worker.backoff import backoff_cap_s, backoff_delay_s, final_attempt_lead_s, next_attempt_at

BASE_S = 60.0
MAX_S = 2 * 3600.0
DAY_S = 24 * 3600.0
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
ALMOST_ONE = 1.0 - 1e-9


def _next(
    failed_attempts: int,
    now: datetime,
    *,
    deadline: datetime | None = None,
    window_s: float = DAY_S,
    base_s: float = BASE_S,
    max_s: float = MAX_S,
    rng=lambda: ALMOST_ONE,
) -> datetime | None:
    return next_attempt_at(
        failed_attempts=failed_attempts,
        now=now,
        deadline=deadline if deadline is not None else T0 + timedelta(seconds=window_s),
        window_s=window_s,
        base_s=base_s,
        max_s=max_s,
        rng=rng,
    )


def test_cap_doubles_from_base_until_max_with_defaults():
    caps = [backoff_cap_s(retry_number=n, base_s=BASE_S, max_s=MAX_S) for n in range(10)]
    assert caps == [60, 120, 240, 480, 960, 1920, 3840, 7200, 7200, 7200]


def test_cap_for_huge_retry_numbers_stays_at_max_without_overflow():
    assert backoff_cap_s(retry_number=10_000, base_s=BASE_S, max_s=MAX_S) == MAX_S


@pytest.mark.parametrize("retry_number", [0, 1, 2, 5, 7, 8, 30])
def test_full_jitter_delay_is_in_zero_to_cap(retry_number):
    cap = min(MAX_S, BASE_S * 2**retry_number)
    source = random.Random(retry_number)
    delays = [
        backoff_delay_s(retry_number=retry_number, base_s=BASE_S, max_s=MAX_S, rng=source.random)
        for _ in range(500)
    ]
    assert all(0 <= d < cap for d in delays)
    # Full jitter spreads over the whole range, not just near the cap.
    assert min(delays) < cap * 0.1
    assert max(delays) > cap * 0.9


@pytest.mark.parametrize(
    ("rng_value", "retry_number", "expected"),
    [
        (0.0, 3, 0.0),
        (0.5, 0, 30.0),
        (0.5, 2, 120.0),
        (0.5, 9, 3600.0),
        (0.999999, 0, 60 * 0.999999),
        (0.999999, 7, 7200 * 0.999999),
    ],
)
def test_delay_is_deterministic_with_injected_rng(rng_value, retry_number, expected):
    delay = backoff_delay_s(
        retry_number=retry_number, base_s=BASE_S, max_s=MAX_S, rng=lambda: rng_value
    )
    assert delay == pytest.approx(expected)


def test_next_attempt_after_first_failure_uses_base_cap():
    assert _next(1, T0, rng=lambda: 0.5) == T0 + timedelta(seconds=30)
    assert _next(3, T0, rng=lambda: 0.999999) == T0 + timedelta(seconds=240 * 0.999999)


@pytest.mark.parametrize(
    ("window_s", "expected_lead_s"),
    [
        (DAY_S, 60.0),
        (3600.0, 60.0),
        (3000.0, 60.0),
        (1000.0, 20.0),
        (10.0, 0.2),
        (1.0, 0.02),
    ],
)
def test_final_attempt_lead_is_a_minute_or_two_percent_of_small_windows(window_s, expected_lead_s):
    assert final_attempt_lead_s(window_s) == pytest.approx(expected_lead_s)


@pytest.mark.parametrize("failed_attempts", [1, 4, 8, 20])
@pytest.mark.parametrize("elapsed_s", [0.0, 3600.0, 80_000.0, 86_000.0, 86_339.0])
def test_next_attempt_is_never_past_the_last_try_point(failed_attempts, elapsed_s):
    last_try = T0 + timedelta(seconds=DAY_S - 60)
    result = _next(failed_attempts, T0 + timedelta(seconds=elapsed_s))
    assert result is not None
    assert result <= last_try


def test_backoff_past_last_try_point_returns_exactly_that_point_then_none():
    deadline = T0 + timedelta(seconds=DAY_S)
    last_try = deadline - timedelta(seconds=60)
    now = last_try - timedelta(seconds=100)  # the 7200 s backoff would overshoot

    assert _next(9, now) == last_try
    # The last try happened and failed: the window is over.
    assert _next(10, last_try) is None
    assert _next(10, last_try + timedelta(seconds=1)) is None
    assert _next(10, deadline + timedelta(hours=1)) is None


def test_short_backoff_before_last_try_point_is_not_moved():
    deadline = T0 + timedelta(seconds=DAY_S)
    now = deadline - timedelta(seconds=200)
    assert _next(1, now, rng=lambda: 0.5) == now + timedelta(seconds=30)


def test_compressed_window_schedule_has_the_same_shape():
    window_s = 10.0
    deadline = T0 + timedelta(seconds=window_s)
    last_try = deadline - timedelta(seconds=0.2)

    def nxt(failed: int, now: datetime) -> datetime | None:
        return _next(failed, now, deadline=deadline, window_s=window_s, base_s=1.0, max_s=4.0)

    times = [T0]
    failed = 0
    while True:
        failed += 1
        at = nxt(failed, times[-1])
        if at is None:
            break
        times.append(at)

    gaps = [(b - a).total_seconds() for a, b in pairwise(times)]
    # Waits of 1, 2 and 4 s (to 7 s); the next 4 s wait would pass 9.8 s, so the last
    # try is pulled back to exactly 9.8 s, and after it the window is over.
    assert gaps == pytest.approx([1.0, 2.0, 4.0, 2.8], abs=1e-6)
    assert times[-1] == last_try
    assert all(t < deadline for t in times)


def test_compressed_window_returns_last_try_once_then_none():
    window_s = 10.0
    deadline = T0 + timedelta(seconds=window_s)
    last_try = deadline - timedelta(seconds=0.2)
    kwargs = {"deadline": deadline, "window_s": window_s, "base_s": 1.0, "max_s": 8.0}

    assert _next(1, T0, **kwargs) == T0 + timedelta(seconds=1.0 * ALMOST_ONE)
    assert _next(4, T0 + timedelta(seconds=7), **kwargs) == last_try
    assert _next(5, last_try, **kwargs) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: backoff_cap_s(retry_number=-1, base_s=BASE_S, max_s=MAX_S),
        lambda: backoff_delay_s(retry_number=-1, base_s=BASE_S, max_s=MAX_S),
        lambda: _next(0, T0),
        lambda: _next(-3, T0),
    ],
    ids=["cap-negative-retry", "delay-negative-retry", "zero-failures", "negative-failures"],
)
def test_invalid_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_whole_day_schedule_with_maximal_jitter():
    deadline = T0 + timedelta(seconds=DAY_S)
    attempts = [T0]  # the first attempt, at intake
    while True:
        at = _next(len(attempts), attempts[-1], deadline=deadline)
        if at is None:
            break
        attempts.append(at)

    # Waits 60..3840 (7 retries, 7620 s in all), then 10 waits of 7200 s (to 79 620 s),
    # then one real last try at 86 340 s: 1 + 7 + 10 + 1 attempts.
    assert len(attempts) == 19
    assert all(a < b for a, b in pairwise(attempts))
    assert all(a < deadline for a in attempts)
    assert attempts[-1] == deadline - timedelta(seconds=60)
    gaps = [(b - a).total_seconds() for a, b in pairwise(attempts)]
    assert gaps[:8] == pytest.approx([60, 120, 240, 480, 960, 1920, 3840, 7200], rel=1e-6)
