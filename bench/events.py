"""The `events` phase of `bench.run`: what signed webhooks cost and how late they arrive.

Status events are always written, in the transaction of the change they describe; what a
webhook adds is their delivery (the dispatcher's reads, the signed POSTs, the marks) on
the same worker processes. So the cost is the end-to-end rate of one door with a global
webhook set ("on") against the same door without one ("off"), in the same run: off, on,
on, off, so drift over the run falls on both. The receiver (tests/support/signed_webhook)
is a real HTTP server in this process that checks every signature.

The delay is from each event's `at` (the change, as recorded) to the moment the receiver
answered 200: over the bulk runs (a backlog of thousands of events) and, the figure a
sender lives with, while one tenant sends steadily (one mail by name every 0.1 s).
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from bench.harness import log
from tests.support.event_tally import EVENTS_SECRET, webhook_settings

if TYPE_CHECKING:
    from bench.run import Bench

#: The steady sender: one mail by name this often, for this long.
PACE_S = 0.1
PACED_FOR_S = 15.0


def _delays(receiver: Any, since_id: int) -> list[float]:
    """Seconds from each event's `at` to its first 200, for the messages after since_id."""
    from datetime import datetime

    first: dict[str, float] = {}
    for post in receiver.posts:
        if not 200 <= post["answer"] < 300 or not post["body"]:
            continue
        for event in post["body"]["events"]:
            if event["message_id"] > since_id and event["id"] not in first:
                at = datetime.fromisoformat(event["at"]).timestamp()
                first[event["id"]] = post["answered_at"] - at
    return list(first.values())


def _latency(values: list[float]) -> dict[str, float]:
    from bench.run import nearest_rank

    return {
        "n": len(values),
        "p50_s": round(nearest_rank(values, 0.5), 3),
        "p99_s": round(nearest_rank(values, 0.99), 3),
        "max_s": round(max(values), 3),
        "mean_s": round(statistics.fmean(values), 3),
    }


def _event_count(bench: Bench, since_id: int) -> int:
    return int(bench.scalar("SELECT count(*) FROM events WHERE message_id > :s", s=since_id))


def _wait_all_posted(bench: Bench, receiver: Any, since_id: int, *, timeout: float) -> float:
    """Until the receiver got every event of the messages after since_id; returns when."""
    from standins.services import wait_until

    want = _event_count(bench, since_id)

    def done() -> bool:
        bench.check_worker()
        got = {
            e["id"]
            for e in receiver.accepted_events()
            if e["message_id"] > since_id  # the warm-up's events are not this run's
        }
        return len(got) >= want

    wait_until(done, timeout=timeout, interval=0.2, message=f"{want:,} events at the webhook")
    return time.time()


def _one_run(
    bench: Bench, receiver: Any, *, on: bool, n: int
) -> tuple[dict[str, Any], list[float]]:
    """`IntakeClient.enqueue_many` of n mails over e0..e9 into a fresh, warm worker; its
    figures, and (webhook on) each event's delay."""
    extra = webhook_settings(receiver.url) if on else {}
    bench.reset_state()
    receiver.posts.clear()  # only this run's posts: the emptied tables say since 0
    proc = bench.start_worker(f"outbox-worker-events-{'on' if on else 'off'}", extra_env=extra)
    client = bench.intake_client()
    try:
        warm = client.enqueue_many([bench.e2e_request(i) for i in range(200)])
        bench.wait_sent(len(warm), timeout=60)
        if on:
            _wait_all_posted(bench, receiver, 0, timeout=60)
        bench.wait_quiet()
        since = bench.max_id()
        bench.counter.stats(reset=True)
        meter = bench.e2e_meter(proc)
        meter.start()
        started = time.time()
        for start in range(0, n, 1000):
            client.enqueue_many([bench.e2e_request(i) for i in range(start, min(n, start + 1000))])
        bench.wait_sent(n, since_id=since, timeout=max(180, n / 10))
        finished = bench.epoch("SELECT max(finished_at) FROM messages WHERE id > :s", s=since)
        figures: dict[str, Any] = {
            "webhook": on,
            "messages": n,
            "seconds": round(finished - started, 3),
            "msgs_per_s": round(n / (finished - started), 1),
            "events": _event_count(bench, since),
        }
        delays: list[float] = []
        if on:
            posted = _wait_all_posted(bench, receiver, since, timeout=300)
            delays = _delays(receiver, since)
            figures["all_events_posted_after_s"] = round(posted - started, 3)
            figures["delay"] = _latency(delays)
        figures["cpu_ms_per_message"] = meter.per_message_ms(n)
        figures["unverified_posts"] = sum(1 for p in receiver.posts if not p["verified"])
        bench.wait_quiet()
        tasks = bench.counter.stats()
        figures["tasks"] = tasks
        figures["tasks_per_message"] = round(tasks["total"] / n, 4)
        log(
            f"    webhook {'on ' if on else 'off'}: {figures['msgs_per_s']:,.0f} mail/s, "
            f"{figures['events']:,} events"
            + (
                f", all at the webhook after {figures['all_events_posted_after_s']:.1f} s; "
                f"delay p50 {figures['delay']['p50_s']:.2f} s p99 {figures['delay']['p99_s']:.2f} s"
                if on
                else ""
            )
        )
        return figures, delays
    finally:
        client.db.dispose()
        bench.stop_worker()


