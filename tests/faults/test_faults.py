"""Faults: nothing accepted is lost, nothing is sent twice outside the documented window.

Real `outbox worker` processes on real Redis and PostgreSQL, aiosmtpd servers and a
provider stub that record what they acknowledged. After each fault the receivers' copies
are counted per Message-ID (`tests.support.tally.judge`): every accepted message must
reach its state, and every extra copy must be explained by a documented window (an
``interrupted`` attempt, or a backup request that timed out).

Some tests park a worker *inside* the duplicate window on purpose (a row lock holds the
record of a send the server has already acknowledged), so a fault injected then hits
the window for sure instead of by chance.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import text

from standins.accounts import make_account
from standins.provider import ProviderStub
from standins.services import outbox_worker, wait_until
from standins.smtp import ScriptedSMTPServer
from tests.support.bulk import enqueue_many, wait_until_finished
from tests.support.event_tally import EVENTS_SECRET, tally_webhook, webhook_settings
from tests.support.faults import (
    BackendKiller,
    backends_waiting_on_lock,
    database_name,
    database_outage,
    flushdb,
    kill9,
    kill_redis_clients,
    pids_connected_to,
    row_lock,
)
from tests.support.outbox import attempts, wait_for_status
from tests.support.signed_webhook import SignedReceiver
from tests.support.tally import Verdict, judge, load_facts
from worker.clock import utcnow
from worker.contract import QUEUES, RETRY_QUEUE, SEND_QUEUE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GREYLISTED = "451 4.7.1 Greylisted, please try again later"
WINDOW_NOTE = (
    "The documented window: the server said 250 and the worker died (or lost its lease) "
    "before recording it; the copy was sent again after the lease, same Message-ID."
)


def _record(
    reliability: Any,
    scenario: str,
    verdict: Verdict,
    *,
    faults: str,
    started: float,
    note: str = "",
    **extra: Any,
) -> None:
    """Hand the figures over before asserting, so a failing run is reported too."""
    reliability.record(
        scenario,
        messages=verdict.messages,
        faults=faults,
        lost=len(verdict.lost),
        duplicates=verdict.duplicates,
        refusals=verdict.statuses.get("failed", 0),
        duration_s=time.monotonic() - started,
        note=note if verdict.duplicates else "",
        **extra,
    )


def _data_started(server: ScriptedSMTPServer) -> bool:
    """The server has answered DATA with 354: the message is on the wire."""
    return ("DATA", 354) in server.commands


def task_results(log: str) -> Counter[str]:
    """How many wake-up tasks ran, by name, and how many of them found nothing to send."""
    results: Counter[str] = Counter()
    for line in log.splitlines():
        found = re.search(r"(outbox\.(?:drain|send))\[.*succeeded in [\d.]+s: '?([^']*)", line)
        if found:
            results[found[1]] += 1
            if not found[2].startswith("sent ") or found[2].startswith("sent 0,"):
                results[f"{found[1]} with nothing to send"] += 1
    return results


@contextlib.contextmanager
def _hold_the_record(fenv, server: ScriptedSMTPServer, mid: int) -> Iterator[None]:
    """The server has acknowledged `mid`, and the worker's record of it waits on a row
    lock until the block ends: the worker is parked inside the duplicate window."""
    url = fenv.values["OUTBOX_DATABASE_URL"]
    dbname = database_name(url)
    wait_until(lambda: _data_started(server), timeout=15, message="DATA")
    with row_lock(url, mid):
        wait_until(lambda: len(server.messages) == 1, timeout=5, message="the 250")
        wait_until(lambda: backends_waiting_on_lock(dbname), timeout=5, message="the record")
        yield


def _wait_past_the_first_lease(fenv, began: float) -> None:
    """Once a message is sent, a second copy can only come from a resend that started
    after the first claim's lease ran out: wait until then (plus a sweep) to see it."""
    horizon = began + float(fenv.values["OUTBOX_LEASE"]) + 2.0
    time.sleep(max(0.0, horizon - time.monotonic()))


# -- 1. kill -9 ------------------------------------------------------------------------


def test_kill9_of_one_child_mid_load_loses_nothing(fenv, db, box, start_worker, reliability):
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as server:
        server.script.hang_after_data_s = 0.01
        make_account(db, box, "acme", port=server.port, tls_mode="none", max_connections=4)
        worker = start_worker(concurrency=2, beat=True)
        ids = enqueue_many(fenv.client(db), "acme", 300)
        kills = 0
        for threshold in (50, 120, 190):
            wait_until(
                lambda t=threshold: len(server.messages) >= t,
                timeout=60,
                message=f"{threshold} deliveries",
            )
            kill9(_a_sending_child(server, worker))
            kills += 1
        wait_until_finished(db, expected=len(ids), timeout=120)
        verdict = judge(db, servers=[server], ids=ids)
    print(f"\nkill -9 of one child x{kills}: {verdict.summary()}")
    _record(
        reliability,
        "kill -9 of one worker child, mid-load",
        verdict,
        faults=f"{kills} x SIGKILL to a sending pool child (c=2)",
        started=started,
        note=WINDOW_NOTE,
    )
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and not verdict.strangers
    assert not verdict.unexplained, verdict.unexplained
    assert verdict.duplicates <= kills  # at most the one send each killed child was in


