"""Issue 5: operators retry, cancel, inspect and purge — from the CLI and as tasks."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from celery import Celery
from sqlalchemy import select, update

from standins.accounts import make_account
from tests.support.outbox import (
    attempts,
    cli,
    count_messages,
    message,
    wait_for_attempts,
    wait_for_status,
)
from worker.clock import utcnow
from worker.store.models import Message

pytestmark = pytest.mark.integration


def test_cancel_during_a_scheduled_retry_is_never_delivered(
    env, db, box, plain_smtp_server, start_worker
):
    env.values.update({"OUTBOX_RETRY_BASE": "900", "OUTBOX_RETRY_MAX": "3600"})
    for rcpt in ("bob@example.com", "carol@example.com"):
        plain_smtp_server.script.rcpt[rcpt] = ["451 4.7.1 Greylisted"]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    client = env.client(db)
    doomed = client.enqueue(account="acme", to=["bob@example.com"], subject="x", text="y").id
    control = client.enqueue(account="acme", to=["carol@example.com"], subject="x", text="y").id
    wait_for_attempts(db, doomed, 1)
    wait_for_attempts(db, control, 1)
    # Both have a retry scheduled on the broker in 3 s, exactly as the engine schedules
    # short waits (the real jittered wait is pinned so the test does not depend on luck).
    retry_at = utcnow() + timedelta(seconds=3)
    with db.session() as session:
        session.execute(
            update(Message)
            .where(Message.id.in_([doomed, control]))
            .values(next_attempt_at=retry_at, due_at=retry_at + timedelta(minutes=5))
        )
    producer = Celery(broker=env.values["OUTBOX_BROKER_URL"])
    for mid in (doomed, control):
        producer.send_task("outbox.send", args=(mid,), countdown=3, queue="outbox.retry")

    done = cli(env, "cancel", str(doomed), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["done"] == [doomed]

    wait_for_status(db, control, "sent", timeout=15)  # the retries have fired
    assert message(db, doomed).status == "cancelled"
    assert [list(m.rcpt_tos) for m in plain_smtp_server.messages] == [["carol@example.com"]]
    assert len(attempts(db, doomed)) == 1


def _log(env) -> str:
    return "".join(p.read_text() for p in env.tmp.glob("*.log"))


def test_retry_sends_a_parked_pending_mail_within_seconds(
    env, db, box, plain_smtp_server, start_worker
):
    env.values.update({"OUTBOX_RETRY_BASE": "900", "OUTBOX_RETRY_MAX": "3600"})
    plain_smtp_server.script.rcpt["bob@example.com"] = ["451 4.7.1 Greylisted"]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    mid = env.client(db).enqueue(account="acme", to=["bob@example.com"], subject="x", text="y").id
    wait_for_attempts(db, mid, 1)
    # Make sure the wait is a long one (full jitter may pick a short delay).
    with db.session() as session:
        session.execute(
            update(Message)
            .where(Message.id == mid)
            .values(
                next_attempt_at=utcnow() + timedelta(minutes=30),
                due_at=utcnow() + timedelta(minutes=30),
            )
        )
    done = cli(env, "retry", str(mid))
    assert done.returncode == 0, done.stderr
    wait_for_status(db, mid, "sent", timeout=10)
    assert len(plain_smtp_server.messages) == 1


def test_retry_of_sent_mail_is_refused_and_failed_mail_is_reopened(
    env, db, box, plain_smtp_server, start_worker
):
    plain_smtp_server.script.rcpt["ghost@example.com"] = ["550 5.1.1 no such user"]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    client = env.client(db)
    sent = client.enqueue(account="acme", to=["bob@example.com"], subject="x", text="y").id
    failed = client.enqueue(account="acme", to=["ghost@example.com"], subject="x", text="y").id
    wait_for_status(db, sent, "sent")
    wait_for_status(db, failed, "failed")

    refused = cli(env, "retry", str(sent), "--json")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["refused"] == {str(sent): "it was already sent"}

    old_deadline = message(db, failed).deadline
    reopened = cli(env, "retry", str(failed))  # the user now exists
    assert reopened.returncode == 0, reopened.stderr
    wait_for_status(db, failed, "sent")
    assert message(db, failed).deadline > old_deadline
    assert [a.outcome for a in attempts(db, failed)] == ["failed", "sent"]


def test_retry_and_cancel_as_tasks_by_name(env, db, box, plain_smtp_server, start_worker):
    env.values.update({"OUTBOX_RETRY_BASE": "900", "OUTBOX_RETRY_MAX": "3600"})
    plain_smtp_server.script.rcpt["bob@example.com"] = ["451 4.7.1 Greylisted"]
    plain_smtp_server.script.rcpt["carol@example.com"] = ["451 4.7.1 Greylisted"]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    client = env.client(db)
    a = client.enqueue(account="acme", to=["bob@example.com"], subject="x", text="y").id
    b = client.enqueue(account="acme", to=["carol@example.com"], subject="x", text="y").id
    wait_for_attempts(db, a, 1)
    wait_for_attempts(db, b, 1)
    app = Celery(
        broker=env.values["OUTBOX_BROKER_URL"], backend=env.values["OUTBOX_RESULT_BACKEND"]
    )
    cancelled = app.send_task("outbox.cancel", args=([b],)).get(timeout=20)
    assert cancelled["done"] == [b]
    retried = app.send_task("outbox.retry", args=([a, b],)).get(timeout=20)
    assert retried["done"] == [a] and retried["refused"] == {str(b): "it was cancelled"}
    wait_for_status(db, a, "sent", timeout=10)
    assert message(db, b).status == "cancelled"
    assert [m.rcpt_tos for m in plain_smtp_server.messages] == [("bob@example.com",)]


def test_bulk_cancel_asks_first_then_cancels_all_pending(env, db, box):
    make_account(db, box, "acme", port=2525, tls_mode="none")
    client = env.client(db)
    client.wakeups = None
    ids = [
        client.enqueue(account="acme", to=["bob@example.com"], subject="x", text="y").id
        for _ in range(3)
    ]
    asked = cli(env, "cancel", "--account", "acme")
    assert asked.returncode == 1 and "would cancel 3 message(s)" in asked.stdout
    assert all(message(db, m).status == "pending" for m in ids)
    dry = cli(env, "cancel", "--account", "acme", "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["would_cancel"] == ids
    done = cli(env, "cancel", "--account", "acme", "--yes", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["done"] == ids
    again = cli(env, "cancel", "--account", "acme", "--yes", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["done"] == []  # idempotent


def test_purge_removes_only_old_finished_mail(env, db, box):
    make_account(db, box, "acme", port=2525, tls_mode="none")
    client = env.client(db)
    client.wakeups = None
    ids = [
        client.enqueue(account="acme", to=["bob@example.com"], subject="x", text="y").id
        for _ in range(5)
    ]
    old = utcnow() - timedelta(days=40)
    recent = utcnow() - timedelta(days=2)
    layout = {
        ids[0]: ("sent", old),
        ids[1]: ("failed", old),
        ids[2]: ("cancelled", recent),
        ids[3]: ("pending", None),
        ids[4]: ("sent", recent),
    }
    with db.session() as session:
        for mid, (status, finished) in layout.items():
            session.execute(
                update(Message)
                .where(Message.id == mid)
                .values(status=status, finished_at=finished, created_at=old)
            )
    refused = cli(env, "purge", "--older-than", "30d")
    assert refused.returncode == 1 and "would delete 2" in refused.stdout
    done = cli(env, "purge", "--older-than", "30d", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"deleted": 2}
    with db.session() as session:
        left = set(session.scalars(select(Message.id)))
    assert left == {ids[2], ids[3], ids[4]}
    assert count_messages(db) == 3


def test_stats_show_counts_verdicts_and_fallback_rate(env, db, box):
    make_account(db, box, "acme", port=2525, tls_mode="none")
    client = env.client(db)
    client.wakeups = None
    ids = [
        client.enqueue(account="acme", to=["bob@example.com"], subject="x", text="y").id
        for _ in range(4)
    ]
    with db.session() as session:
        session.execute(
            update(Message).where(Message.id == ids[0]).values(status="sent", sent_via="smtp")
        )
        session.execute(
            update(Message).where(Message.id == ids[1]).values(status="sent", sent_via="backup")
        )
        session.execute(
            update(Message)
            .where(Message.id == ids[2])
            .values(status="failed", last_verdict="recipient")
        )
        session.execute(update(Message).where(Message.id == ids[3]).values(last_verdict="account"))
    out = cli(env, "stats", "--json")
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert (row["sent"], row["failed"], row["pending"], row["sent_via_backup"]) == (2, 1, 1, 1)
    assert row["fallback_rate"] == 0.5
    assert row["by_verdict"] == {"recipient": 1, "account": 1}
    assert row["oldest_pending_s"] is not None
    table = cli(env, "stats")
    assert "acme" in table.stdout and "50.0%" in table.stdout
