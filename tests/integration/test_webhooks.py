"""Signed webhooks: a real HTTP receiver that checks every signature from the spec, real
PostgreSQL, real worker processes; time for the backoff is an injected clock."""

from __future__ import annotations

import base64
import json
import logging
from datetime import timedelta
from typing import Any

import httpx
import pytest

from standins.accounts import make_account
from standins.services import flush_redis, wait_until
from tests.support.outbox import cli, wait_for_status
from tests.support.signed_webhook import SignedReceiver
from worker.clock import utcnow
from worker.crypto import SecretBox
from worker.store.db import Database
from worker.store.models import WebhookDestination
from worker.store.webhooks import set_account_webhook
from worker.webhooks import Dispatcher, Poster

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
GREYLISTED = "451 4.7.1 Greylisted, please try again later"


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> Any:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def receiver():
    with SignedReceiver(SECRET) as r:
        yield r


def dispatcher(db: Database, box: SecretBox, clock: Clock, **kw: Any) -> Dispatcher:
    allow_private = kw.pop("allow_private", True)
    poster = Poster(
        http=httpx.Client(timeout=5),
        secrets=kw.pop("secrets", [SECRET]),
        allow_private=allow_private,
        resolver=kw.pop("resolver", None) or (lambda host, port: ["127.0.0.1"]),
    )
    return Dispatcher(
        db,
        poster,
        decrypt=box.decrypt,
        global_url=kw.pop("global_url", None),
        clock=clock,
        batch=kw.pop("batch", 100),
    )


def hook_account(db: Database, box: SecretBox, account_id: int, url: str) -> None:
    with db.session() as session:
        set_account_webhook(session, account_id, url=url, secret_encrypted=box.encrypt(SECRET))


def destination(db: Database) -> WebhookDestination:
    with db.session() as session:
        row = session.query(WebhookDestination).one()
        session.expunge(row)
        return row


def enqueue(env, db: Database, n: int, account: str = "acme") -> list[int]:
    client = env.client(db)
    return [
        client.enqueue(
            account=account,
            to=["bob@example.com"],
            subject=f"mail {i}",
            text="hi",
            metadata={"n": i},
            send_at=(utcnow() + timedelta(days=1)).isoformat(),
        ).id
        for i in range(n)
    ]


def test_greylisted_twice_then_sent_arrives_signed_and_in_order_at_the_global_webhook(
    env, db, box, plain_smtp_server, start_worker, receiver
):
    env.values.update(
        {
            "OUTBOX_RETRY_BASE": "1",
            "OUTBOX_RETRY_MAX": "2",
            "OUTBOX_EVENTS_WEBHOOK": receiver.url,
            # A rotation: both secrets sign; the receiver knows only the new one.
            "OUTBOX_EVENTS_SECRET": f"{OLD_SECRET},{SECRET}",
            "OUTBOX_EVENTS_ALLOW_PRIVATE": "1",
            "OUTBOX_EVENTS_INTERVAL": "0.5",
        }
    )
    plain_smtp_server.script.rcpt["bob@example.com"] = [GREYLISTED, GREYLISTED]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    worker = start_worker(beat=True)
    mid = (
        env.client(db)
        .enqueue(
            account="acme",
            to=["bob@example.com"],
            subject="Invoice 42",
            text="Hello",
            metadata={"invoice": "INV-42"},
        )
        .id
    )
    wait_for_status(db, mid, "sent", timeout=30)
    wait_until(lambda: len(receiver.accepted_events()) >= 4, timeout=30, message="4 events")
    got = receiver.accepted_events()
    assert [e["type"] for e in got] == ["accepted", "deferred", "deferred", "sent"], got
    assert [e["seq"] for e in got] == [1, 2, 3, 4]
    assert len({e["id"] for e in got}) == 4
    for e in got:
        assert e["message_id"] == mid and e["account"] == "acme"
        assert e["metadata"] == {"invoice": "INV-42"}
    for deferral in got[1:3]:
        assert deferral["code"] == 451 and deferral["meaning"] and deferral["advice"]
    assert all(p["verified"] for p in receiver.posts)
    post = receiver.posts[0]
    assert post["body"]["type"] == "outbox.events" and post["body"]["version"] == 1
    assert len(post["headers"]["webhook-signature"].split(" ")) == 2
    assert post["headers"]["webhook-id"].startswith("msg_")
    # The secrets are in no log line.
    assert SECRET not in worker.log() and OLD_SECRET not in worker.log()
    assert SECRET.split("_", 1)[1] not in worker.log()


