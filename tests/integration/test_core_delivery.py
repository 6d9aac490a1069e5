"""Issue 2: accept an email, deliver it once through the account's own server, record it.

Real PostgreSQL, real Redis as the broker, real `outbox worker` processes, and an
aiosmtpd server on loopback with STARTTLS (a CA made by the tests) and AUTH.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from celery import Celery

from standins.accounts import make_account
from standins.services import REPO, wait_until
from standins.smtp import ScriptedSMTPServer, make_self_signed
from tests.support.outbox import (
    attempts,
    count_messages,
    message,
    update_account,
    wait_for_attempts,
    wait_for_status,
)

pytestmark = pytest.mark.integration


def test_mail_is_delivered_once_over_starttls_with_auth(
    env, db, box, smtp_server, test_ca, start_worker
):
    make_account(
        db,
        box,
        "acme",
        port=smtp_server.port,
        smtp_username="acct",
        password="s3cret",
        tls_mode="starttls",
        ca_pem=test_ca.ca_pem,
    )
    start_worker()
    accepted = env.client(db).enqueue(
        account="acme",
        to=["bob@example.com"],
        cc=["Carol <carol@example.org>"],
        bcc=["audit@example.net"],
        subject="Invoice 42",
        text="Hello Bob",
        html="<p>Hello Bob</p>",
        attachments=[{"filename": "a.txt", "content_type": "text/plain", "data": b"attached"}],
    )
    assert wait_for_status(db, accepted.id, "sent") == "sent"

    row = message(db, accepted.id)
    assert row.sent_via == "smtp"
    assert smtp_server.message_ids() == [row.message_id_header]
    received = smtp_server.messages[0]
    assert received.tls is True and received.auth_user == "acct"
    assert sorted(received.rcpt_tos) == [
        "audit@example.net",
        "bob@example.com",
        "carol@example.org",
    ]
    assert "Bcc" not in received.message and received.message["Subject"] == "Invoice 42"
    parts = {p.get_content_type() for p in received.message.walk()}
    assert {"text/plain", "text/html"} <= parts
    assert any(p.get_filename() == "a.txt" for p in received.message.walk())
    [attempt] = attempts(db, accepted.id)
    assert (attempt.channel, attempt.outcome, attempt.reply_code) == ("smtp", "sent", 250)
    assert attempt.recipients["bob@example.com"]["outcome"] == "sent"


def test_self_signed_relay_is_refused_until_its_ca_is_trusted(env, db, box, start_worker, tmp_path):
    certs = make_self_signed(tmp_path / "self-signed")
    with ScriptedSMTPServer(tls="starttls", certs=certs) as server:
        make_account(db, box, "acme", port=server.port, tls_mode="starttls")
        start_worker()
        accepted = env.client(db).enqueue(
            account="acme", to=["bob@example.com"], subject="Hi", text="x"
        )
        wait_for_attempts(db, accepted.id, 1)
        [attempt] = attempts(db, accepted.id)
        assert attempt.stage == "connect" and attempt.verdict == "account"
        assert "certificate" in (attempt.server_text or "").lower()
        assert message(db, accepted.id).status == "pending"
        assert server.messages == []

        # Trusting the relay's own certificate is a settings change: pending mail goes now.
        saved = update_account(db, box, "acme", ca_pem=certs.ca_pem)
        assert saved.smtp_changed and saved.pending == 1
        env.wakeups(db).mail_due(message(db, accepted.id).account_id)
        wait_for_status(db, accepted.id, "sent")
        assert server.message_ids() == [message(db, accepted.id).message_id_header]


@pytest.mark.parametrize(
    ("task", "argument"),
    [
        ("outbox.drain", "account"),
        # As published before the drains: wake-ups still in a broker after an upgrade.
        ("outbox.send", "message"),
    ],
)
def test_the_same_wake_up_delivered_four_times_sends_once(
    env, db, box, plain_smtp_server, start_worker, task, argument
):
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    client = env.client(db)
    client.wakeups = None  # publish by hand below, before any worker runs
    accepted = client.enqueue(account="acme", to=["bob@example.com"], subject="Hi", text="x")
    producer = Celery(broker=env.values["OUTBOX_BROKER_URL"])
    arg = accepted.account_id if argument == "account" else accepted.id
    for _ in range(4):  # a Redis redelivery, a double enqueue, an operator retry...
        producer.send_task(task, args=(arg,), queue="outbox.send")
    start_worker(concurrency=2)
    wait_for_status(db, accepted.id, "sent")
    wait_until(lambda: tasks_done(env, task) >= 4, timeout=15, message="all wake-ups to run")
    assert len(plain_smtp_server.messages) == 1
    assert len(attempts(db, accepted.id)) == 1


def tasks_done(env, task: str) -> int:
    logs = "".join(p.read_text() for p in env.tmp.glob("*.log"))
    return logs.count(f"Task {task}[") // 2  # a "received" and a "succeeded" line each


def test_enqueue_by_task_name_from_a_client_with_none_of_our_code(
    env, db, box, plain_smtp_server, start_worker
):
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    script = textwrap.dedent(f"""
        import json, sys
        from celery import Celery
        app = Celery(broker={env.values["OUTBOX_BROKER_URL"]!r},
                     backend={env.values["OUTBOX_RESULT_BACKEND"]!r})
        result = app.send_task("outbox.enqueue", kwargs=dict(
            account="acme", to=["bob@example.com"], subject="By name", text="hello",
            idempotency_key="order-77"))
        first = result.get(timeout=20)
        again = app.send_task("outbox.enqueue", kwargs=dict(
            account="acme", to=["bob@example.com"], subject="By name", text="hello",
            idempotency_key="order-77")).get(timeout=20)
        bad = app.send_task("outbox.enqueue", kwargs=dict(
            account="acme", to=["not an address"], subject="x", text="y"))
        try:
            bad.get(timeout=20)
            refusal = None
        except Exception as exc:
            refusal = str(exc)
        ours = [m for m in ("worker", "config", "tasks") if m in sys.modules]
        print(json.dumps({{"first": first, "again": again, "refusal": refusal, "ours": ours}}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ours"] == []
    assert result["first"]["created"] is True
    assert result["again"] == {"id": result["first"]["id"], "created": False}
    assert "to[0]" in result["refusal"] and "not a valid email address" in result["refusal"]
    wait_for_status(db, result["first"]["id"], "sent")
    assert len(plain_smtp_server.messages) == 1
    assert count_messages(db) == 1


BAD_REQUESTS = [
    ({"to": ["bob@example.com\r\nBcc: victim@example.org"]}, "to[0]"),
    ({"to": ["bob@example.com"], "subject": "Hi\r\nBcc: victim@example.org"}, "subject"),
    ({"headers": {"X-Tag": "a\nBcc: victim@example.org"}}, "headers['X-Tag']"),
    ({"headers": {"Bcc": "victim@example.org"}}, "headers['Bcc']"),
    ({"to": ["not-an-address"]}, "to[0]"),
    ({"to": []}, "to"),
    ({"account": "nobody"}, "account"),
    ({"text": None, "html": None}, "text"),
    ({"text": "x" * 3000}, "text"),  # over the 2 KB limit the test sets
    ({"text": 42}, "text"),
    ({"reply_to": "bad\x00@example.com"}, "reply_to"),
    (
        {"attachments": [{"filename": "../etc/passwd", "content": "aGk="}]},
        "attachments[0].filename",
    ),
    ({"attachments": [{"filename": "a.bin", "content": "***"}]}, "attachments[0].content"),
    ({"bogus": 1}, "bogus"),
]


@pytest.mark.parametrize(("change", "field"), BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS])
def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(env, db, box, change, field):
    from worker.intake import InvalidRequest

    env.values["OUTBOX_MAX_MESSAGE_BYTES"] = "2048"
    make_account(db, box, "acme", port=2525, tls_mode="none")
    request = {"account": "acme", "to": ["bob@example.com"], "subject": "Hi", "text": "Hello"}
    request.update(change)
    with pytest.raises(InvalidRequest) as refused:
        env.client(db).enqueue(**request)
    assert any(e.field == field for e in refused.value.errors), refused.value
    assert field in str(refused.value)
    assert count_messages(db) == 0


def test_cli_send_refuses_bad_input_and_accepts_good(env, db, box, plain_smtp_server, start_worker):
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "worker.cli", *args],
        cwd=REPO,
        env={**_os_env(), **env.values},
        capture_output=True,
        text=True,
        timeout=60,
    )
    bad = run(
        "send",
        "--account",
        "acme",
        "--to",
        "bob@@example.com",
        "--subject",
        "x",
        "--text",
        "y",
        "--json",
    )
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["fields"][0]["field"] == "to[0]"
    unknown = run(
        "send", "--account", "ghost", "--to", "bob@example.com", "--subject", "x", "--text", "y"
    )
    assert unknown.returncode == 1 and "no account named 'ghost'" in unknown.stderr
    assert count_messages(db) == 0

    start_worker()
    good = run(
        "send",
        "--account",
        "acme",
        "--to",
        "bob@example.com",
        "--subject",
        "CLI",
        "--text",
        "y",
        "--header",
        "X-Campaign: spring",
        "--json",
    )
    assert good.returncode == 0, good.stderr
    message_id = json.loads(good.stdout)["id"]
    wait_for_status(db, message_id, "sent")
    assert plain_smtp_server.messages[0].message["X-Campaign"] == "spring"
    shown = run("show", str(message_id), "--json")
    story = json.loads(shown.stdout)
    assert story["status"] == "sent" and story["attempts"][0]["code"] == 250


def _os_env() -> dict[str, str]:
    import os

    return dict(os.environ)
