"""Upgrading in place: a database written by an earlier release (migration 0001: one
wake-up per message) holds pending, parked and leased mail while the broker still holds
that release's `outbox.send(message_id)` wake-ups; `outbox db upgrade` and the drains
deliver all of it, each mail once."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

import pytest
from celery import Celery
from sqlalchemy import text

from standins.services import create_pg_database
from standins.smtp import ScriptedSMTPServer
from tests.support.bulk import count_by_status, wait_until_finished
from tests.support.outbox import cli
from worker.clock import utcnow
from worker.store import migrate
from worker.store.db import Database

ACCOUNT = """
INSERT INTO accounts (name, smtp_host, smtp_port, tls_mode, allow_plaintext, max_connections,
    backup_verified, settings_version, throttle_level, created_at, updated_at)
VALUES ('acme', '127.0.0.1', :port, 'none', true, 2, false, 1, 0, :now, :now)
RETURNING id
"""
MESSAGE = """
INSERT INTO messages (account_id, message_id_header, from_addr, to_addrs, cc_addrs, bcc_addrs,
    subject, text_body, headers, attachment_count, size_bytes, status, created_at, updated_at,
    deadline, next_attempt_at, due_at, lease_until, lease_token, attempt_count, delivered_to,
    last_verdict)
VALUES (:account_id, :mid_header, 'shop@acme.example', :to, '[]', '[]', 'Old release', 'hi',
    '[]', 0, 100, 'pending', :created, :created, :deadline, :next_at, :due_at, :lease_until,
    :lease_token, :attempts, '{}', :verdict)
RETURNING id
"""
ATTEMPT = """
INSERT INTO attempts (message_id, number, channel, started_at, finished_at, outcome, verdict,
    reply_code, enhanced_code, server_text)
VALUES (:message_id, 1, 'smtp', :at, :at, 'deferred', 'temporary', 451, '4.7.1', 'Greylisted')
"""


@pytest.fixture(
    params=["0001", "0003", "0005"],
    ids=["from-0001-per-message", "from-0003-drains", "from-0005-webhooks"],
)
def old_database(request):
    """A database at an earlier migration head: 0001 (one wake-up per message), 0003
    (the drains and metrics, before status events), 0005 (the previous release: status
    events and signed webhooks, before incident notices had rows)."""
    url, drop = create_pg_database()
    migrate.upgrade(url, request.param)
    yield url
    drop()


def _fill(db: Database, port: int) -> dict[str, list[int]]:
    """What the previous release leaves behind, written with its own schema."""
    now = utcnow()
    ids: dict[str, list[int]] = {"pending": [], "parked": [], "leased": []}
    with db.engine.begin() as conn:
        account_id = conn.execute(text(ACCOUNT), {"port": port, "now": now}).scalar_one()
        for slot in range(2):  # the old release made max_connections slot rows per account
            conn.execute(
                text("INSERT INTO smtp_slots (account_id, slot) VALUES (:a, :s)"),
                {"a": account_id, "s": slot},
            )
        for kind in ids:
            for i in range(10):
                created = now - timedelta(minutes=5)
                values = {
                    "account_id": account_id,
                    "mid_header": f"<{kind}.{i}@acme.example>",
                    "to": json.dumps([f"{kind}{i}@example.com"]),
                    "created": created,
                    "deadline": created + timedelta(hours=24),
                    "next_at": now,
                    "due_at": now + timedelta(seconds=60),  # the old release's wake-up grace
                    "lease_until": None,
                    "lease_token": None,
                    "attempts": 0,
                    "verdict": None,
                }
                if kind == "parked":  # a greylisted try, its retry parked in the database
                    values |= {
                        "next_at": now + timedelta(seconds=2),
                        "due_at": now + timedelta(seconds=2),
                        "attempts": 1,
                        "verdict": "temporary",
                    }
                elif kind == "leased":  # claimed by an old worker that is gone now
                    values |= {
                        "lease_until": now + timedelta(seconds=2),
                        "lease_token": f"old-worker:{i}",
                        "due_at": now + timedelta(seconds=2),
                    }
                mid = conn.execute(text(MESSAGE), values).scalar_one()
                ids[kind].append(mid)
                if kind == "parked":
                    conn.execute(text(ATTEMPT), {"message_id": mid, "at": created})
    return ids


def test_mail_of_the_previous_release_is_delivered_once_after_the_upgrade(
    env, box, old_database, start_worker
):
    env.values.update(
        {
            "OUTBOX_DATABASE_URL": old_database,
            "OUTBOX_SWEEP_INTERVAL": "1",
            "OUTBOX_WAKE_GRACE": "2",
        }
    )
    old = Database(old_database)
    with ScriptedSMTPServer(tls="none") as server:
        ids = _fill(old, server.port)
        # The old release's wake-ups, still on the broker: one per pending message.
        producer = Celery(broker=env.values["OUTBOX_BROKER_URL"], set_as_current=False)
        for mid in ids["pending"]:
            producer.send_task("outbox.send", args=(mid,), queue="outbox.send")
        for mid in ids["parked"]:
            producer.send_task("outbox.send", args=(mid,), queue="outbox.retry", countdown=2)

        upgraded = cli(env, "db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        assert migrate.current(old_database) == migrate.head()

        start_worker(concurrency=2, beat=True)
        wait_until_finished(old, expected=30, timeout=60)
        received = Counter(m.message_id for m in server.messages)

    assert count_by_status(old) == {"sent": 30}
    with old.engine.connect() as conn:
        # Mail of the previous release is told about from the upgrade on: its sends.
        sent_events = conn.execute(
            text("SELECT count(*) FROM events WHERE type = 'sent'")
        ).scalar_one()
    assert sent_events == 30
    assert len(received) == 30 and set(received.values()) == {1}, received
    with old.engine.connect() as conn:
        attempts = dict(
            conn.execute(
                text("SELECT message_id, count(*) FROM attempts GROUP BY message_id")
            ).all()
        )
    for mid in ids["parked"]:
        assert attempts[mid] == 2  # the old greylisted try, then the one that went out
    old.dispose()