def test_the_receivers_own_check_rejects_a_tampered_body(receiver):
    from worker.webhook_signing import sign

    body = b'{"type":"outbox.events","version":1,"events":[]}'
    headers = sign([SECRET], webhook_id="msg_x", timestamp=int(utcnow().timestamp()), body=body)
    assert httpx.post(receiver.url, content=body, headers=headers).status_code == 200
    tampered = body.replace(b"[]", b"[{}]")
    assert httpx.post(receiver.url, content=tampered, headers=headers).status_code == 401
    wrong = sign([OLD_SECRET], webhook_id="msg_x", timestamp=int(utcnow().timestamp()), body=body)
    assert httpx.post(receiver.url, content=body, headers=wrong).status_code == 401


def test_a_receiver_down_for_a_while_gets_everything_in_order_with_growing_backoff(
    env, db, box, receiver
):
    account_id = make_account(db, box, "acme", port=2525, tls_mode="none")
    hook_account(db, box, account_id, receiver.url)
    ids = enqueue(env, db, 5)
    from worker.operator import Operator

    Operator(db, window_s=86400).cancel(ids[:2])  # two messages with 2 events each
    clock = Clock()
    d = dispatcher(db, box, clock, batch=3)
    receiver.script = [500, 500, 503]

    delays = []
    for _ in range(3):
        assert d.run() == 0
        dest = destination(db)
        delays.append((dest.next_try_at - clock.now).total_seconds())
        assert d.run() == 0  # not due yet: nothing posted
        clock.advance(delays[-1])
    assert delays == [5, 20, 80]
    assert len(receiver.posts) == 3
    assert dest.failing_since is not None and "503" in (dest.last_error or "")
    # Same batch posted again: the same webhook id, so a receiver can dedupe.
    assert len({p["headers"]["webhook-id"] for p in receiver.posts}) == 1

    assert d.run() == 7
    got = receiver.accepted_events()
    assert len(got) == 7 and len({e["id"] for e in got}) == 7
    per_message: dict[int, list[int]] = {}
    for e in got:
        per_message.setdefault(e["message_id"], []).append(e["seq"])
    assert all(seqs == sorted(seqs) for seqs in per_message.values())
    assert per_message[ids[0]] == [1, 2]
    dest = destination(db)
    assert dest.failing_since is None and dest.failures == 0 and dest.delivered == 7
    assert d.run() == 0


def test_410_disables_with_an_alert_and_setting_the_webhook_again_reenables(
    env, db, box, receiver, caplog
):
    account_id = make_account(db, box, "acme", port=2525, tls_mode="none")
    hook_account(db, box, account_id, receiver.url)
    enqueue(env, db, 2)
    clock = Clock()
    d = dispatcher(db, box, clock)
    receiver.script = [410]
    with caplog.at_level(logging.ERROR, logger="outbox.webhooks"):
        assert d.run() == 0
    assert any("disabled" in r.getMessage() and "410" in r.getMessage() for r in caplog.records)
    assert destination(db).disabled_at is not None
    clock.advance(86400 * 2)
    assert d.run() == 0
    assert len(receiver.posts) == 1
    show = cli(env, "account", "show", "acme")
    assert "DISABLED" in show.stdout and "410" in show.stdout, show.stdout

    env.values["OUTBOX_EVENTS_ALLOW_PRIVATE"] = "1"
    result = cli(env, "account", "set", "acme", "--events-webhook", receiver.url)
    assert result.returncode == 0, result.stderr
    assert destination(db).disabled_at is None
    assert d.run() == 2
    assert len(receiver.accepted_events()) == 2


def test_after_the_retry_window_the_destination_is_disabled_and_events_wait(
    env, db, box, receiver, caplog
):
    account_id = make_account(db, box, "acme", port=2525, tls_mode="none")
    hook_account(db, box, account_id, receiver.url)
    enqueue(env, db, 1)
    clock = Clock()
    d = dispatcher(db, box, clock)
    receiver.status = 500
    tries = 0
    while destination(db).disabled_at is None:
        d.run()
        tries += 1
        clock.advance(7200)
        assert tries < 40
    dest = destination(db)
    assert "retry window" in (dest.disabled_reason or "")
    assert (clock.now - dest.failing_since).total_seconds() >= 86400
    assert tries >= 12
    receiver.status = 200
    hook_account(db, box, account_id, receiver.url)
    assert d.run() == 1


