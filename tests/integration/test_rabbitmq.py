"""RabbitMQ as the broker: the same delivery, retries, sweeper and operator tasks as on
Redis, through a vhost of the test session's own (tests.support.rabbit)."""

from __future__ import annotations

from celery import Celery

from standins.accounts import make_account
from tests.support.bulk import count_by_status, enqueue_many, wait_until_finished
from tests.support.outbox import attempts, cli, message, wait_for_status
from tests.support.rabbit import queue_depths

GREYLISTED = "451 4.7.1 Greylisted, try again later"


def _caller(env) -> Celery:
    """A service with none of Outbox's code, on the same RabbitMQ vhost."""
    app = Celery(
        broker=env.values["OUTBOX_BROKER_URL"],
        backend=env.values["OUTBOX_RESULT_BACKEND"],
        set_as_current=False,
    )
    app.conf.broker_transport_options = {"confirm_publish": True}
    return app


def test_mail_by_task_name_and_by_the_python_door_is_delivered_once(
    rabbit_env, db, box, plain_smtp_server, start_worker
):
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    by_name = (
        _caller(rabbit_env)
        .send_task(
            "outbox.enqueue",
            kwargs={"account": "acme", "to": ["bob@example.com"], "subject": "Hi", "text": "x"},
        )
        .get(timeout=30)
    )
    many = (
        _caller(rabbit_env)
        .send_task(
            "outbox.enqueue_many",
            kwargs={
                "requests": [
                    {"account": "acme", "to": [f"u{i}@example.com"], "subject": "Hi", "text": "x"}
                    for i in range(20)
                ]
            },
        )
        .get(timeout=30)
    )
    by_python = rabbit_env.client(db).enqueue(
        account="acme", to=["carol@example.com"], subject="Hi", text="x"
    )
    wait_until_finished(db, expected=22, timeout=30)
    assert count_by_status(db) == {"sent": 22}
    assert len(plain_smtp_server.messages) == 22
    assert message(db, by_name["id"]).status == "sent"
    assert message(db, by_python.id).status == "sent"
    assert all("id" in r for r in many["results"])


def test_a_greylisted_mail_is_retried_on_a_countdown_and_sent(
    rabbit_env, db, box, plain_smtp_server, start_worker
):
    rabbit_env.values.update({"OUTBOX_RETRY_BASE": "1", "OUTBOX_RETRY_MAX": "2"})
    plain_smtp_server.script.rcpt["grey@example.com"] = [GREYLISTED]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    mid = (
        rabbit_env.client(db)
        .enqueue(account="acme", to=["grey@example.com"], subject="Hi", text="x")
        .id
    )
    wait_for_status(db, mid, "sent", timeout=30)
    assert [a.outcome for a in attempts(db, mid)] == ["deferred", "sent"]
    assert attempts(db, mid)[0].reply_code == 451


def test_the_sweeper_delivers_mail_whose_wake_up_never_reached_rabbitmq(
    rabbit_env, db, box, plain_smtp_server, start_worker
):
    rabbit_env.values.update({"OUTBOX_SWEEP_INTERVAL": "1", "OUTBOX_WAKE_GRACE": "1"})
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    client = rabbit_env.client(db)
    client.wakeups = None  # stored, never published: a lost wake-up
    ids = enqueue_many(client, "acme", 30)
    assert sum(queue_depths(rabbit_env.values["OUTBOX_BROKER_URL"]).values()) == 0
    start_worker(beat=True)
    wait_until_finished(db, expected=len(ids), timeout=40)
    assert count_by_status(db) == {"sent": 30}
    assert len(plain_smtp_server.messages) == 30


def test_operator_retry_and_cancel_run_through_rabbitmq(
    rabbit_env, db, box, plain_smtp_server, start_worker
):
    plain_smtp_server.script.rcpt["gone@example.com"] = ["550 5.1.1 No such user"]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    client = rabbit_env.client(db)
    failed = client.enqueue(account="acme", to=["gone@example.com"], subject="x", text="y").id
    wait_for_status(db, failed, "failed", timeout=20)
    # The mailbox exists now: the operator retries it, by task name and by the CLI.
    plain_smtp_server.script.rcpt.pop("gone@example.com")
    done = _caller(rabbit_env).send_task("outbox.retry", args=([failed],)).get(timeout=30)
    assert done["done"] == [failed], done
    wait_for_status(db, failed, "sent", timeout=20)

    client.wakeups = None  # waits for the cancel, never woken
    waiting = client.enqueue(account="acme", to=["later@example.com"], subject="x", text="y").id
    cancelled = _caller(rabbit_env).send_task("outbox.cancel", args=([waiting],)).get(timeout=30)
    assert cancelled["done"] == [waiting], cancelled
    assert message(db, waiting).status == "cancelled"
    shown = cli(rabbit_env, "show", str(waiting), "--json")
    assert shown.returncode == 0 and '"cancelled"' in shown.stdout
    assert [m.rcpt_tos for m in plain_smtp_server.messages] == [("gone@example.com",)]