def _a_sending_child(server: ScriptedSMTPServer, worker) -> int:
    """A pool child with a connection to the server (not the embedded beat). A drain's
    connection lives as long as its batch, so look until one is open."""
    victims: list[int] = []

    def found() -> bool:
        victims[:] = pids_connected_to(server.port, worker.children())
        return bool(victims)

    wait_until(found, timeout=10, interval=0.02, message="a pool child connected to the server")
    return victims[0]


def _held_by_drains(db) -> set[int]:
    """Messages some drain holds right now (claimed, not yet recorded)."""
    with db.session() as session:
        return set(
            session.execute(
                text("SELECT id FROM messages WHERE status = 'pending' AND lease_token IS NOT NULL")
            ).scalars()
        )


def test_kill9_of_a_draining_child_frees_its_batch_within_the_lease(
    fenv, db, box, start_worker, reliability
):
    """A drain holds a whole batch; when its process dies, the other processes deliver the
    batch once the lease runs out (OUTBOX_LEASE 6 s here, 30 s by default) and the next
    sweep frees it, and at most the one message on the wire is sent twice."""
    started = time.monotonic()
    lease_s = float(fenv.values["OUTBOX_LEASE"])
    sweep_s = float(fenv.values["OUTBOX_SWEEP_INTERVAL"])
    with ScriptedSMTPServer(tls="none") as server:
        server.script.hang_after_data_s = 0.02
        make_account(db, box, "acme", port=server.port, tls_mode="none", max_connections=2)
        worker = start_worker(concurrency=3, beat=True)
        ids = enqueue_many(fenv.client(db), "acme", 400)
        wait_until(lambda: len(server.messages) >= 60, timeout=60, message="60 deliveries")
        victim = _a_sending_child(server, worker)
        held = _held_by_drains(db)
        kill9(victim)
        killed_at = utcnow()
        wait_until_finished(db, expected=len(ids), timeout=120)
        verdict = judge(db, servers=[server], ids=ids)
    with db.session() as session:
        finished = dict(
            session.execute(
                text("SELECT id, finished_at FROM messages WHERE id = ANY(:ids)"),
                {"ids": sorted(held)},
            ).all()
        )
    stalled_s = max((finished[m] - killed_at).total_seconds() for m in held)
    print(
        f"\nkill -9 of a draining child: {len(held)} held by drains at the kill, all sent "
        f"{stalled_s:.1f}s after it (lease {lease_s:g}s, sweep every {sweep_s:g}s): "
        f"{verdict.summary()}"
    )
    _record(
        reliability,
        "kill -9 of a child in the middle of a drain's batch",
        verdict,
        faults=f"SIGKILL to a draining child (c=3) holding part of {len(held)} claimed "
        f"mails; the batch was out {stalled_s:.1f} s after the kill (lease {lease_s:g} s)",
        started=started,
        note=WINDOW_NOTE,
    )
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and not verdict.unexplained, verdict.unexplained
    assert verdict.duplicates <= 1
    # Freed when the lease ends and the next sweep runs; then sent at the relay's pace.
    assert stalled_s <= lease_s + 2 * sweep_s + 10.0, stalled_s


def test_kill9_of_the_whole_worker_mid_load_then_restart(fenv, db, box, start_worker, reliability):
    started = time.monotonic()
    concurrency = 2
    with ScriptedSMTPServer(tls="none") as server, SignedReceiver(EVENTS_SECRET) as hooks:
        fenv.values.update(webhook_settings(hooks.url))
        server.script.hang_after_data_s = 0.01
        make_account(db, box, "acme", port=server.port, tls_mode="none", max_connections=4)
        worker = start_worker(concurrency=concurrency, beat=True, name="doomed-1")
        ids = enqueue_many(fenv.client(db), "acme", 300)
        kills = 0
        for n, threshold in enumerate((60, 170), start=2):
            wait_until(
                lambda t=threshold: len(server.messages) >= t,
                timeout=60,
                message=f"{threshold} deliveries",
            )
            worker.kill9()
            kills += 1
            worker = start_worker(concurrency=concurrency, beat=True, name=f"doomed-{n}")
        wait_until_finished(db, expected=len(ids), timeout=120)
        verdict = judge(db, servers=[server], ids=ids)
        events = tally_webhook(db, hooks, timeout=60)
    print(f"\nkill -9 of the whole worker x{kills}: {verdict.summary()}")
    print(f"webhook: {events.summary()}")
    _record(
        reliability,
        "kill -9 of the whole worker, mid-load, restart",
        verdict,
        faults=f"{kills} x SIGKILL to the worker's process group (c={concurrency}) + restart",
        started=started,
        note=WINDOW_NOTE,
        events_lost=len(events.lost),
        event_duplicates=events.duplicates,
    )
    assert events.ok, events.summary()
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and not verdict.strangers
    assert not verdict.unexplained, verdict.unexplained
    assert verdict.duplicates <= kills * concurrency