def test_private_addresses_are_refused_without_the_allowance(env, db, box, receiver):
    account_id = make_account(db, box, "acme", port=2525, tls_mode="none")
    https_url = receiver.url.replace("http://", "https://").replace("127.0.0.1", "hooks.test")
    hook_account(db, box, account_id, https_url)
    enqueue(env, db, 1)
    clock = Clock()
    refused = dispatcher(
        db, box, clock, allow_private=False, resolver=lambda host, port: ["10.0.0.7"]
    )
    assert refused.run() == 0
    dest = destination(db)
    assert "10.0.0.7" in dest.last_error and "private" in dest.last_error
    assert receiver.posts == []
    # The real resolver: localhost is loopback.
    hook_account(db, box, account_id, https_url.replace("hooks.test", "localhost"))
    real = Dispatcher(
        db,
        Poster(http=httpx.Client(timeout=5), secrets=[SECRET], allow_private=False),
        decrypt=box.decrypt,
        global_url=None,
        clock=clock,
    )
    assert real.run() == 0
    assert "loopback" in destination(db).last_error
    # Plain http to loopback without the allowance: refused too.
    hook_account(db, box, account_id, receiver.url)
    assert real.run() == 0
    assert "plain http" in destination(db).last_error
    assert receiver.posts == []
    # With the allowance the receiver is reached (at the next try).
    clock.advance(5)
    assert dispatcher(db, box, clock).run() == 1
    assert len(receiver.accepted_events()) == 1


def test_the_global_webhook_gets_accounts_without_their_own(env, db, box):
    with SignedReceiver(SECRET) as own, SignedReceiver(SECRET) as shared:
        own_id = make_account(db, box, "acme", port=2525, tls_mode="none")
        make_account(db, box, "globex", port=2525, tls_mode="none")
        enqueue(env, db, 1, "globex")  # before the global destination exists
        d = dispatcher(db, box, Clock(), global_url=shared.url)
        hook_account(db, box, own_id, own.url)
        enqueue(env, db, 2, "acme")
        enqueue(env, db, 3, "globex")
        assert d.run() == 6
        assert {e["account"] for e in own.accepted_events()} == {"acme"}
        assert len(own.accepted_events()) == 2
        assert {e["account"] for e in shared.accepted_events()} == {"globex"}
        assert len(shared.accepted_events()) == 4


def test_cli_sets_shows_and_clears_the_webhook_and_refuses_bad_input(env, db, box, receiver):
    make_account(db, box, "acme", port=2525, tls_mode="none")
    env.values["OUTBOX_EVENTS_ALLOW_PRIVATE"] = "0"
    bad = [
        (["--events-webhook", "http://hooks.example.com/x"], None, "events_webhook"),
        (
            ["--events-webhook", "https://h.example.com/x", "--events-secret-stdin"],
            "abc",
            "events_secret",
        ),
        (
            ["--events-webhook", "https://h.example.com/x", "--events-secret-stdin"],
            "whsec_" + base64.b64encode(b"x" * 10).decode(),
            "events_secret",
        ),
        (
            ["--events-webhook", "https://h.example.com/x", "--events-secret-stdin"],
            "whsec_***",
            "events_secret",
        ),
    ]
    for args, stdin, field in bad:
        result = cli(env, "account", "set", "acme", *args, stdin=stdin)
        assert result.returncode != 0 and field in (result.stdout + result.stderr), result
    env.values["OUTBOX_EVENTS_ALLOW_PRIVATE"] = "1"
    result = cli(
        env,
        "account",
        "set",
        "acme",
        "--events-webhook",
        receiver.url,
        "--events-secret-stdin",
        stdin=SECRET + "\n",
    )
    assert result.returncode == 0, result.stderr
    show = cli(env, "account", "show", "acme", "--json")
    hook = json.loads(show.stdout)["events_webhook"]
    assert hook["url"] == receiver.url and hook["secret"] == "set"
    text = cli(env, "account", "show", "acme").stdout
    assert "secret: set" in text
    for output in (show.stdout, text, result.stdout, result.stderr):
        assert SECRET not in output and SECRET[6:] not in output
    with db.session() as session:
        from worker.store.accounts import get_account

        stored = get_account(session, "acme")
        assert stored is not None and SECRET not in (stored.events_secret_encrypted or "")
        assert box.decrypt(stored.events_secret_encrypted or "") == SECRET
    listed = cli(env, "events", "webhooks", "--json")
    assert json.loads(listed.stdout)[0]["url"] == receiver.url
    cleared = cli(env, "account", "set", "acme", "--no-events-webhook")
    assert cleared.returncode == 0, cleared.stderr
    assert (
        json.loads(cli(env, "account", "show", "acme", "--json").stdout)["events_webhook"] is None
    )


