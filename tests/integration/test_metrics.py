"""Issue 13: the Prometheus exporter, `outbox metrics`, as a real process scraped over HTTP.

Real PostgreSQL with accounts and messages in known states; the scrape is parsed with
prometheus_client's own parser and every value is checked exactly (ages to the second).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from standins.accounts import make_account
from standins.services import OutboxProcess
from tests.support.outbox import cli, wait_for_status
from worker.clock import utcnow
from worker.metrics import SERVED
from worker.replies import Reply, classify
from worker.store.actions import cancel_messages
from worker.store.db import Database
from worker.store.incidents import note_account_failure
from worker.store.models import Attempt, Message
from worker.store.slots import acquire_slot
from worker.sweeper import SweepConfig, Sweeper

pytestmark = pytest.mark.integration


class Scrape:
    """One answer of /metrics, parsed: sample name + labels -> value."""

    def __init__(self, body: str) -> None:
        self.samples: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                by_labels = self.samples.setdefault(sample.name, {})
                by_labels[frozenset(sample.labels.items())] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples[name][frozenset(labels.items())]

    def by(self, name: str, label: str) -> dict[str, float]:
        """One label's value -> sample value, for a family with that one label."""
        return {dict(key)[label]: value for key, value in self.samples.get(name, {}).items()}

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(key)): v for key, v in self.samples.get(name, {}).items()}


class Exporter:
    def __init__(self, process: OutboxProcess) -> None:
        self.process = process
        found = re.search(r"Outbox metrics on (http://\S+)", process.log())
        assert found, process.log()
        self.url = found.group(1)

    def scrape(self) -> Scrape:
        response = httpx.get(self.url, timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return Scrape(response.text)


@pytest.fixture
def exporter(env) -> Iterator:
    started: list[OutboxProcess] = []

    def start(**extra: str) -> Exporter:
        process = OutboxProcess(
            [sys.executable, "-m", "worker.cli", "metrics", "--port", "0"],
            {**env.values, **extra},
            env.tmp / f"metrics-{len(started)}.log",
            ready_marker="Outbox metrics on ",
        )
        started.append(process)
        process.start()
        return Exporter(process)

    yield start
    for process in started:
        process.stop()


# -- arranging known states ---------------------------------------------------------------


def enqueue(env, db: Database, account: str, n: int, **fields) -> list[int]:
    client = env.client(db)
    return [
        client.enqueue(
            account=account, to=[f"r{i}@example.com"], subject="s", text="t", **fields
        ).id
        for i in range(n)
    ]


def arrange(db: Database, ids: list[int], **values) -> None:
    """Put messages in a state the test needs (an earlier arrival, a verdict...)."""
    with db.session() as session:
        session.execute(update(Message).where(Message.id.in_(ids)).values(**values))


def finish(
    db: Database,
    message_id: int,
    *,
    status: str,
    via: str | None,
    at: datetime,
    attempts: list[tuple[str, str, str | None]],
) -> None:
    """A message that ended `status` at `at` after these (channel, outcome, verdict)
    attempts, as the delivery engine records them."""
    with db.session() as session:
        session.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(status=status, sent_via=via, finished_at=at, attempt_count=len(attempts))
        )
        for number, (channel, outcome, verdict) in enumerate(attempts, start=1):
            session.add(
                Attempt(
                    message_id=message_id,
                    number=number,
                    channel=channel,
                    started_at=at - timedelta(seconds=1),
                    finished_at=at,
                    outcome=outcome,
                    verdict=verdict,
                )
            )


def open_incident(db: Database, account_id: int, message_id: int, *, opened_at: datetime) -> None:
    explanation = classify(Reply(code=535, enhanced="5.7.8", text="Authentication failed"))
    with db.session() as session:
        note_account_failure(
            session,
            account_id,
            explanation,
            now=opened_at,
            message_id=message_id,
            next_probe_at=opened_at + timedelta(minutes=5),
        )


# -- tests -----------------------------------------------------------------------------------