def test_kill9_inside_the_duplicate_window_costs_exactly_one_copy(
    fenv, db, box, start_worker, reliability
):
    """The documented window, hit on purpose: the 250 arrived, the record cannot be
    written (the database is away and the worker is retrying it), and the worker dies.

    A row lock no longer parks a worker there: the record is one statement, and once it
    has reached PostgreSQL it commits even if the worker dies waiting for the lock.
    """
    started = time.monotonic()
    dbname = database_name(fenv.values["OUTBOX_DATABASE_URL"])
    with ScriptedSMTPServer(tls="none") as server:
        server.script.hang_after_data_s = 0.5
        server.script.hang_after_data = 1
        make_account(db, box, "acme", port=server.port, tls_mode="none")
        worker = start_worker(concurrency=2, beat=True)
        [mid] = enqueue_many(fenv.client(db), "acme", 1)
        wait_until(lambda: _data_started(server), timeout=15, message="DATA")
        [victim] = pids_connected_to(server.port, worker.children())
        with database_outage(dbname):
            wait_until(lambda: len(server.messages) == 1, timeout=5, message="the 250")
            wait_until(
                lambda: "database unavailable" in worker.log(),
                timeout=10,
                message="the worker retrying its record",
            )
            kill9(victim)
        wait_for_status(db, mid, "sent", timeout=60)
        verdict = judge(db, servers=[server], ids=[mid])
        history = [a.outcome for a in attempts(db, mid)]
    print(f"\nkill -9 inside the window: {verdict.summary()} history={history}")
    _record(
        reliability,
        "kill -9 between the server's 250 and the record (forced)",
        verdict,
        faults="database outage holds the record; SIGKILL to the sending child",
        started=started,
        note=WINDOW_NOTE,
    )
    assert history == ["interrupted", "sent"]
    assert verdict.duplicated == {mid: 2} and not verdict.unexplained


# -- 2. broker loss ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["flushdb", "flushdb+disconnect"])
def test_broker_flushed_with_queued_and_scheduled_retries(
    fenv, db, box, start_worker, reliability, mode
):
    """FLUSHDB drops the queues, the unacked and ETA-scheduled wake-ups and kombu's bindings.

    `flushdb+disconnect` also drops every client connection of the test's Redis db: what a
    Redis restart without persistence looks like to the workers.
    """
    # Countdowns of 0-3 s: plenty of greylisting retries are scheduled when the flush hits.
    fenv.values.update(
        {"OUTBOX_RETRY_BASE": "3", "OUTBOX_RETRY_MAX": "5", "OUTBOX_WAKE_GRACE": "4"}
    )
    broker = fenv.values["OUTBOX_BROKER_URL"]
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as server:
        server.script.hang_after_data_s = 0.02
        for i in range(0, 300, 2):  # every other recipient is greylisted once
            server.script.rcpt[f"g{i}@example.com"] = [GREYLISTED]
        make_account(db, box, "acme", port=server.port, tls_mode="none", max_connections=4)
        start_worker(concurrency=2, beat=True)
        client = fenv.client(db)
        recipient = lambda i: f"g{i}@example.com"  # noqa: E731
        ids = enqueue_many(client, "acme", 250, recipient=recipient)
        wait_until(
            lambda: len(server.messages) >= 40 and _retries_scheduled(db) >= 20,
            timeout=60,
            message="deliveries and scheduled retries",
        )
        queued, scheduled = _queue_depth(broker), _retries_scheduled(db)
        flushdb(broker)
        if mode == "flushdb+disconnect":
            kill_redis_clients(broker)
        # Intake goes on after the flush: its wake-ups must still find a worker.
        ids += enqueue_many(client, "acme", 50, recipient=recipient, start=250)
        wait_until_finished(db, expected=len(ids), timeout=120)
        verdict = judge(db, servers=[server], ids=ids)
        undeliverable = int(redis.Redis.from_url(broker).llen("ae.undeliver"))
    print(
        f"\nbroker {mode}: queued at flush={queued} retries scheduled={scheduled} "
        f"dead-lettered={undeliverable}: {verdict.summary()}"
    )
    _record(
        reliability,
        f"Redis {'FLUSHDB' if mode == 'flushdb' else 'FLUSHDB + every client dropped'}",
        verdict,
        faults=f"flush with {queued} wake-ups queued and {scheduled} greylisting retries "
        "scheduled" + ("; every connection of the db killed" if mode != "flushdb" else ""),
        started=started,
    )
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and not verdict.strangers
    assert verdict.duplicates == 0, verdict.duplicated
    assert undeliverable == 0  # kombu routes by queue name: no binding was needed


