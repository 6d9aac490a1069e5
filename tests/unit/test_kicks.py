"""worker.kicks.Coalescer: at most one run an interval, and no request left without a
run that starts after it."""

from __future__ import annotations

import itertools

import pytest

from worker.kicks import Coalescer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_request_publishes_a_run_at_once():
    assert Coalescer(0.5, clock=Clock()).countdown() == 0.0


def test_a_request_before_the_published_run_starts_publishes_nothing():
    clock = Clock()
    kicks = Coalescer(0.5, clock=clock)
    assert kicks.countdown() == 0.0
    clock.now += 0.1  # the run published at 100.0 has started: ask again
    assert kicks.countdown() == pytest.approx(0.4)  # starts at 100.5
    clock.now += 0.2  # 100.3: the run at 100.5 will see this commit
    assert kicks.countdown() is None
    clock.now += 0.19
    assert kicks.countdown() is None


def test_after_the_scheduled_run_started_the_next_waits_out_the_interval():
    clock = Clock()
    kicks = Coalescer(0.5, clock=clock)
    kicks.countdown()
    clock.now += 0.5
    assert kicks.countdown() == pytest.approx(0.0)
    clock.now += 2.0  # long after: no wait
    assert kicks.countdown() == 0.0


def test_at_most_one_run_an_interval_under_a_stream_of_requests():
    clock = Clock()
    kicks = Coalescer(0.5, clock=clock)
    starts, requests = [], []
    for _ in range(1000):  # a request every 10 ms for 10 s
        requests.append(clock.now)
        countdown = kicks.countdown()
        if countdown is not None:
            starts.append(clock.now + countdown)
        clock.now += 0.01
    assert 19 <= len(starts) <= 21
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(starts))
    # Every request is followed by a run that starts at or after it, within the interval.
    for at in requests:
        assert any(at <= s <= at + 0.5 + 1e-9 for s in starts), at


def test_a_failed_publish_is_forgotten():
    clock = Clock()
    kicks = Coalescer(0.5, clock=clock)
    kicks.countdown()
    kicks.forget()
    assert kicks.countdown() == 0.0


def test_a_negative_interval_is_refused():
    with pytest.raises(ValueError, match="interval_s"):
        Coalescer(-1)
