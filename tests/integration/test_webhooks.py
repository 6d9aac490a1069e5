"""Signed webhooks: a real HTTP receiver that checks every signature from the spec, real
PostgreSQL, real worker processes; time for the backoff is an injected clock."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from sqlalchemy import select, update

from standins.accounts import make_account
from standins.services import flush_redis, wait_until
from tests.support.outbox import cli, wait_for_status, wrong_password_account
from tests.support.signed_webhook import SignedReceiver
from worker.clock import utcnow
from worker.crypto import SecretBox
from worker.store import migrate
from worker.store.db import Database
from worker.store.models import Account, Incident, IncidentNotice, WebhookDestination
from worker.store.notices import notice_webhooks
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
        # Incident notices go through the same guard: plain http is refused at the door.
        (["--notify-webhook", "http://hooks.example.com/n"], None, "notify_webhook"),
        (["--notify-webhook", "ftp://hooks.example.com/n"], None, "notify_webhook"),
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


# Incident notices: rows in incident_notices, posted by the same dispatcher.

AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"


def notify_account(db: Database, box: SecretBox, url: str, *, own_secret: bool = True) -> int:
    """An account whose notices go to ``url``, signed with its own events secret (the
    dispatcher's global secret is then another one: a verified POST proves which)."""
    account_id = make_account(db, box, "acme", port=2525, tls_mode="none", notify_webhook=url)
    if own_secret:
        with db.session() as session:
            session.execute(
                update(Account)
                .where(Account.id == account_id)
                .values(events_secret_encrypted=box.encrypt(SECRET))
            )
    return account_id


def incident_with_notice(
    db: Database, account_id: int, clock: Clock, *, kind: str = "opened", row: bool = True
) -> int:
    """An open incident, its notice written as the drain writes it (``row``: False, as an
    incident of the previous release, which had no notice rows)."""
    from worker.delivery import notice_due

    with db.session() as session:
        incident = Incident(
            account_id=account_id,
            opened_at=clock(),
            verdict="account",
            reason="login refused",
            last_code=535,
            last_enhanced="5.7.8",
            last_reply=AUTH_FAILED,
        )
        session.add(incident)
        session.flush()
        if row:
            notice_due(session, incident.id, kind, now=clock())
        return incident.id


def notice_row(db: Database, incident_id: int, kind: str = "opened") -> IncidentNotice:
    with db.session() as session:
        row = session.scalars(
            select(IncidentNotice).where(
                IncidentNotice.incident_id == incident_id, IncidentNotice.kind == kind
            )
        ).one()
        session.expunge(row)
        return row


def notices_posted(receiver: SignedReceiver, kind: str = "opened") -> list[dict[str, Any]]:
    """Bodies of the notice POSTs the receiver verified and answered 2xx."""
    return [
        p["body"]
        for p in receiver.posts
        if 200 <= p["answer"] < 300
        and p["body"]
        and p["body"].get("event") == f"smtp_incident.{kind}"
    ]


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The test's PostgreSQL database, or the embedded default: SQLite, migrated."""
    if request.param == "postgresql":
        yield request.getfixturevalue("db")
        return
    url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    migrate.upgrade(url)
    sqlite = Database(url)
    yield sqlite
    sqlite.dispose()


def test_a_notice_answered_500_500_then_200_arrives_once_signed_after_5_and_20_s(
    any_db, box, receiver, caplog
):
    db = any_db
    account_id = notify_account(db, box, receiver.url)
    clock = Clock()
    incident_id = incident_with_notice(db, account_id, clock)
    d = dispatcher(db, box, clock, secrets=[OLD_SECRET])  # the account's secret must sign
    receiver.script = [500, 500]

    delays = []
    for _ in range(2):
        assert d.run() == 0
        row = notice_row(db, incident_id)
        delays.append((row.next_try_at - clock.now).total_seconds())
        assert d.run() == 0  # not due yet: nothing posted
        clock.advance(delays[-1])
    assert delays == [5, 20]
    assert row.failures == 2 and "500" in (row.last_error or "") and row.posted_at is None
    with db.session() as session:
        [hook] = notice_webhooks(session)
    assert (hook["account"], hook["waiting"], hook["failing"], hook["posted"]) == ("acme", 0, 1, 0)
    assert hook["failing_since"] == row.failing_since and hook["next_try_at"] == row.next_try_at
    assert "500" in hook["last_error"]
    with caplog.at_level(logging.INFO, logger="outbox.webhooks"):
        assert d.run() == 1
    assert d.run() == 0
    clock.advance(86400)
    assert d.run() == 0

    assert [p["answer"] for p in receiver.posts] == [500, 500, 200]
    assert all(p["verified"] for p in receiver.posts)
    assert {p["headers"]["webhook-id"] for p in receiver.posts} == {
        f"msg_incident_{incident_id}_opened"
    }
    [body] = notices_posted(receiver)
    # The notice's own shape, as receivers know it (not the events' envelope).
    assert body["account"] == "acme" and body["incident_id"] == incident_id
    assert body["code"] == 535 and body["verdict"] == "account"
    assert body["advice"] and body["meaning"] and "message" in body
    row = notice_row(db, incident_id)
    assert row.posted_at is not None and row.failures == 2 and row.last_error is None
    with db.session() as session:
        [hook] = notice_webhooks(session)
    assert (hook["waiting"], hook["failing"], hook["posted"], hook["last_error"]) == (0, 0, 1, None)
    assert hook["last_success_at"] == row.posted_at
    [told] = [r for r in caplog.records if getattr(r, "event", None) == "notice"]
    assert told.getMessage() == "account acme was told its SMTP server is failing (by webhook)"
    assert (told.kind, told.account, told.incident_id) == ("opened", "acme", incident_id)


def test_a_notice_answered_410_is_given_up_with_an_alert_and_not_retried(
    env, db, box, receiver, caplog
):
    account_id = notify_account(db, box, receiver.url)
    clock = Clock()
    incident_id = incident_with_notice(db, account_id, clock)
    d = dispatcher(db, box, clock)
    receiver.script = [410]
    with caplog.at_level(logging.ERROR, logger="outbox.webhooks"):
        assert d.run() == 0
    [alert] = [r for r in caplog.records if getattr(r, "event", None) == "webhook_disabled"]
    assert alert.levelno == logging.ERROR and alert.account == "acme"
    assert "notify webhook" in alert.getMessage() and "410" in alert.getMessage()
    row = notice_row(db, incident_id)
    assert row.given_up_at is not None and "410" in (row.given_up_reason or "")
    clock.advance(86400 * 2)
    assert d.run() == 0
    assert len(receiver.posts) == 1

    listed = json.loads(cli(env, "events", "webhooks", "--json").stdout)
    [hook] = [r for r in listed if r["type"] == "notices"]
    assert hook["account"] == "acme" and hook["url"] == receiver.url
    assert (hook["waiting"], hook["failing"], hook["given_up"]) == (0, 0, 1)
    assert "410" in hook["given_up_reason"] and "410" in hook["last_error"]


def test_a_notice_failing_for_the_whole_retry_window_is_given_up(env, db, box, receiver, caplog):
    account_id = notify_account(db, box, receiver.url)
    clock = Clock()
    incident_id = incident_with_notice(db, account_id, clock)
    d = dispatcher(db, box, clock)
    receiver.status = 500
    tries = 0
    while notice_row(db, incident_id).given_up_at is None:
        with caplog.at_level(logging.WARNING, logger="outbox.webhooks"):
            d.run()
        tries += 1
        if tries == 3:  # failing, as the operator sees it
            text = cli(env, "events", "webhooks")
            assert text.returncode == 0, text.stderr
            assert "acme (notices)" in text.stdout and "1 failing" in text.stdout
            assert "last error: answered 500" in text.stdout
            assert max(len(line) for line in text.stdout.splitlines()) <= 80
        clock.advance(7200)
        assert tries < 40
    row = notice_row(db, incident_id)
    assert "retry window" in (row.given_up_reason or "")
    assert (clock.now - row.failing_since).total_seconds() >= 86400
    assert tries >= 12 and len(receiver.posts) == tries
    assert any(getattr(r, "event", None) == "webhook_disabled" for r in caplog.records)
    receiver.status = 200
    clock.advance(86400)
    assert d.run() == 0 and len(receiver.posts) == tries


def test_the_ssrf_guard_refuses_a_notify_webhook_on_a_private_address(db, box, receiver):
    https_url = receiver.url.replace("http://", "https://").replace("127.0.0.1", "hooks.test")
    account_id = notify_account(db, box, https_url)
    clock = Clock()
    incident_id = incident_with_notice(db, account_id, clock)
    refused = dispatcher(
        db, box, clock, allow_private=False, resolver=lambda host, port: ["10.0.0.7"]
    )
    assert refused.run() == 0
    row = notice_row(db, incident_id)
    assert "10.0.0.7" in (row.last_error or "") and "private" in (row.last_error or "")
    assert row.posted_at is None and row.given_up_at is None and row.failures == 1
    # Plain http to loopback without the allowance: refused too.
    with db.session() as session:
        session.execute(
            update(Account).where(Account.id == account_id).values(notify_webhook=receiver.url)
        )
    clock.advance(5)
    assert refused.run() == 0
    assert "plain http" in (notice_row(db, incident_id).last_error or "")
    assert receiver.posts == []


def test_a_notice_without_a_webhook_is_settled_without_a_post_or_alert(db, box, receiver, caplog):
    account_id = make_account(db, box, "acme", port=2525, tls_mode="none")
    clock = Clock()
    incident_id = incident_with_notice(db, account_id, clock)
    with caplog.at_level(logging.WARNING, logger="outbox.webhooks"):
        assert dispatcher(db, box, clock).run() == 0
    row = notice_row(db, incident_id)
    assert row.given_up_at is not None and row.given_up_reason == "no notify webhook configured"
    assert caplog.records == [] and receiver.posts == []


def test_a_notice_survives_a_dead_worker_and_a_flushed_broker(
    env, db, box, smtp_server, test_ca, start_worker
):
    with SignedReceiver(SECRET, status=503) as receiver:  # down while the incident opens
        env.values.update({"OUTBOX_EVENTS_SECRET": SECRET, "OUTBOX_RETRY_BASE": "30"})
        wrong_password_account(db, box, smtp_server, test_ca.ca_pem, notify_webhook=receiver.url)
        worker = start_worker()
        env.client(db).enqueue(account="acme", to=["bob@example.com"], subject="x", text="y")
        wait_until(lambda: _incident_ids(db), timeout=20, message="the incident to open")
        [incident_id] = _incident_ids(db)
        # The notice's row came with the incident, in its transaction.
        assert notice_row(db, incident_id).posted_at is None
        wait_until(
            lambda: notice_row(db, incident_id).failures >= 1,
            timeout=20,
            message="the worker's first try, answered 503",
        )
        worker.kill9()
        flush_redis(env.values["OUTBOX_BROKER_URL"])  # no task, no retry left anywhere
        assert notices_posted(receiver) == []

        receiver.status = 200
        clock = Clock()
        clock.advance(3600)  # past the backoff and the dead worker's lease
        d = dispatcher(db, box, clock)
        assert d.run() == 1
        assert d.run() == 0
        [body] = notices_posted(receiver)
        assert body["incident_id"] == incident_id and body["code"] == 535
        assert all(p["verified"] for p in receiver.posts)
        assert {p["headers"]["webhook-id"] for p in receiver.posts} == {
            f"msg_incident_{incident_id}_opened"
        }


def _incident_ids(db: Database) -> list[int]:
    with db.session() as session:
        return list(session.scalars(select(Incident.id)))


def test_an_old_style_notify_message_still_gets_its_webhook_posted_once(
    env, db, box, receiver, start_worker
):
    """An `outbox.notify` published before the upgrade, for an incident of the previous
    release (no notice row): the task writes the row and the dispatcher posts it."""
    env.values["OUTBOX_EVENTS_SECRET"] = SECRET
    account_id = notify_account(db, box, receiver.url, own_secret=False)
    incident_id = incident_with_notice(db, account_id, Clock(), row=False)
    producer = Celery(broker=env.values["OUTBOX_BROKER_URL"], set_as_current=False)
    for _ in range(2):  # delivered twice (at least once): told once
        producer.send_task(
            "outbox.notify", args=(incident_id, "opened"), queue="outbox.maintenance"
        )
    worker = start_worker()
    wait_until(lambda: notices_posted(receiver), timeout=20, message="the notice")
    wait_until(
        lambda: worker.log().count("outbox.notify[") >= 4,  # received and done, twice
        timeout=20,
        message="both notify tasks",
    )
    assert "'already sent'" in worker.log()
    dispatcher(db, box, Clock()).run()
    [body] = notices_posted(receiver)
    assert body["incident_id"] == incident_id and body["event"] == "smtp_incident.opened"
    assert len(receiver.posts) == 1 and receiver.posts[0]["verified"]
    row = notice_row(db, incident_id)
    assert row.posted_at is not None
    with db.session() as session:
        assert session.get(Incident, incident_id).notified_at is not None
    assert "account acme was told its SMTP server is failing (by webhook)" in worker.log()