def test_broker_flushed_with_1000_due_mails_across_20_accounts(
    fenv, db, box, start_worker, reliability
):
    """Every wake-up is lost before any worker runs: the sweeper finds each account's mail
    in the database and wakes the accounts, one drain wake-up each."""
    broker = fenv.values["OUTBOX_BROKER_URL"]
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as server, SignedReceiver(EVENTS_SECRET) as hooks:
        fenv.values.update(webhook_settings(hooks.url))
        for n in range(20):
            make_account(db, box, f"t{n:02d}", port=server.port, tls_mode="none")
        client = fenv.client(db)
        ids: list[int] = []
        for n in range(20):
            ids += enqueue_many(client, f"t{n:02d}", 50, prefix=f"t{n:02d}-")
        queued = _queue_depth(broker)
        flushdb(broker)
        worker = start_worker(concurrency=2, beat=True)
        took = wait_until_finished(db, expected=len(ids), timeout=180)
        verdict = judge(db, servers=[server], ids=ids)
        events = tally_webhook(db, hooks, timeout=60)
    woken = sum(int(n) for n in re.findall(r"sweep \{'accounts_woken': (\d+)", worker.log()))
    print(
        f"\nbroker flushed with {len(ids)} due mails of 20 accounts ({queued} wake-ups lost): "
        f"all out {took:.1f}s after the worker started; the sweeper woke {woken} accounts: "
        f"{verdict.summary()}; webhook: {events.summary()}"
    )
    _record(
        reliability,
        "Redis FLUSHDB with 1,000 due mails of 20 accounts, before any worker ran",
        verdict,
        faults=f"{queued} drain wake-ups flushed; the sweeper woke {woken} accounts",
        started=started,
        events_lost=len(events.lost),
        event_duplicates=events.duplicates,
    )
    assert events.ok, events.summary()
    assert queued == 20  # coalesced: one wake-up per account, not one per mail
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and verdict.duplicates == 0, verdict.duplicated
    assert woken >= 20


def _retries_scheduled(db) -> int:
    """Messages tried once, waiting for their retry (not held by a worker)."""
    with db.session() as session:
        return session.execute(
            text(
                "SELECT count(*) FROM messages WHERE status = 'pending' "
                "AND attempt_count > 0 AND lease_until IS NULL"
            )
        ).scalar_one()


def _queue_depth(broker: str) -> int:
    r = redis.Redis.from_url(broker)
    return sum(r.llen(q) for q in QUEUES)


# -- 3. PostgreSQL restart -------------------------------------------------------------


def test_database_connections_killed_repeatedly_during_sending(
    fenv, db, box, start_worker, reliability
):
    """Every backend of the test's database is terminated every 0.3 s while mail goes out
    (what a restart does to the workers' pooled connections)."""
    dbname = database_name(fenv.values["OUTBOX_DATABASE_URL"])
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as server:
        server.script.hang_after_data_s = 0.05  # ~2 s of sending while the kills go on
        make_account(db, box, "acme", port=server.port, tls_mode="none", max_connections=4)
        worker = start_worker(concurrency=2, beat=True)
        ids = enqueue_many(fenv.client(db), "acme", 300)
        wait_until(lambda: len(server.messages) >= 30, timeout=60, message="first deliveries")
        killer = BackendKiller(dbname, interval_s=0.3).start()
        try:
            wait_until(lambda: len(server.messages) >= 200, timeout=120, message="200 deliveries")
        finally:
            killer.stop()
        wait_until_finished(db, expected=len(ids), timeout=120)
        verdict = judge(db, servers=[server], ids=ids)
        stuck = _stuck_leases(db)
    log = worker.log()
    retried = log.count("database unavailable")
    task_retries = log.count("retry: Retry in")
    print(
        f"\npg backends killed: rounds={killer.rounds} terminated={killer.terminated} "
        f"record retries={retried} task retries={task_retries}: {verdict.summary()}"
    )
    _record(
        reliability,
        "PostgreSQL connections killed every 0.3 s while sending",
        verdict,
        faults=f"{killer.rounds} rounds of pg_terminate_backend ({killer.terminated} connections)",
        started=started,
        note=WINDOW_NOTE,
    )
    assert killer.terminated >= 3, "the fault never hit: nothing was tested"
    assert stuck == 0
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and not verdict.strangers
    assert verdict.duplicates == 0, verdict.duplicated


def _stuck_leases(db) -> int:
    """Pending rows still claimed though their lease is over."""
    with db.session() as session:
        return session.execute(
            text("SELECT count(*) FROM messages WHERE status = 'pending' AND lease_until < now()")
        ).scalar_one()


