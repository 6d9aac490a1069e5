"""Issue 13: the cases our scripted servers fake, against a real relay -- Debian's Postfix.

Real `outbox worker` processes on real Redis and PostgreSQL send through a private
Postfix instance (tests/support/postfix.py): STARTTLS with the test's own CA, Cyrus SASL
AUTH, a known-recipient list, a size limit and greylisting by postgrey. Each case must
end in the state, and with the explanation, that tests/integration/test_failures.py and
test_core_delivery.py prove with scripted replies: the explanation the user reads for
Postfix's real reply is compared with the one for the scripted reply.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from sqlalchemy import select

from standins.accounts import make_account
from standins.services import wait_until
from tests.support.outbox import attempts, cli, message, update_account, wait_for_status
from tests.support.postfix import (
    RELAY_PASSWORD,
    RELAY_SIZE_LIMIT,
    RELAY_USER,
    PostfixRelay,
)
from tests.support.webhook import WebhookReceiver
from worker.replies import Stage, explain_text
from worker.store.models import Incident
from worker.store.reports import explain_stored

pytestmark = [pytest.mark.integration, pytest.mark.postfix]

FAST_RETRIES = {
    "OUTBOX_RETRY_BASE": "0.2",
    "OUTBOX_RETRY_MAX": "0.5",
    "OUTBOX_RETRY_WINDOW": "120",
}


@pytest.fixture
def fast(env):
    env.values.update(FAST_RETRIES)
    return env


@pytest.fixture
def relay(postfix_relay: PostfixRelay) -> PostfixRelay:
    return postfix_relay


def relay_account(db, box, relay: PostfixRelay, *, password: str = RELAY_PASSWORD, **changes):
    """An account whose own server is the Postfix relay: STARTTLS, its CA, AUTH."""
    settings = {
        "smtp_username": RELAY_USER,
        "password": password,
        "tls_mode": "starttls",
        "ca_pem": relay.ca.ca_pem,
        **changes,
    }
    return make_account(db, box, "acme", port=relay.port, **settings)


def story(env, message_id: int) -> dict:
    """`outbox show ID --json`: what the user reads about the message."""
    shown = cli(env, "show", str(message_id), "--json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def scripted(reply: str, stage: Stage) -> dict:
    """The explanation of the reply a scripted server gives for the same case."""
    return explain_text(reply, stage).as_dict()


def test_starttls_needs_the_private_ca_then_the_mail_goes_once_over_tls_with_auth(
    fast, db, box, relay, start_worker
):
    relay_account(db, box, relay, ca_pem=None)
    start_worker()
    accepted = fast.client(db).enqueue(
        account="acme",
        to=[relay.address("bob")],
        cc=[relay.address("carol")],
        subject="Invoice 42",
        text="Hello Bob",
    )
    # The relay's certificate comes from the test's own CA, which nobody trusts yet.
    wait_until(lambda: attempts(db, accepted.id), timeout=20, message="a first attempt")
    first = attempts(db, accepted.id)[0]
    assert (first.stage, first.verdict, first.outcome) == ("connect", "account", "deferred")
    assert "certificate" in (first.server_text or "").lower()
    assert message(db, accepted.id).status == "pending"

    # Trusting that CA is a settings change: the pending mail goes now.
    saved = update_account(db, box, "acme", ca_pem=relay.ca.ca_pem)
    assert saved.smtp_changed and saved.pending == 1
    fast.wakeups(db).mail_due(accepted.account_id)
    wait_for_status(db, accepted.id, "sent")
    row = message(db, accepted.id)
    assert row.sent_via == "smtp"
    last = attempts(db, accepted.id)[-1]
    assert (last.channel, last.outcome, last.reply_code, last.stage) == (
        "smtp",
        "sent",
        250,
        "data",
    )
    assert "queued as" in (last.server_text or "")
    [received] = relay.wait_delivered(row.message_id_header)
    assert sorted(received.rcpt_tos) == [relay.address("bob"), relay.address("carol")]
    assert received.message["Subject"] == "Invoice 42"
    # Postfix's own Received header: the hop from Outbox was TLS and authenticated.
    hop = " ".join(received.message.get_all("Received")[0].split())
    assert "using TLSv1." in hop and "with ESMTPSA" in hop
    assert f"Authenticated sender: {RELAY_USER}@" in hop


def test_wrong_password_opens_one_incident_and_the_right_one_sends(
    fast, db, box, relay, start_worker
):
    with WebhookReceiver() as hook:
        relay_account(db, box, relay, password="wrong", notify_webhook=hook.url)
        start_worker()
        client = fast.client(db)
        ids = [
            client.enqueue(account="acme", to=[relay.address("erin")], subject=f"m{i}", text="x").id
            for i in range(3)
        ]
        wait_until(lambda: hook.events("opened"), timeout=20, message="the incident notice")
        [notice] = hook.events("opened")
        assert notice["account"] == "acme" and notice["code"] == 535
        assert notice["verdict"] == "account"
        expected = scripted("535 5.7.8 Authentication credentials invalid", Stage.AUTH)
        assert notice["meaning"] == expected["meaning"]
        assert "password" in notice["advice"].lower()
        tried = next(attempts(db, m)[0] for m in ids if attempts(db, m))
        assert (tried.stage, tried.reply_code, tried.enhanced_code) == ("auth", 535, "5.7.8")
        assert "authentication failed" in (tried.server_text or "")
        assert all(message(db, m).status == "pending" for m in ids)
        shown = story(fast, ids[0])
        assert shown["status"] == "pending" and shown["account_incident"] is not None
        with db.session() as session:
            incident = session.scalar(select(Incident).where(Incident.closed_at.is_(None)))
            assert incident is not None and incident.notified_at is not None

        fixed = cli(fast, "account", "set", "acme", "--password-stdin", stdin=f"{RELAY_PASSWORD}\n")
        assert fixed.returncode == 0, fixed.stderr
        for mid in ids:
            wait_for_status(db, mid, "sent", timeout=20)
            relay.wait_delivered(message(db, mid).message_id_header)
        wait_until(lambda: hook.events("recovered"), timeout=15, message="the recovery notice")
        assert len(hook.events("opened")) == 1 and len(hook.events("recovered")) == 1


def test_refused_and_greylisted_mail_ends_as_with_the_scripted_replies(
    fast, db, box, relay, start_worker
):
    """Four replies of Postfix's own, to four messages at once (one worker serves them,
    to keep the module short); each is checked by its own function below."""
    relay_account(db, box, relay)
    start_worker()
    client = fast.client(db)
    greylisted = client.enqueue(account="acme", to=[relay.address("grey")], subject="Hi", text="x")
    unknown = client.enqueue(account="acme", to=[relay.address("ghost")], subject="Hi", text="x")
    too_large = client.enqueue(
        account="acme",
        to=[relay.address("big")],
        subject="The big file",
        text="attached",
        attachments=[
            {
                "filename": "big.bin",
                "content_type": "application/octet-stream",
                # base64 makes it a third bigger again: well over the limit.
                "data": os.urandom(RELAY_SIZE_LIMIT),
            }
        ],
    )
    one_of_two = client.enqueue(
        account="acme",
        to=[relay.address("frank")],
        cc=[relay.address("nobody")],
        subject="Hi",
        text="x",
    )
    check_unknown_user_fails_after_one_attempt_and_is_explained(fast, db, relay, unknown.id)
    check_too_large_fails_after_one_attempt_with_the_size_explained(fast, db, relay, too_large.id)
    check_one_unknown_of_two_is_sent_to_the_other_and_shows_the_refusal(
        fast, db, relay, one_of_two.id
    )
    check_greylisted_is_deferred_then_sent(db, relay, greylisted.id)


def check_greylisted_is_deferred_then_sent(db, relay, message_id):
    wait_for_status(db, message_id, "sent", timeout=30)
    *deferred, last = attempts(db, message_id)
    assert deferred, "postgrey let the first attempt through"
    assert {(a.outcome, a.reply_code, a.verdict, a.stage) for a in deferred} == {
        ("deferred", 450, "retry", "rcpt")
    }
    assert "Greylisted" in (deferred[0].server_text or "")
    assert (last.outcome, last.reply_code, last.verdict) == ("sent", 250, "ok")
    # postgrey counts whole seconds from the first attempt it saw.
    assert (last.started_at - deferred[0].started_at).total_seconds() >= (
        relay.greylist_delay_s - 1
    )
    [received] = relay.wait_delivered(message(db, message_id).message_id_header)
    assert re.match(r"delayed \d+ seconds by postgrey", received.message["X-Greylist"])

    # While it waited, `outbox show` explained it as it does the scripted greylisting.
    first = deferred[0]
    why_pending = explain_stored(first.reply_code, first.enhanced_code, first.server_text)
    expected = scripted("451 4.7.1 Greylisted, please try again later", Stage.RCPT)
    assert (why_pending["verdict"], why_pending["meaning"], why_pending["advice"]) == (
        expected["verdict"],
        expected["meaning"],
        expected["advice"],
    )


def check_unknown_user_fails_after_one_attempt_and_is_explained(env, db, relay, message_id):
    wait_for_status(db, message_id, "failed")
    [attempt] = attempts(db, message_id)
    assert (attempt.outcome, attempt.reply_code, attempt.enhanced_code, attempt.stage) == (
        "failed",
        550,
        "5.1.1",
        "rcpt",
    )
    assert "User unknown in relay recipient table" in (attempt.server_text or "")
    row = message(db, message_id)
    assert row.last_verdict == "recipient" and row.sent_via is None
    assert relay.delivered(row.message_id_header) == []

    shown = story(env, message_id)
    expected = scripted("550 5.1.1 <ghost@example.com>: no such user", Stage.RCPT)
    assert shown["why"]["verdict"] == "recipient"
    assert (shown["why"]["meaning"], shown["why"]["advice"]) == (
        expected["meaning"],
        expected["advice"],
    )
    assert "mailbox" in shown["why"]["meaning"].lower()


def check_too_large_fails_after_one_attempt_with_the_size_explained(env, db, relay, message_id):
    wait_for_status(db, message_id, "failed")
    [attempt] = attempts(db, message_id)
    # Postfix takes the whole message, then refuses it at the end of DATA.
    assert (attempt.outcome, attempt.reply_code, attempt.enhanced_code, attempt.stage) == (
        "failed",
        552,
        "5.3.4",
        "data",
    )
    assert "message file too big" in (attempt.server_text or "")
    row = message(db, message_id)
    assert row.last_verdict == "message"
    assert relay.delivered(row.message_id_header) == []

    shown = story(env, message_id)
    expected = scripted("552 5.3.4 Message too big for system", Stage.DATA)
    assert shown["why"]["verdict"] == "message"
    assert (shown["why"]["meaning"], shown["why"]["advice"]) == (
        expected["meaning"],
        expected["advice"],
    )
    assert "bigger" in shown["why"]["meaning"] and "smaller" in shown["why"]["advice"]


def check_one_unknown_of_two_is_sent_to_the_other_and_shows_the_refusal(env, db, relay, message_id):
    wait_for_status(db, message_id, "sent")
    row = message(db, message_id)
    assert row.delivered_to[relay.address("frank")]["outcome"] == "sent"
    refused = row.delivered_to[relay.address("nobody")]
    assert refused["outcome"] == "refused" and refused["code"] == 550
    [received] = relay.wait_delivered(row.message_id_header)
    assert list(received.rcpt_tos) == [relay.address("frank")]

    shown = story(env, message_id)
    expected = scripted("550 5.1.1 no such user", Stage.RCPT)
    why = shown["refused"][relay.address("nobody")]
    assert (why["verdict"], why["meaning"], why["advice"]) == (
        "recipient",
        expected["meaning"],
        expected["advice"],
    )
