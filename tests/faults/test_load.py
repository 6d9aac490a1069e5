"""Load: 10,000 messages over 50 accounts with mixed server behaviour, one compressed window.

Each account has its own scripted SMTP server (its own login where it needs one), so
per-account connection caps can be checked on the server side. Behaviours:

- healthy: accepts everything (1 attempt);
- greylist: 451 once per recipient, then accepts (2 attempts);
- bad password: 535 at AUTH; the circuit breaker lets one message probe at a time, and at
  the window's end the backup provider delivers each message once;
- unreachable: a closed port; same ending as a bad password;
- unknown users: 550 5.1.1 for every recipient: failed after 1 attempt, never to backup.

Every status event goes to a global signed webhook, a real receiver that checks each
signature; the test counts the events it got against the events table, as it counts mail.

``OUTBOX_LOAD_MESSAGES`` sets the number of messages (default 10,000);
``OUTBOX_LOAD_WORKERS`` / ``OUTBOX_LOAD_CONCURRENCY`` the worker layout (default 1 x 2).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import redis
from sqlalchemy import text

from standins.accounts import make_account
from standins.provider import ProviderStub
from standins.smtp import ScriptedSMTPServer
from tests.support.bulk import count_by_status, wait_until_finished
from tests.support.event_tally import EVENTS_SECRET, tally_webhook, webhook_settings
from tests.support.faults import RssSampler
from tests.support.signed_webhook import SignedReceiver
from tests.support.tally import judge, load_facts
from worker.client import IntakeClient, limits_from
from worker.contract import QUEUES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOAD_MESSAGES = int(os.environ.get("OUTBOX_LOAD_MESSAGES", "10000"))
WORKERS = int(os.environ.get("OUTBOX_LOAD_WORKERS", "1"))
CONCURRENCY = int(os.environ.get("OUTBOX_LOAD_CONCURRENCY", "2"))
ACCOUNTS = 50
#: (behaviour, number of accounts): 50 in all.
MIX = (("healthy", 34), ("greylist", 8), ("bad_password", 3), ("unreachable", 2), ("unknown", 3))
BACKUP_BOUND = ("bad_password", "unreachable")
CAP = 2  #: each account's max_connections
INTAKE_THREADS = 4

#: The compressed window of the accounts whose SMTP never works (bad password,
#: unreachable): their mail reaches the backup 45 s after intake.
WINDOW_S = 45.0
#: The window of every other account's mail. The deadline is stamped on each message at
#: intake; on this 2-core machine the backlog takes minutes to drain, and mail still
#: queued at its deadline rightly goes to the backup: not what this test is about.
LONG_WINDOW_S = 1800.0
BASE_S = 0.5
SETTINGS = {
    "OUTBOX_RETRY_WINDOW": f"{WINDOW_S:g}",
    "OUTBOX_RETRY_BASE": f"{BASE_S:g}",
    "OUTBOX_RETRY_MAX": "2",
    "OUTBOX_SWEEP_INTERVAL": "1",
    # The production default: a wake-up still queued after it is published again.
    "OUTBOX_WAKE_GRACE": "300",
    "OUTBOX_SMTP_TIMEOUT": "2",
    "OUTBOX_LEASE": "12",
    "OUTBOX_DEFAULT_MAX_CONNECTIONS": str(CAP),
    "OUTBOX_BACKUP_TIMEOUT": "5",
    "OUTBOX_BACKUP_RETRY_WINDOW": "120",
}
#: The worker group's memory may not grow by more than this with the backlog.
RSS_GROWTH_LIMIT_MB = 150

GREYLISTED = "451 4.7.1 Greylisted, please try again later"
UNKNOWN_USER = "550 5.1.1 <{}>: Recipient address rejected: User unknown"


@dataclass
class Plan:
    name: str
    behaviour: str
    port: int
    server: ScriptedSMTPServer | None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _accounts(db, box) -> Iterator[list[Plan]]:
    """50 accounts, one scripted server each (none for the unreachable ones)."""
    plans: list[Plan] = []
    with contextlib.ExitStack() as stack:
        index = 0
        for behaviour, count in MIX:
            for _ in range(count):
                name = f"a{index:02d}-{behaviour.replace('_', '-')}"
                login = {}
                server = None
                port = _closed_port()
                if behaviour != "unreachable":
                    auth = {name: "right"} if behaviour == "bad_password" else None
                    server = stack.enter_context(ScriptedSMTPServer(tls="none", auth=auth))
                    port = server.port
                    if behaviour == "unknown":
                        server.script.default_rcpt = UNKNOWN_USER.format("user")
                if behaviour == "bad_password":
                    login = {"smtp_username": name, "password": "wrong"}
                make_account(
                    db, box, name, port=port, tls_mode="none", max_connections=CAP, **login
                )
                plans.append(Plan(name, behaviour, port, server))
                index += 1
        assert len(plans) == ACCOUNTS
        yield plans


class Monitor:
    """Once a second: the workers' summed RSS, the broker's queue depth, progress."""

    def __init__(self, pgids: list[int], broker: str, db) -> None:
        self.rss = RssSampler(pgids)
        self.redis = redis.Redis.from_url(broker)
        self.db = db
        self.queue_peak = 0
        self.progress: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)
        self.started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.rss.sample()
            with contextlib.suppress(redis.RedisError):
                depth = sum(self.redis.llen(q) for q in QUEUES)
                self.queue_peak = max(self.queue_peak, depth)
            with contextlib.suppress(Exception):
                self.progress.append((time.monotonic() - self.started, count_by_status(self.db)))

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _client(env, db, *, window_s: float) -> IntakeClient:
    s = env.settings()
    return IntakeClient(db, limits=limits_from(s), window_s=window_s, wakeups=env.wakeups(db))


def _recipient(plan: Plan, i: int) -> str:
    return f"{plan.behaviour.replace('_', '-')}{i}@example.com"


def _task_results(env) -> Counter[str]:
    """How many drains ran, and what each backup task returned, from the worker logs."""
    results: Counter[str] = Counter()
    for path in env.tmp.glob("load-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if "succeeded in" not in line:
                continue
            if "outbox.drain[" in line:
                results["drain runs"] += 1
            elif "deliver_via_backup[" in line:
                results["backup " + line.rsplit(":", 1)[-1].strip().strip("'")] += 1
    return results


@pytest.mark.timeout(900)
def test_load_mixed_behaviour_across_50_accounts(env, db, box, start_worker, reliability):
    env.values.update(SETTINGS)
    with (
        ProviderStub("sendgrid") as stub,
        _accounts(db, box) as plans,
        SignedReceiver(EVENTS_SECRET) as hooks,
    ):
        env.values.update(
            {
                **webhook_settings(hooks.url),
                "OUTBOX_BACKUP_PROVIDER": "sendgrid",
                "OUTBOX_BACKUP_API_KEY": stub.api_key,
                "OUTBOX_BACKUP_API_URL": stub.base_url,
                "OUTBOX_BACKUP_FROM": "Outbox Relay <relay@outbox.example.com>",
            }
        )
        workers = [
            start_worker(concurrency=CONCURRENCY, beat=(n == 0), name=f"load-{n}")
            for n in range(WORKERS)
        ]
        # The idle baseline: the workers up and connected, nothing to do.
        baseline = RssSampler([w.pid for w in workers])
        for _ in range(3):
            baseline.sample()
            time.sleep(1.0)
        baseline_kb = max(kb for _, kb in baseline.samples)

        monitor = Monitor([w.pid for w in workers], env.values["OUTBOX_BROKER_URL"], db).start()
        clients = {False: env.client(db), True: _client(env, db, window_s=LONG_WINDOW_S)}
        for i in range(LOAD_MESSAGES):  # greylist each such recipient once, up front
            plan = plans[i % ACCOUNTS]
            if plan.behaviour == "greylist":
                assert plan.server is not None
                plan.server.script.rcpt[_recipient(plan, i)] = [GREYLISTED]
        behaviour_of: dict[int, str] = {}
        started = time.monotonic()

        def enqueue(i: int) -> None:
            plan = plans[i % ACCOUNTS]
            to = _recipient(plan, i)
            client = clients[plan.behaviour not in BACKUP_BOUND]
            mid = client.enqueue(account=plan.name, to=[to], subject=f"Load {i}", text="x").id
            behaviour_of[mid] = plan.behaviour

        # Intake from several threads, like several producer services; round-robin over
        # the accounts so their mail is interleaved in the queue.
        with ThreadPoolExecutor(max_workers=INTAKE_THREADS) as pool:
            list(pool.map(enqueue, range(LOAD_MESSAGES), chunksize=50))
        enqueued_s = time.monotonic() - started
        try:
            wait_until_finished(db, expected=LOAD_MESSAGES, timeout=600, interval=1.0)
        finally:
            monitor.stop()
        duration_s = time.monotonic() - started
        # The last drains' events are posted right after them; beat's run is the backstop.
        events = tally_webhook(db, hooks, timeout=180)
        events_s = time.monotonic() - started
        servers = [p.server for p in plans if p.server is not None]
        verdict = judge(db, servers=servers, stubs=[stub])
        facts = load_facts(db)
        caps = {p.name: p.server.max_concurrent_connections for p in plans if p.server}
        backup_requests = len(stub.requests)

    # -- figures ------------------------------------------------------------------------
    states: Counter[tuple[str, str, str | None]] = Counter(
        (behaviour_of[f.id], f.status, f.sent_via) for f in facts.values()
    )
    histogram: dict[str, Counter[int]] = {}
    for f in facts.values():
        histogram.setdefault(behaviour_of[f.id], Counter())[len(f.attempts)] += 1
    peak_kb = monitor.rss.peak_kb
    growth_mb = (peak_kb - baseline_kb) / 1024
    results = _task_results(env)
    rate = LOAD_MESSAGES / duration_s
    figures = {
        "messages": LOAD_MESSAGES,
        "workers": f"{WORKERS} x c{CONCURRENCY}",
        "duration_s": round(duration_s, 1),
        "enqueue_s": round(enqueued_s, 1),
        "messages_per_s": round(rate, 1),
        "states": {f"{b}/{s}/{v or '-'}": n for (b, s, v), n in sorted(states.items())},
        # Attempts of all channels per message (a backup-bound one: its SMTP tries + 1).
        "attempts_histogram": {b: dict(sorted(h.items())) for b, h in sorted(histogram.items())},
        "most_smtp_attempts_backup_bound": max(
            (f.smtp_attempts() for f in facts.values() if behaviour_of[f.id] in BACKUP_BOUND),
            default=0,
        ),
        "rss_baseline_mb": round(baseline_kb / 1024, 1),
        "rss_peak_mb": round(peak_kb / 1024, 1),
        "rss_growth_mb": round(growth_mb, 1),
        "queue_peak": monitor.queue_peak,
        "max_connections_seen": max(caps.values()),
        "backup_requests": backup_requests,
        "task_results": dict(results),
        "events_written": events.written,
        "events_received": events.received,
        "events_lost": len(events.lost),
        "event_duplicates": events.duplicates,
        "events_all_in_s": round(events_s, 1),
    }
    print("\nprogress (s, statuses):")
    for at, counts in monitor.progress[::5]:
        print(f"  {at:6.1f} {counts}")
    print("\nload figures:")
    for key, value in figures.items():
        print(f"  {key}: {value}")
    reliability.record(
        f"Load: {LOAD_MESSAGES:,} messages, 50 accounts, mixed behaviour",
        messages=LOAD_MESSAGES,
        faults="greylisting, bad passwords, unreachable servers, unknown users",
        lost=len(verdict.lost),
        duplicates=verdict.duplicates,
        refusals=verdict.statuses.get("failed", 0),
        **{k: v for k, v in figures.items() if k != "messages"},
    )

    # -- every message in the state its script demands ------------------------------------
    per_behaviour = {b: n * (LOAD_MESSAGES // ACCOUNTS) for b, n in MIX}
    for i in range(LOAD_MESSAGES % ACCOUNTS):
        per_behaviour[plans[i].behaviour] += 1
    expected = {
        "healthy": ("sent", "smtp"),
        "greylist": ("sent", "smtp"),
        "bad_password": ("sent", "backup"),
        "unreachable": ("sent", "backup"),
        "unknown": ("failed", None),
    }
    assert dict(states) == {(b, *expected[b]): per_behaviour[b] for b in per_behaviour}
    assert not verdict.lost and not verdict.strangers and not verdict.delivered_but_not_sent
    assert verdict.duplicates == 0, verdict.duplicated

    # -- attempts follow the schedule -------------------------------------------------------
    most_smtp = int(WINDOW_S / BASE_S)
    for f in facts.values():
        shape = [(a[0], a[1]) for a in f.attempts]
        behaviour = behaviour_of[f.id]
        if behaviour == "healthy":
            assert shape == [("smtp", "sent")], (f.id, f.attempts)
        elif behaviour == "greylist":
            assert shape == [("smtp", "deferred"), ("smtp", "sent")], (f.id, f.attempts)
            assert f.attempts[0][2] == 451
        elif behaviour == "unknown":
            assert shape == [("smtp", "failed")], (f.id, f.attempts)
        else:
            assert f.smtp_attempts() <= most_smtp, (f.id, f.smtp_attempts())
            assert shape[-1] == ("backup", "sent") and f.backup_attempts() == 1, f.attempts
            assert all(s == ("smtp", "deferred") for s in shape[:-1]), f.attempts

    # -- every change is an event, in order, none missing ------------------------------------
    with db.session() as session:
        rows = session.execute(
            text("SELECT message_id, seq, type FROM events ORDER BY message_id, seq")
        ).all()
    events_of: dict[int, list[tuple[int, str]]] = {}
    for mid, seq, type_ in rows:
        events_of.setdefault(mid, []).append((seq, type_))
    assert set(events_of) == set(facts), "messages without events"
    for mid, evs in events_of.items():
        f = facts[mid]
        assert [seq for seq, _ in evs] == list(range(1, len(evs) + 1)), (mid, evs)
        types = [t for _, t in evs]
        assert types[0] == "accepted", (mid, types)
        assert types[-1] == ("sent" if f.status == "sent" else "failed"), (mid, types)
        deferrals = sum(1 for a in f.attempts if a[1] == "deferred")
        assert types.count("deferred") == deferrals, (mid, types, f.attempts)
    print(f"  events: {len(rows):,} for {len(events_of):,} messages, in order, none missing")

    # -- and the webhook got every one of them: none lost, a duplicate only as itself ----------
    print(f"  webhook: {events.summary()}, all in {events_s:.1f} s")
    assert events.ok, events.summary()

    # -- connection caps and memory -----------------------------------------------------------
    over = {name: n for name, n in caps.items() if n > CAP}
    assert not over, f"accounts whose server saw more than {CAP} connections: {over}"
    assert growth_mb < RSS_GROWTH_LIMIT_MB, f"worker RSS grew {growth_mb:.0f} MB"