def _outage_during_the_window(fenv, db, box, start_worker, outage_s: float):
    """One message; the database goes away after DATA, before the 250, for `outage_s`."""
    dbname = database_name(fenv.values["OUTBOX_DATABASE_URL"])
    with ScriptedSMTPServer(tls="none") as server:
        server.script.hang_after_data_s = 0.5
        server.script.hang_after_data = 1
        make_account(db, box, "acme", port=server.port, tls_mode="none")
        start_worker(concurrency=2, beat=True)
        [mid] = enqueue_many(fenv.client(db), "acme", 1)
        wait_until(lambda: _data_started(server), timeout=15, message="DATA")
        began = time.monotonic()
        with database_outage(dbname):
            wait_until(lambda: len(server.messages) == 1, timeout=5, message="the 250")
            # The worker has the 250 in hand and no database to record it in.
            time.sleep(max(0.0, outage_s - (time.monotonic() - began)))
        wait_for_status(db, mid, "sent", timeout=outage_s + 60)
        _wait_past_the_first_lease(fenv, began)
        verdict = judge(db, servers=[server], ids=[mid])
        history = [a.outcome for a in attempts(db, mid)]
    return verdict, history


def test_database_outage_between_the_250_and_the_record_is_waited_out(
    fenv, db, box, start_worker, reliability
):
    """A restart of a few seconds right inside the duplicate window costs no second copy."""
    started = time.monotonic()
    verdict, history = _outage_during_the_window(fenv, db, box, start_worker, outage_s=3.0)
    print(f"\npg outage 3 s inside the window: {verdict.summary()} history={history}")
    _record(
        reliability,
        "PostgreSQL down 3 s between the server's 250 and the record",
        verdict,
        faults="ALLOW_CONNECTIONS false + every backend terminated, for 3 s",
        started=started,
        note=WINDOW_NOTE,
    )
    assert history == ["sent"]
    assert not verdict.lost and verdict.duplicates == 0


def test_database_outage_longer_than_the_record_retries_but_within_the_lease(
    fenv, db, box, start_worker, reliability
):
    # Lease 45 s (the worker owns the message that long); outage 36 s > 31.7 s of retries.
    fenv.values["OUTBOX_LEASE"] = "45"
    started = time.monotonic()
    verdict, history = _outage_during_the_window(fenv, db, box, start_worker, outage_s=36.0)
    print(f"\npg outage 36 s inside the window, lease 45 s: {verdict.summary()} {history}")
    _record(
        reliability,
        "PostgreSQL down 36 s between the 250 and the record (lease 45 s)",
        verdict,
        faults="ALLOW_CONNECTIONS false + every backend terminated, for 36 s",
        started=started,
        note="The record kept retrying for as long as the lease allowed, and went through "
        "when the database came back.",
    )
    assert not verdict.lost
    assert verdict.duplicates == 0, f"sent {verdict.duplicated} times; history {history}"


# -- 4. SMTP server faults -------------------------------------------------------------


def test_smtp_drops_the_connection_after_data(fenv, db, box, start_worker, reliability):
    """The server reads the whole message and hangs up without a reply: retried, once."""
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as server:
        server.script.drop_after_data = 5
        make_account(db, box, "acme", port=server.port, tls_mode="none")
        start_worker(concurrency=2, beat=True)
        ids = enqueue_many(fenv.client(db), "acme", 30)
        wait_until_finished(db, expected=len(ids), timeout=60)
        verdict = judge(db, servers=[server], ids=ids)
        dropped = {m.message_id for m in server.dropped_messages}
        facts = load_facts(db, ids)
    print(f"\nSMTP drop after DATA x{len(dropped)}: {verdict.summary()}")
    _record(
        reliability,
        "SMTP server hangs up after DATA",
        verdict,
        faults=f"{len(dropped)} sessions closed after the data, without a reply",
        started=started,
    )
    assert len(dropped) == 5
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and verdict.duplicates == 0
    for fact in facts.values():
        if fact.header in dropped:
            first = fact.attempts[0]
            assert first[1] == "deferred" and "closed the connection" in (first[3] or "")
            assert fact.attempts[-1][1] == "sent"


def test_smtp_421_mid_session_at_mail_and_at_rcpt(fenv, db, box, start_worker, reliability):
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as server:
        server.script.mail = ["421 4.3.2 Service shutting down, try again later"] * 3
        for i in (3, 7, 11):
            server.script.rcpt[f"u{i}@example.com"] = ["421 4.7.0 Too many errors, closing"]
        make_account(db, box, "acme", port=server.port, tls_mode="none")
        start_worker(concurrency=2, beat=True)
        ids = enqueue_many(fenv.client(db), "acme", 30)
        wait_until_finished(db, expected=len(ids), timeout=60)
        verdict = judge(db, servers=[server], ids=ids)
        facts = load_facts(db, ids)
        with db.session() as session:
            stages = dict(
                session.execute(
                    text(
                        "SELECT stage, count(*) FROM attempts WHERE reply_code = 421 GROUP BY stage"
                    )
                ).all()
            )
    refused = sum(1 for c in server.commands if c[1] == 421)
    print(f"\nSMTP 421 mid-session x{refused} {stages}: {verdict.summary()}")
    _record(
        reliability,
        "SMTP 421 at MAIL and at RCPT",
        verdict,
        faults=f"{refused} x 421 mid-session (3 at MAIL, 3 at RCPT)",
        started=started,
    )
    assert stages.get("mail", 0) >= 1 and stages.get("rcpt", 0) == 3
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and verdict.duplicates == 0
    assert all(f.attempts[-1][1] == "sent" for f in facts.values())