def test_redeliver_posts_a_messages_events_again_with_the_same_ids(env, db, box, receiver):
    account_id = make_account(db, box, "acme", port=2525, tls_mode="none")
    hook_account(db, box, account_id, receiver.url)
    [mid] = enqueue(env, db, 1)
    d = dispatcher(db, box, Clock())
    assert d.run() == 1
    result = cli(env, "events", "redeliver", str(mid), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["webhook_events"] == 1
    assert d.run() == 1
    got = receiver.accepted_events()
    assert len(got) == 2 and got[0]["id"] == got[1]["id"]


def test_kill_9_while_delivering_and_a_flushed_broker_lose_no_event(env, db, box, start_worker):
    with SignedReceiver(SECRET, delay_s=0.25) as receiver:
        env.values.update(
            {
                "OUTBOX_EVENTS_SECRET": SECRET,
                # The dispatcher's lease: 2 x 1 s + 5 s.
                "OUTBOX_EVENTS_TIMEOUT": "1",
                "OUTBOX_EVENTS_ALLOW_PRIVATE": "1",
                "OUTBOX_EVENTS_INTERVAL": "0.3",
                "OUTBOX_EVENTS_BATCH": "5",
            }
        )
        account_id = make_account(db, box, "acme", port=2525, tls_mode="none")
        hook_account(db, box, account_id, receiver.url)
        mids = enqueue(env, db, 60)
        with db.session() as session:
            from worker.store.events import list_events

            wanted = {e["id"] for e in list_events(session, account="acme", limit=1000)}
        assert len(wanted) == 60
        worker = start_worker(beat=True)
        wait_until(lambda: len(receiver.posts) >= 2, timeout=30, message="first posts")
        worker.kill9()
        flush_redis(env.values["OUTBOX_BROKER_URL"])
        at_kill = {e["id"] for e in receiver.accepted_events()}
        assert 0 < len(at_kill) < 60  # the kill landed while batches were being posted
        start_worker(beat=True, name="again")
        wait_until(
            lambda: wanted <= {e["id"] for e in receiver.accepted_events()},
            timeout=60,
            message="every event",
        )
        got = receiver.accepted_events()
        assert {e["id"] for e in got} == wanted
        by_id: dict[str, Any] = {}
        for e in got:
            assert by_id.setdefault(e["id"], e) == e  # a duplicate is the same event
        assert len(mids) == 60


def test_incident_notices_are_signed_guarded_and_410_is_an_alert(db, box, receiver, caplog):
    from worker.notify import Notice, NoticeFailed, Notifier

    notice = Notice(
        kind="opened",
        account="acme",
        payload={"event": "smtp_incident.opened", "account": "acme"},
        subject="s",
        text="t",
        webhook=receiver.url,
        email=None,
        secret_encrypted=box.encrypt(SECRET),
    )

    def notifier(allow_private: bool = True) -> Notifier:
        poster = Poster(http=httpx.Client(timeout=5), secrets=[], allow_private=allow_private)
        return Notifier(db, http=httpx.Client(timeout=5), poster=poster, decrypt=box.decrypt)

    assert notifier()._post_signed(notice, 7) == "by webhook"
    assert receiver.posts[0]["verified"]
    assert receiver.posts[0]["body"]["event"] == "smtp_incident.opened"
    receiver.script = [500, 410]
    with pytest.raises(NoticeFailed, match="500"):
        notifier()._post_signed(notice, 7)
    with caplog.at_level(logging.ERROR, logger="outbox.notify"):
        assert "410" in notifier()._post_signed(notice, 7)
    assert any("410" in r.getMessage() for r in caplog.records)
    with pytest.raises(NoticeFailed, match="plain http"):
        notifier(allow_private=False)._post_signed(notice, 7)
    assert len(receiver.posts) == 3
