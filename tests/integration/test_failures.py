"""Issue 3: failures are understood, retried with backoff, and the account looked after.

Real worker processes on real Redis and PostgreSQL, an aiosmtpd server scripted per
recipient, and a real HTTP server receiving the account's incident notices. Time is
compressed through settings (sub-second backoff), never by sleeping.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from standins.accounts import make_account
from standins.services import wait_until
from standins.smtp import ScriptedSMTPServer
from tests.support.outbox import (
    attempts,
    cli,
    message,
    update_account,
    wait_for_status,
    wrong_password_account,
)
from tests.support.webhook import WebhookReceiver
from worker.store.models import Account, Incident

pytestmark = pytest.mark.integration

FAST_RETRIES = {
    "OUTBOX_RETRY_BASE": "0.2",
    "OUTBOX_RETRY_MAX": "0.5",
    "OUTBOX_RETRY_WINDOW": "120",
}


@pytest.fixture
def fast(env):
    env.values.update(FAST_RETRIES)
    return env


def test_greylisted_twice_then_accepted_is_sent_after_three_recorded_attempts(
    fast, db, box, plain_smtp_server, start_worker
):
    plain_smtp_server.script.rcpt["bob@example.com"] = [
        "451 4.7.1 Greylisted, please try again later",
        "451 4.7.1 Greylisted, please try again later",
    ]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    accepted = fast.client(db).enqueue(
        account="acme", to=["bob@example.com"], subject="Hi", text="x"
    )
    wait_for_status(db, accepted.id, "sent")
    tries = attempts(db, accepted.id)
    assert [(a.number, a.outcome, a.reply_code, a.verdict) for a in tries] == [
        (1, "deferred", 451, "retry"),
        (2, "deferred", 451, "retry"),
        (3, "sent", 250, "ok"),
    ]
    assert tries[0].enhanced_code == "4.7.1" and tries[0].stage == "rcpt"
    assert len(plain_smtp_server.messages) == 1


def test_unknown_user_fails_after_one_attempt_and_is_explained(
    fast, db, box, plain_smtp_server, start_worker
):
    plain_smtp_server.script.rcpt["ghost@example.com"] = [
        "550 5.1.1 <ghost@example.com>: no such user"
    ]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    accepted = fast.client(db).enqueue(
        account="acme", to=["ghost@example.com"], subject="Hi", text="x"
    )
    wait_for_status(db, accepted.id, "failed")
    [attempt] = attempts(db, accepted.id)
    assert (attempt.outcome, attempt.reply_code, attempt.enhanced_code) == ("failed", 550, "5.1.1")
    row = message(db, accepted.id)
    assert row.last_verdict == "recipient" and row.sent_via is None
    assert plain_smtp_server.messages == []

    shown = cli(fast, "show", str(accepted.id))
    assert "why failed" in shown.stdout and "mailbox" in shown.stdout.lower()


def test_partial_refusal_delivers_to_the_rest_and_shows_who_was_refused(
    fast, db, box, plain_smtp_server, start_worker
):
    plain_smtp_server.script.rcpt["ghost@example.com"] = ["550 5.1.1 no such user"]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    accepted = fast.client(db).enqueue(
        account="acme", to=["bob@example.com"], cc=["ghost@example.com"], subject="Hi", text="x"
    )
    wait_for_status(db, accepted.id, "sent")
    row = message(db, accepted.id)
    assert row.delivered_to["bob@example.com"]["outcome"] == "sent"
    assert row.delivered_to["ghost@example.com"]["outcome"] == "refused"
    assert list(plain_smtp_server.messages[0].rcpt_tos) == ["bob@example.com"]


def test_greylisted_cc_is_retried_alone_so_to_gets_one_copy(
    fast, db, box, plain_smtp_server, start_worker
):
    plain_smtp_server.script.rcpt["carol@example.com"] = ["451 4.7.1 Greylisted"]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    accepted = fast.client(db).enqueue(
        account="acme", to=["bob@example.com"], cc=["carol@example.com"], subject="Hi", text="x"
    )
    wait_for_status(db, accepted.id, "sent")
    envelopes = [list(m.rcpt_tos) for m in plain_smtp_server.messages]
    assert envelopes == [["bob@example.com"], ["carol@example.com"]]
    ids = set(plain_smtp_server.message_ids())
    assert ids == {message(db, accepted.id).message_id_header}


def test_wrong_password_gives_one_notice_and_fixing_it_sends_everything_at_once(
    fast, db, box, smtp_server, test_ca, start_worker
):
    with WebhookReceiver() as hook:
        wrong_password_account(db, box, smtp_server, test_ca.ca_pem, notify_webhook=hook.url)
        start_worker()
        client = fast.client(db)
        ids = [
            client.enqueue(
                account="acme", to=[f"user{i}@example.com"], subject=f"m{i}", text="x"
            ).id
            for i in range(5)
        ]
        wait_until(lambda: hook.events("opened"), timeout=15, message="the incident notice")
        # The probe keeps retrying and failing, but there is no second notice...
        so_far = sum(len(attempts(db, m)) for m in ids)
        wait_until(
            lambda: sum(len(attempts(db, m)) for m in ids) >= so_far + 3,
            timeout=20,
            message="further attempts",
        )
        assert len(hook.events("opened")) == 1
        notice = hook.events("opened")[0]
        assert notice["account"] == "acme" and notice["code"] == 535
        assert notice["verdict"] == "account" and notice["waiting"] == 5
        assert "password" in notice["advice"].lower()
        assert all(message(db, m).status == "pending" for m in ids)
        assert smtp_server.messages == []
        # ...and the circuit breaker kept the rest from being fired at the broken server.
        assert any(not attempts(db, m) for m in ids)
        with db.session() as session:
            incident = session.scalar(select(Incident).where(Incident.closed_at.is_(None)))
            assert incident is not None and incident.notified_at is not None

        fixed = cli(fast, "account", "set", "acme", "--password-stdin", stdin="s3cret\n")
        assert fixed.returncode == 0, fixed.stderr
        for mid in ids:
            wait_for_status(db, mid, "sent", timeout=15)
        assert sorted(len(m.rcpt_tos) for m in smtp_server.messages) == [1] * 5
        wait_until(lambda: hook.events("recovered"), timeout=15, message="the recovery notice")
        assert len(hook.events("recovered")) == 1
        with db.session() as session:
            assert session.scalar(select(Incident.closed_at)) is not None


def test_421_storm_slows_the_account_down(fast, db, box, plain_smtp_server, start_worker):
    fast.values["OUTBOX_THROTTLE_BASE"] = "3"
    plain_smtp_server.script.greeting_reply = "421 4.7.0 Too many connections, slow down"
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    client = fast.client(db)
    ids = [
        client.enqueue(account="acme", to=[f"u{i}@example.com"], subject="x", text="x").id
        for i in range(10)
    ]
    wait_until(
        lambda: plain_smtp_server.connections_opened >= 1, timeout=15, message="a first connection"
    )
    wait_until(lambda: _throttled(db), timeout=10, message="the account to be throttled")
    opened = plain_smtp_server.connections_opened
    # Without the slow-down, ten messages with 0.2-0.5 s retries would open dozens of
    # connections in the next two seconds; throttled, the account waits >= 1.5 s.
    wait_until(
        lambda: all(len(attempts(db, m)) >= 1 or message(db, m).attempt_count == 0 for m in ids),
        timeout=5,
        message="attempts settle",
    )
    import time

    deadline = time.monotonic() + 1.4
    while time.monotonic() < deadline:
        assert plain_smtp_server.connections_opened <= opened + 2
        time.sleep(0.1)
    plain_smtp_server.script.greeting_reply = None
    for mid in ids:
        wait_for_status(db, mid, "sent", timeout=30)


def _throttled(db) -> bool:
    with db.session() as session:
        level = session.scalar(select(Account.throttle_level))
        return bool(level)


def test_connection_cap_holds_across_two_workers(fast, db, box, start_worker):
    with ScriptedSMTPServer(tls="none") as server:
        server.script.hang_after_data_s = 0.15
        make_account(db, box, "acme", port=server.port, tls_mode="none", max_connections=1)
        start_worker(concurrency=2, name="a")
        start_worker(concurrency=2, name="b")
        client = fast.client(db)
        ids = [
            client.enqueue(account="acme", to=[f"u{i}@example.com"], subject="x", text="x").id
            for i in range(16)
        ]
        for mid in ids:
            wait_for_status(db, mid, "sent", timeout=60)
        assert server.max_concurrent_connections == 1
        assert len(server.messages) == 16


def test_account_test_command_explains_a_bad_password(env, db, box, smtp_server, test_ca):
    make_account(
        db,
        box,
        "acme",
        port=smtp_server.port,
        smtp_username="acct",
        password="wrong",
        tls_mode="starttls",
        ca_pem=test_ca.ca_pem,
    )
    bad = cli(env, "account", "test", "acme", "--json")
    assert bad.returncode == 1
    result = json.loads(bad.stdout)
    assert (result["code"], result["verdict"], result["stage"]) == (535, "account", "auth")
    update_account(db, box, "acme", password="s3cret")
    good = cli(env, "account", "test", "acme", "--json")
    assert good.returncode == 0 and json.loads(good.stdout)["ok"] is True
    assert smtp_server.messages == []