def test_smtp_hang_after_data_times_out_and_other_accounts_keep_flowing(
    fenv, db, box, start_worker, reliability
):
    """One account's server never answers the end of DATA (5 s > the 1 s timeout)."""
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as slow, ScriptedSMTPServer(tls="none") as fast:
        slow.script.hang_after_data_s = 5.0
        make_account(db, box, "slow", port=slow.port, tls_mode="none", max_connections=1)
        make_account(db, box, "fast", port=fast.port, tls_mode="none")
        start_worker(concurrency=2, beat=True)
        client = fenv.client(db)
        slow_ids = enqueue_many(client, "slow", 3, prefix="s")
        wait_until(lambda: _data_started(slow), timeout=15, message="DATA on the slow server")
        flowing = time.monotonic()
        fast_ids = enqueue_many(client, "fast", 40, prefix="f")
        wait_until_finished(db, expected=40, timeout=30)
        fast_s = time.monotonic() - flowing
        # All of the fast account's mail went out while the slow server still hung.
        assert slow.messages == []

        def data_timeouts() -> int:
            return sum(
                1
                for f in load_facts(db, slow_ids).values()
                for a in f.attempts
                if "did not answer within 1s (at DATA)" in (a[3] or "")
            )

        wait_until(data_timeouts, timeout=15, message="an attempt recording the DATA timeout")
        timeouts = data_timeouts()
        assert slow.messages == []
        slow.script.hang_after_data_s = 0.0
        wait_until_finished(db, expected=43, timeout=60)
        verdict = judge(db, servers=[slow, fast], ids=slow_ids + fast_ids)
    print(
        f"\nSMTP hang after DATA: {timeouts} timeouts; 40 mails of another account "
        f"in {fast_s:.1f}s meanwhile: {verdict.summary()}"
    )
    _record(
        reliability,
        "SMTP server hangs after DATA (longer than OUTBOX_SMTP_TIMEOUT)",
        verdict,
        faults=f"{timeouts} DATA timeout(s) on one account; another account sent 40 "
        f"meanwhile, in {fast_s:.1f} s",
        started=started,
    )
    assert verdict.statuses == {"sent": 43}
    assert not verdict.lost and verdict.duplicates == 0


def test_a_finished_drain_frees_its_slot_while_its_process_is_busy_elsewhere(fenv, db, box):
    """Process A drained X, then hangs in a send to Y; the drain of X closed its connection
    and gave its slot back when it ended, so process B takes the slot and sends X's next
    mail at once: X (cap 1) never sees two connections."""
    fenv.values.update({"OUTBOX_SMTP_TIMEOUT": "10", "OUTBOX_LEASE": "60"})
    broker = fenv.values["OUTBOX_BROKER_URL"]
    workers = []
    try:
        with ScriptedSMTPServer(tls="none") as x, ScriptedSMTPServer(tls="none") as y:
            y.script.hang_after_data_s = 8.0
            y.script.hang_after_data = 1
            x_id = make_account(db, box, "x", port=x.port, tls_mode="none", max_connections=1)
            make_account(db, box, "y", port=y.port, tls_mode="none")
            # A takes fresh mail only, B only retries: the test decides who sends what.
            for name, queue in (("a", SEND_QUEUE), ("b", RETRY_QUEUE)):
                proc = outbox_worker(fenv.values, fenv.tmp / f"{name}.log", concurrency=1)
                proc.argv += ["-Q", queue]
                workers.append(proc.start())
            client = fenv.client(db)
            [x1] = enqueue_many(client, "x", 1, prefix="x")
            [y1] = enqueue_many(client, "y", 1, prefix="y")
            wait_for_status(db, x1, "sent", timeout=15)
            wait_until(lambda: _data_started(y), timeout=15, message="DATA on Y")
            # A is stuck in Y's DATA for 8 s; its drain of X has ended.
            client.wakeups = None
            [x2] = enqueue_many(client, "x", 1, prefix="x", start=1)
            assert _slot_free(db, x_id), "the finished drain of X still holds its slot"
            Celery(broker=broker).send_task("outbox.send", args=(x2,), queue=RETRY_QUEUE)
            wait_for_status(db, x2, "sent", timeout=15)
            peak = x.max_concurrent_connections
            wait_for_status(db, y1, "sent", timeout=15)
    finally:
        for proc in workers:
            proc.stop()
    print(f"\nconnections to X (cap 1) at once: {peak}")
    assert peak <= 1