def _paced(bench: Bench, receiver: Any) -> dict[str, Any]:
    """B sends one mail by name every PACE_S; the delay of each of its events."""
    from bench.run import Pacer

    bench.reset_state()
    receiver.posts.clear()
    bench.start_worker(
        "outbox-worker-events-paced",
        extra_env=webhook_settings(receiver.url),
    )
    try:
        since = bench.max_id()
        pacer = Pacer(
            bench.redis_url, "b", interval_s=PACE_S, duration_s=PACED_FOR_S, key_prefix="ev"
        )
        pacer.start()
        pacer.join(timeout=PACED_FOR_S + 30)
        pacer.stop()
        bench.latencies(pacer.sent, timeout=60)
        _wait_all_posted(bench, receiver, since, timeout=60)
        delays = _delays(receiver, since)
        figures = {
            "mails": len(pacer.sent),
            "every_s": PACE_S,
            "delay": _latency(delays),
            "unverified_posts": sum(1 for p in receiver.posts if not p["verified"]),
        }
        log(
            f"    steady sender, one by name every {PACE_S:g} s: {len(delays)} events, "
            f"delay p50 {figures['delay']['p50_s']:.2f} s p99 {figures['delay']['p99_s']:.2f} s"
        )
        return figures
    finally:
        bench.stop_worker()


def events_phase(bench: Bench) -> None:
    from tests.support.signed_webhook import SignedReceiver

    n = bench.args.messages
    log(f"events: Python enqueue_many of {n:,} mails, webhook off / on / on / off; then paced")
    with bench.db.engine.begin() as conn:
        conn.execute(text("DELETE FROM webhook_destinations"))
    runs = []
    bulk_delays: list[float] = []
    with SignedReceiver(EVENTS_SECRET) as receiver:
        for on in (False, True, True, False):
            figures, delays = _one_run(bench, receiver, on=on, n=n)
            runs.append(figures)
            bulk_delays += delays
            with bench.db.engine.begin() as conn:  # the next run starts with no destination
                conn.execute(text("DELETE FROM webhook_destinations"))
        paced = _paced(bench, receiver)
    unverified = paced["unverified_posts"] + sum(r["unverified_posts"] for r in runs)
    off = [r["msgs_per_s"] for r in runs if not r["webhook"]]
    on = [r["msgs_per_s"] for r in runs if r["webhook"]]
    bench.results["events"] = {
        "runs": runs,
        "off_msgs_per_s": round(statistics.fmean(off), 1),
        "on_msgs_per_s": round(statistics.fmean(on), 1),
        "on_vs_off": round(statistics.fmean(on) / statistics.fmean(off), 3),
        "bulk_delay": _latency(bulk_delays),
        "paced": paced,
        "unverified_posts": unverified,
    }


__all__ = ["events_phase"]