def test_a_scrape_reports_every_state_exactly(env, db, box, exporter):
    now = utcnow()
    ids = {}
    for name in ("acme", "beta", "gamma", "delta"):
        ids[name] = make_account(db, box, name, port=2525, tls_mode="none")
    # A real sweep first, so the sweeper's last run is on record (and it leaves the mail
    # arranged below alone).
    before_sweep = utcnow()
    list(Sweeper(db, SweepConfig(wake_grace_s=60)).run())
    after_sweep = utcnow()

    acme = enqueue(env, db, "acme", 3)  # fresh, never tried
    arrange(db, acme[:1], due_at=now - timedelta(minutes=10))  # the sweeper missed it
    beta = enqueue(env, db, "beta", 2)
    arrange(db, beta[:1], last_verdict="retry", created_at=now - timedelta(hours=1))
    arrange(db, beta[1:], last_verdict="account", created_at=now - timedelta(minutes=30))
    open_incident(db, ids["beta"], beta[1], opened_at=now - timedelta(hours=2))
    gamma = enqueue(env, db, "gamma", 4)
    for mid, status, via, tries in (
        (gamma[0], "sent", "smtp", [("smtp", "sent", "ok")]),
        (gamma[1], "sent", "smtp", [("smtp", "deferred", "retry"), ("smtp", "sent", "ok")]),
        (gamma[2], "sent", "backup", [("smtp", "deferred", "account"), ("backup", "sent", None)]),
        (gamma[3], "failed", None, [("smtp", "failed", "recipient")]),
    ):
        finish(db, mid, status=status, via=via, at=now - timedelta(minutes=5), attempts=tries)
    delta = enqueue(env, db, "delta", 1)
    with db.session() as session:
        assert cancel_messages(session, delta, now=utcnow()).done == delta
    enqueue(env, db, "delta", 1, send_at=(now + timedelta(days=1)).isoformat())
    with db.session() as session:
        assert acquire_slot(session, ids["acme"], holder="w1", now=utcnow(), hold_s=60) == 0
        # A dead worker's slot: expired, not in use.
        acquire_slot(session, ids["beta"], holder="w2", now=now - timedelta(minutes=5), hold_s=1)

    scraped = exporter().scrape()
    assert set(scraped.samples) == SERVED  # what deploy/ may name

    assert scraped.value("outbox_up") == 1
    assert 0 < scraped.value("outbox_scrape_duration_seconds") < 5
    assert scraped.value("outbox_accounts") == 4
    assert scraped.by("outbox_messages_pending", "account") == {"acme": 3, "beta": 2, "delta": 1}
    assert scraped.by("outbox_messages_pending_by_verdict", "verdict") == {
        "none": 4,
        "retry": 1,
        "account": 1,
        "recipient": 0,
        "message": 0,
    }
    oldest = scraped.by("outbox_oldest_pending_seconds", "account")
    assert set(oldest) == {"acme", "beta", "delta"}
    taken = utcnow()
    assert 0 <= oldest["acme"] <= (taken - now).total_seconds() + 1
    assert 3600 <= oldest["beta"] <= 3600 + (taken - now).total_seconds() + 1
    assert oldest["delta"] == 0  # scheduled for tomorrow: not late
    assert scraped.series("outbox_messages_finished_total") == {
        (("channel", "smtp"), ("status", "sent")): 2,
        (("channel", "backup"), ("status", "sent")): 1,
        (("channel", "none"), ("status", "failed")): 1,
        (("channel", "none"), ("status", "cancelled")): 1,
    }
    assert scraped.series("outbox_attempts_total") == {
        (("channel", "smtp"), ("outcome", "sent"), ("verdict", "ok")): 2,
        (("channel", "smtp"), ("outcome", "deferred"), ("verdict", "retry")): 1,
        (("channel", "smtp"), ("outcome", "deferred"), ("verdict", "account")): 1,
        (("channel", "backup"), ("outcome", "sent"), ("verdict", "none")): 1,
        (("channel", "smtp"), ("outcome", "failed"), ("verdict", "recipient")): 1,
    }
    assert scraped.by("outbox_incidents_open", "account") == {"beta": 1}
    incident_age = scraped.value("outbox_incident_open_seconds", account="beta")
    assert 7200 <= incident_age <= 7200 + (taken - now).total_seconds() + 1
    assert scraped.by("outbox_smtp_slots_in_use", "account") == {"acme": 1}
    # Intake queued a drain of each account it took mail for; no worker took them.
    assert scraped.value("outbox_drains_waiting") == 4
    assert scraped.value("outbox_messages_past_grace") == 1
    last = scraped.value("outbox_sweeper_last_run_timestamp_seconds")
    assert before_sweep.timestamp() <= last <= after_sweep.timestamp()
    assert 0 <= scraped.value("outbox_sweeper_last_run_duration_seconds") < 5


def test_at_most_n_accounts_per_metric_and_the_rest_summed_up(env, db, box, exporter):
    now = utcnow()
    for index, name in enumerate(("a1", "a2", "a3", "a4")):
        account_id = make_account(db, box, name, port=2525, tls_mode="none")
        mine = enqueue(env, db, name, 4 - index)  # a1: 4 pending ... a4: 1
        # a4's mail is the oldest, then a3's...: the oldest are not the biggest queues.
        arrange(db, mine, created_at=now - timedelta(hours=index + 1))
        open_incident(db, account_id, mine[0], opened_at=now - timedelta(hours=index + 1))

    scraped = exporter(OUTBOX_METRICS_MAX_ACCOUNTS="2").scrape()

    assert scraped.by("outbox_messages_pending", "account") == {"a1": 4, "a2": 3, "_other": 3}
    oldest = scraped.by("outbox_oldest_pending_seconds", "account")
    assert set(oldest) == {"a4", "a3", "_other"}
    assert 4 * 3600 <= oldest["a4"] < 4 * 3600 + 60
    assert 3 * 3600 <= oldest["a3"] < 3 * 3600 + 60
    assert 2 * 3600 <= oldest["_other"] < 2 * 3600 + 60  # the older of a2 and a1
    assert scraped.by("outbox_incidents_open", "account") == {"a4": 1, "a3": 1, "_other": 2}
    ages = scraped.by("outbox_incident_open_seconds", "account")
    assert set(ages) == {"a4", "a3", "_other"}
    assert 2 * 3600 <= ages["_other"] < 2 * 3600 + 60