def _slot_free(db, account_id: int) -> bool:
    with db.session() as session:
        return bool(
            session.execute(
                text(
                    "SELECT count(*) FROM smtp_slots WHERE account_id = :a "
                    "AND (holder IS NULL OR expires_at < now())"
                ),
                {"a": account_id},
            ).scalar_one()
        )


# -- 5. backup provider faults -----------------------------------------------------------


@pytest.fixture
def stub():
    with ProviderStub("sendgrid") as stub:
        yield stub


@pytest.fixture
def backup_env(fenv, stub):
    """SMTP that never works (closed port), a 2 s window, then the backup provider."""
    fenv.values.update(
        {
            "OUTBOX_RETRY_WINDOW": "2",
            "OUTBOX_BACKUP_PROVIDER": "sendgrid",
            "OUTBOX_BACKUP_API_KEY": stub.api_key,
            "OUTBOX_BACKUP_API_URL": stub.base_url,
            "OUTBOX_BACKUP_FROM": "Outbox Relay <relay@outbox.example.com>",
            "OUTBOX_BACKUP_TIMEOUT": "1",
            "OUTBOX_BACKUP_RETRY_WINDOW": "20",
        }
    )
    return fenv


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ([("timeout", 3), ("timeout", 3)], "sent"),
        ([503, 503], "sent"),
        ([503] * 1000, "failed"),
    ],
    ids=["timeouts", "503-twice", "503-until-the-retry-window-ends"],
)
def test_backup_provider_timeouts_and_5xx(
    backup_env, db, box, stub, start_worker, reliability, script, expected
):
    if expected == "failed":
        backup_env.values["OUTBOX_BACKUP_RETRY_WINDOW"] = "3"
    stub.script = script
    started = time.monotonic()
    make_account(db, box, "acme", port=_closed_port(), tls_mode="none")
    start_worker(concurrency=2, beat=True)
    ids = enqueue_many(backup_env.client(db), "acme", 5)
    wait_until_finished(db, expected=len(ids), timeout=60)
    # A request the stub is still sleeping on (scripted timeout) is answered within 3 s.
    stub.wait_for_requests(len(stub.requests), timeout_s=5)
    verdict = judge(db, stubs=[stub], ids=ids)
    facts = load_facts(db, ids)
    timeouts = sum(f.backup_timeouts for f in facts.values())
    answered = [r.answered_status for r in stub.requests]
    print(
        f"\nbackup {script[:3]}: answers={answered[:12]} timeouts={timeouts}: {verdict.summary()}"
    )
    label = {"sent": "retried, sent", "failed": "failed after the backup retry window"}[expected]
    _record(
        reliability,
        f"Backup provider {'times out' if script[0] != 503 else 'answers 503'}: {label}",
        verdict,
        faults=f"{timeouts} provider timeouts (the stub answers 202 after 3 s, the client "
        "gives up at 1 s)"
        if script[0] != 503
        else f"{answered.count(503)} x 503",
        started=started,
        note="The second unavoidable window: the provider accepted a request whose answer "
        "timed out; no provider offers an idempotency key, so the retry is a second copy.",
    )
    assert verdict.statuses == {expected: len(ids)}
    assert not verdict.lost and not verdict.unexplained
    # Only a timed-out request the provider accepted anyway can make a second copy.
    assert verdict.duplicates <= timeouts
    if expected == "sent":
        assert all(f.sent_via == "backup" for f in facts.values())
        assert all(f.attempts[-1][:2] == ("backup", "sent") for f in facts.values())
    else:
        assert verdict.delivered_but_not_sent == []
        with db.session() as session:
            errors = session.scalars(text("SELECT last_error FROM messages")).all()
        assert all("kept failing until the end of its retry time" in e for e in errors), errors


# -- 6. SIGTERM ------------------------------------------------------------------------


def test_sigterm_to_the_worker_group_mid_load_then_restart(
    fenv, db, box, start_worker, reliability
):
    """`proc.stop()`: SIGTERM to the whole process group (systemd's default), mid-load."""
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as server:
        server.script.hang_after_data_s = 0.02
        make_account(db, box, "acme", port=server.port, tls_mode="none", max_connections=4)
        worker = start_worker(concurrency=2, beat=True, name="first")
        ids = enqueue_many(fenv.client(db), "acme", 200)
        wait_until(lambda: len(server.messages) >= 60, timeout=60, message="60 deliveries")
        stopping = time.monotonic()
        worker.stop()
        stop_s = time.monotonic() - stopping
        start_worker(concurrency=2, beat=True, name="second")
        wait_until_finished(db, expected=len(ids), timeout=120)
        verdict = judge(db, servers=[server], ids=ids)
    print(f"\nSIGTERM to the group (stopped in {stop_s:.1f}s): {verdict.summary()}")
    _record(
        reliability,
        "SIGTERM to the worker's process group mid-load, restart",
        verdict,
        faults=f"SIGTERM to every process of the worker (stopped in {stop_s:.1f} s), new worker",
        started=started,
        note=WINDOW_NOTE,
    )
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and not verdict.strangers
    assert not verdict.unexplained
    assert verdict.duplicates <= 2  # at most the two sends running when the signal came


def _sigterm_inside_the_window(fenv, db, box, start_worker, *, group: bool):
    """SIGTERM while a child holds the 250 of a message and waits to record it."""
    with ScriptedSMTPServer(tls="none") as server:
        server.script.hang_after_data_s = 0.5
        server.script.hang_after_data = 1
        make_account(db, box, "acme", port=server.port, tls_mode="none")
        worker = start_worker(concurrency=2, beat=True, name="first")
        [mid] = enqueue_many(fenv.client(db), "acme", 1)
        began = time.monotonic()
        with _hold_the_record(fenv, server, mid):
            if group:
                os.killpg(worker.pid, signal.SIGTERM)
            else:
                os.kill(worker.pid, signal.SIGTERM)
            time.sleep(1.0)  # the shutdown is under way while the record still waits
        assert worker.proc is not None
        worker.proc.wait(timeout=30)
        start_worker(concurrency=2, beat=True, name="second")
        wait_for_status(db, mid, "sent", timeout=30)
        _wait_past_the_first_lease(fenv, began)
        verdict = judge(db, servers=[server], ids=[mid])
        history = [a.outcome for a in attempts(db, mid)]
    return verdict, history


def test_sigterm_to_the_main_process_lets_a_running_send_finish(
    fenv, db, box, start_worker, reliability
):
    """Warm shutdown as docker stop and Kubernetes do it: SIGTERM to PID 1 only."""
    started = time.monotonic()
    verdict, history = _sigterm_inside_the_window(fenv, db, box, start_worker, group=False)
    print(f"\nSIGTERM to the main process inside the window: {verdict.summary()} {history}")
    _record(
        reliability,
        "SIGTERM to the main process between the 250 and the record",
        verdict,
        faults="row lock holds the record; SIGTERM to the main process only",
        started=started,
    )
    assert history == ["sent"]
    assert verdict.duplicates == 0 and not verdict.lost


def test_sigterm_to_the_whole_group_lets_a_running_send_finish(
    fenv, db, box, start_worker, reliability
):
    """systemd (KillMode=control-group), Heroku, `kill -TERM -PGID`: every process gets it.

    Pool children ignore SIGTERM (config/celery.py), so the parent's warm shutdown lets
    the send finish; before that, billiard's handler made the child exit mid-task.
    """
    started = time.monotonic()
    verdict, history = _sigterm_inside_the_window(fenv, db, box, start_worker, group=True)
    print(f"\nSIGTERM to the group inside the window: {verdict.summary()} {history}")
    _record(
        reliability,
        "SIGTERM to the whole process group between the 250 and the record",
        verdict,
        faults="row lock holds the record; SIGTERM to every process of the worker",
        started=started,
        note="A pool child died on SIGTERM with the 250 unrecorded, and the message was "
        "sent again after the lease.",
    )
    assert history == ["sent"]
    assert verdict.duplicates == 0 and not verdict.lost


# -- the sweeper and a backlog ------------------------------------------------------------


def test_backlog_longer_than_the_wake_grace_is_published_again(
    fenv, db, box, start_worker, reliability
):
    """A backlog that takes far longer than OUTBOX_WAKE_GRACE to drain.

    One account's 300 mails are one queue in the database, drained batch after batch; while
    a drain holds a live slot the sweeper leaves the account alone, so a slow backlog costs
    no extra wake-ups (before the drains, it cost one more per message per grace period).
    """
    fenv.values["OUTBOX_WAKE_GRACE"] = "3"
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as server:
        server.script.hang_after_data_s = 0.05  # at most ~40 messages/s with 2 children
        make_account(db, box, "acme", port=server.port, tls_mode="none", max_connections=4)
        ids = enqueue_many(fenv.client(db), "acme", 300)  # queued before any worker runs
        worker = start_worker(concurrency=2, beat=True)
        wait_until_finished(db, expected=len(ids), timeout=240)
        drain_s = time.monotonic() - started
        verdict = judge(db, servers=[server], ids=ids)
    log = worker.log()
    republished = sum(int(n) for n in re.findall(r"sweep \{'accounts_woken': (\d+)", log))
    results = task_results(log)
    print(
        f"\nbacklog of {len(ids)} (grace 3 s) drained in {drain_s:.1f}s: the sweeper published "
        f"{republished} more wake-ups, none needed; wake-up tasks run {dict(results)}: "
        f"{verdict.summary()}"
    )
    _record(
        reliability,
        "Backlog that outlasts OUTBOX_WAKE_GRACE",
        verdict,
        faults=f"{len(ids)} queued at once, grace 3 s: the sweeper published {republished} "
        "wake-ups again (none was lost)",
        started=started,
        republished_wakeups=republished,
    )
    assert verdict.statuses == {"sent": len(ids)} and verdict.duplicates == 0
    assert not verdict.lost