def test_counters_never_go_down_through_purge_and_retry(env, db, box, exporter):
    now = utcnow()
    make_account(db, box, "acme", port=2525, tls_mode="none")
    old, recent, failed = enqueue(env, db, "acme", 3)
    # One finished long ago (a fold moves it into the tally), two a moment ago (still
    # counted from the table itself).
    finish(
        db,
        old,
        status="sent",
        via="smtp",
        at=now - timedelta(days=2),
        attempts=[
            ("smtp", "sent", "ok"),
        ],
    )
    finish(
        db,
        recent,
        status="sent",
        via="smtp",
        at=now - timedelta(seconds=10),
        attempts=[
            ("smtp", "sent", "ok"),
        ],
    )
    finish(
        db,
        failed,
        status="failed",
        via=None,
        at=now - timedelta(seconds=10),
        attempts=[
            ("smtp", "failed", "recipient"),
        ],
    )
    metrics = exporter()
    first = metrics.scrape()
    sent = {"status": "sent", "channel": "smtp"}
    failure = {"status": "failed", "channel": "none"}
    assert first.value("outbox_messages_finished_total", **sent) == 2
    assert first.value("outbox_messages_finished_total", **failure) == 1

    retried = cli(env, "retry", str(failed))
    assert retried.returncode == 0, retried.stderr
    assert wait_for_status(db, failed, "pending") == "pending"
    second = metrics.scrape()
    assert second.value("outbox_messages_finished_total", **failure) == 1  # it did fail
    assert second.by("outbox_messages_pending", "account") == {"acme": 1}

    purged = cli(env, "purge", "--older-than", "1s", "--yes")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 1
        assert session.scalar(select(func.count()).select_from(Attempt)) == 1
    third = metrics.scrape()
    assert third.value("outbox_messages_finished_total", **sent) == 2
    assert third.value("outbox_messages_finished_total", **failure) == 1
    assert third.value("outbox_attempts_total", channel="smtp", outcome="sent", verdict="ok") == 2
    assert (
        third.value("outbox_attempts_total", channel="smtp", outcome="failed", verdict="recipient")
        == 1
    )
    # A restarted exporter reads the same: the counts live in the database.
    metrics.process.stop()
    assert exporter().scrape().series("outbox_messages_finished_total") == third.series(
        "outbox_messages_finished_total"
    )


def test_what_a_real_worker_delivers_shows_up(
    env, db, box, plain_smtp_server, start_worker, exporter
):
    plain_smtp_server.script.rcpt["ghost@example.com"] = ["550 5.1.1 no such user"]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    client = env.client(db)
    ids = [
        client.enqueue(account="acme", to=[to], subject="Hi", text="Hello").id
        for to in ("bob@example.com", "carol@example.com", "ghost@example.com")
    ]
    for mid, wanted in zip(ids, ("sent", "sent", "failed"), strict=True):
        assert wait_for_status(db, mid, wanted) == wanted

    scraped = exporter().scrape()
    assert scraped.series("outbox_messages_finished_total") == {
        (("channel", "smtp"), ("status", "sent")): 2,
        (("channel", "backup"), ("status", "sent")): 0,
        (("channel", "none"), ("status", "failed")): 1,
        (("channel", "none"), ("status", "cancelled")): 0,
    }
    assert scraped.series("outbox_attempts_total") == {
        (("channel", "smtp"), ("outcome", "sent"), ("verdict", "ok")): 2,
        (("channel", "smtp"), ("outcome", "failed"), ("verdict", "recipient")): 1,
    }
    assert scraped.by("outbox_messages_pending", "account") == {}
    assert scraped.value("outbox_messages_past_grace") == 0


def test_an_unreachable_database_is_outbox_up_0_not_an_error(env, exporter):
    missing = env.values["OUTBOX_DATABASE_URL"].rsplit("/", 1)[0] + "/outbox_no_such_database"
    metrics = exporter(OUTBOX_DATABASE_URL=missing)
    for _ in range(2):  # and it goes on answering
        scraped = metrics.scrape()
        assert scraped.value("outbox_up") == 0
        assert set(scraped.samples) == {"outbox_up", "outbox_scrape_duration_seconds"}
    assert "scrape failed: could not read the database" in metrics.process.log()
