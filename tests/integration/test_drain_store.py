"""An account's queue and its drains (worker.store.drains, .sending, .sweep), on
PostgreSQL and on SQLite: the same cases, the same rows left behind.

PostgreSQL records an attempt in one statement without a transaction, SQLite in several
in one transaction; PostgreSQL skips rows another drain holds (`SKIP LOCKED`), SQLite
serialises its writers. What a drain, intake and the sweeper see must not differ.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from standins.accounts import make_account
from worker.client import IntakeClient
from worker.clock import utcnow
from worker.crypto import SecretBox
from worker.intake import Limits, validate_request
from worker.store import drains
from worker.store.accept import accept_many
from worker.store.db import Database
from worker.store.messages import AttemptRecord, Claimed, MessageUpdate
from worker.store.models import Account, Attempt, Message, SmtpSlot
from worker.store.sweep import sweep_messages
from worker.wakeups import Wakeups

LEASE_S = 60.0
TOLERANCE_S = 1.0


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgresql":
        yield request.getfixturevalue("db")
        return
    sqlite = Database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    sqlite.create_all()
    yield sqlite
    sqlite.dispose()


def _client(store: Database) -> IntakeClient:
    return IntakeClient(store, limits=Limits(), window_s=3600.0, wakeups=None)


def _account(store: Database, box: SecretBox, name: str = "acme", **changes) -> int:
    return make_account(store, box, name, port=2525, tls_mode="none", **changes)


def _enqueue(store: Database, n: int = 1, **fields) -> list[int]:
    client = _client(store)
    fields.setdefault("account", "acme")
    return [
        client.enqueue(to=[f"u{i}@example.com"], subject="Hi", text="x", **fields).id
        for i in range(n)
    ]


def _begin(store: Database, account_id: int, holder: str, now: datetime | None = None):
    with store.session() as session:
        return drains.begin_drain(
            session, account_id, holder=holder, now=now or utcnow(), hold_s=LEASE_S
        )


def _claim(store: Database, account_id: int, token: str, limit: int = 50, now=None):
    now = now or utcnow()
    with store.session() as session:
        return drains.claim_batch(
            session,
            account_id,
            token=token,
            limit=limit,
            now=now,
            lease_until=now + timedelta(seconds=LEASE_S),
            early_tolerance_s=TOLERANCE_S,
        )


def _end(store: Database, account_id: int, holder: str, token: str, now=None, keep=None):
    with store.session() as session:
        return drains.end_drain(
            session,
            account_id,
            holder=holder,
            token=token,
            now=now or utcnow(),
            count_up_to=1000,
            early_tolerance_s=TOLERANCE_S,
            keep=keep,
        )


def _flags(store: Database, account_id: int) -> tuple[datetime | None, datetime | None]:
    with store.session() as session:
        row = session.execute(
            select(Account.drain_queued_at, Account.drain_timer_at).where(Account.id == account_id)
        ).one()
        return row[0], row[1]


def _sent(claimed: Claimed) -> tuple[AttemptRecord, MessageUpdate]:
    now = utcnow()
    result = {"outcome": "sent", "code": 250, "text": "queued", "verdict": "ok"}
    attempt = AttemptRecord(
        channel="smtp",
        started_at=now,
        finished_at=now,
        outcome="sent",
        verdict="ok",
        stage=None,
        reply_code=250,
        enhanced_code="2.0.0",
        server_text="250 2.0.0 queued",
        recipients={r: result for r in claimed.recipients},
        worker="test",
    )
    update_ = MessageUpdate(
        status="sent",
        sent_via="smtp",
        delivered_to={r: result for r in claimed.recipients},
        last_verdict="ok",
        last_code=250,
        last_enhanced="2.0.0",
    )
    return attempt, update_


def _record_sent(store: Database, claimed: Claimed) -> bool:
    attempt, update_ = _sent(claimed)
    return store.attempts.record(
        store, claimed, attempt, update_, now=utcnow(), give_up_after_s=5.0
    )


def test_a_drain_takes_a_slot_and_the_queued_flag_and_promises_when_none_is_free(store, box):
    account_id = _account(store, box, max_connections=2)
    with store.session() as session:
        assert drains.request_drain(session, account_id, now=utcnow(), stale_s=60.0)
    assert _flags(store, account_id)[0] is not None

    first = _begin(store, account_id, "w:1")
    assert first is not None and first.slot == 0 and first.account.name == "acme"
    assert _flags(store, account_id)[0] is None  # taken by the drain
    second = _begin(store, account_id, "w:2")
    assert second is not None and second.slot == 1
    third = _begin(store, account_id, "w:3")
    assert third is not None and third.slot is None
    # Every slot busy: no slot held, and the queued flag says the running drains look again.
    assert _flags(store, account_id)[0] is not None
    with store.session() as session:
        holders = sorted(h for h in session.scalars(select(SmtpSlot.holder)) if h)
    assert holders == ["w:1", "w:2"]
    assert _begin(store, 999_999, "w:4") is None


def test_a_batch_is_claimed_in_send_order_skipping_what_is_not_the_drains(store, box):
    account_id = _account(store, box)
    bulk = _enqueue(store, 2, priority="bulk")
    normal = _enqueue(store, 2)
    high = _enqueue(store, 1, priority="high")
    later = _enqueue(store, 1, send_at=(utcnow() + timedelta(hours=1)).isoformat())
    _account(store, box, "other")
    other = _enqueue(store, 1, account="other")

    held = _claim(store, account_id, "held", limit=1)
    assert [c.id for c in held] == high  # high first
    batch = _claim(store, account_id, "t1")
    # Then normal before bulk, oldest first; not the held one, not the scheduled one,
    # not another account's.
    assert [c.id for c in batch] == normal + bulk
    assert all(c.attempt_number == 1 for c in batch)
    assert later[0] not in [c.id for c in batch] and other[0] not in [c.id for c in batch]
    assert _claim(store, account_id, "t2") == []


def test_recording_writes_the_message_and_its_attempt(store, box):
    account_id = _account(store, box)
    [mid] = _enqueue(store)
    [claimed] = _claim(store, account_id, "t1")
    assert _record_sent(store, claimed) is True
    with store.session() as session:
        row = session.get(Message, mid)
        assert row.status == "sent" and row.sent_via == "smtp" and row.lease_token is None
        assert row.finished_at is not None and row.delivered_to["u0@example.com"]["code"] == 250
        [attempt] = session.scalars(select(Attempt)).all()
        assert (attempt.number, attempt.outcome, attempt.reply_code) == (1, "sent", 250)


def test_what_a_drain_did_not_send_goes_back_uncounted_and_the_queue_is_read(store, box):
    account_id = _account(store, box, max_connections=2)
    ids = _enqueue(store, 3)
    later = _enqueue(store, 1, send_at=(utcnow() + timedelta(seconds=90)).isoformat())
    start = _begin(store, account_id, "w:1")
    assert start is not None and start.slot == 0
    batch = _claim(store, account_id, "t1")
    assert [c.id for c in batch] == ids
    assert _record_sent(store, batch[0])
    queue = _end(store, account_id, "w:1", "t1")
    assert queue is not None
    assert queue.due_now == 2 and queue.free_slots == 2
    assert queue.next_due_at is not None
    assert abs((queue.next_due_at - utcnow()).total_seconds() - 90) < 5
    with store.session() as session:
        rows = {m.id: m for m in session.scalars(select(Message))}
        assert [rows[m].attempt_count for m in ids] == [1, 0, 0]
        assert all(rows[m].lease_token is None for m in ids)
        assert rows[later[0]].attempt_count == 0
        assert not [h for h in session.scalars(select(SmtpSlot.holder)) if h]


def test_a_drain_that_failed_to_record_keeps_that_message_leased_for_the_sweeper(store, box):
    """The server may hold that one (its record failed): resending it at once would be a
    second copy for sure; it waits for its lease to end and the sweeper's judgement."""
    account_id = _account(store, box)
    ids = _enqueue(store, 3)
    assert _begin(store, account_id, "w:1") is not None
    batch = _claim(store, account_id, "t1")
    queue = _end(store, account_id, "w:1", "t1", keep=batch[0].id)
    assert queue is not None and queue.due_now == 2
    with store.session() as session:
        rows = {m.id: m for m in session.scalars(select(Message))}
    assert rows[ids[0]].lease_token == "t1" and rows[ids[0]].attempt_count == 1
    assert [rows[m].lease_token for m in ids[1:]] == [None, None]


def test_a_send_that_outlived_its_lease_is_still_recorded_as_sent(store, box):
    """The slow send's 250 arrives after its lease ended and the sweeper wrote the attempt
    as interrupted. The mail went out: it is recorded as sent, with the real attempt, and
    the stale drain is told it no longer owned the message."""
    account_id = _account(store, box)
    [mid] = _enqueue(store)
    [claimed] = _claim(store, account_id, "t1")
    later = utcnow() + timedelta(seconds=LEASE_S + 1)
    with store.session() as session:
        batch, freed = sweep_messages(
            session, now=later, limit=10, wake_grace_s=60.0, backup_enabled=False
        )
    assert batch.interrupted == 1 and freed == {account_id}
    assert _record_sent(store, claimed) is False
    with store.session() as session:
        row = session.get(Message, mid)
        assert row.status == "sent" and row.finished_at is not None
        [attempt] = session.scalars(select(Attempt)).all()
        assert (attempt.number, attempt.outcome, attempt.reply_code) == (1, "sent", 250)


def test_a_dead_drains_batch_one_interrupted_attempt_the_rest_back_uncounted(store, box):
    account_id = _account(store, box)
    ids = _enqueue(store, 4)
    batch = _claim(store, account_id, "dead")
    assert _record_sent(store, batch[0])  # the drain sent one, then died on the second
    later = utcnow() + timedelta(seconds=LEASE_S + 1)
    with store.session() as session:
        swept, freed = sweep_messages(
            session, now=later, limit=10, wake_grace_s=60.0, backup_enabled=False
        )
    assert (swept.interrupted, swept.returned, freed) == (1, 2, {account_id})
    with store.session() as session:
        rows = {m.id: m for m in session.scalars(select(Message))}
        outcomes = {(a.message_id, a.number): a.outcome for a in session.scalars(select(Attempt))}
    assert outcomes == {(ids[0], 1): "sent", (ids[1], 1): "interrupted"}
    assert [rows[m].attempt_count for m in ids] == [1, 1, 0, 0]
    assert all(rows[m].lease_token is None for m in ids[1:])
    # Back in the queue, in their order: the next drain takes them.
    assert [c.id for c in _claim(store, account_id, "next", now=later)] == ids[1:]


def test_the_sweeper_leaves_an_attempt_the_worker_recorded_after_all(store, box):
    """The interrupted attempt is written only where no attempt of that number exists."""
    account_id = _account(store, box)
    ids = _enqueue(store, 2)
    _claim(store, account_id, "dead")
    now = utcnow()
    with store.session() as session:  # the attempt's row is there, the message still leased
        session.add(
            Attempt(
                message_id=ids[0],
                number=1,
                channel="smtp",
                started_at=now,
                finished_at=now,
                outcome="sent",
                reply_code=250,
            )
        )
    later = now + timedelta(seconds=LEASE_S + 1)
    with store.session() as session:
        _swept, freed = sweep_messages(
            session, now=later, limit=10, wake_grace_s=60.0, backup_enabled=False
        )
    assert freed == {account_id}
    with store.session() as session:
        attempts = [(a.message_id, a.number, a.outcome) for a in session.scalars(select(Attempt))]
    assert attempts == [(ids[0], 1, "sent")]


def test_intake_publishes_one_wake_up_per_account_until_a_drain_takes_it(store, box):
    account_id = _account(store, box)
    now = utcnow()
    with store.session() as session:
        assert drains.request_drain(session, account_id, now=now, stale_s=60.0)
    with store.session() as session:
        assert not drains.request_drain(session, account_id, now=now, stale_s=60.0)
    # A wake-up older than the grace may have been lost: publish again.
    with store.session() as session:
        assert drains.request_drain(
            session, account_id, now=now + timedelta(seconds=61), stale_s=60.0
        )
    # Timers: one per time, an earlier one replaces a later one.
    in_90 = now + timedelta(seconds=90)
    with store.session() as session:
        assert drains.request_drain(session, account_id, now=now, at=in_90, stale_s=60.0)
        assert not drains.request_drain(session, account_id, now=now, at=in_90, stale_s=60.0)
        assert not drains.request_drain(
            session, account_id, now=now, at=in_90 + timedelta(seconds=30), stale_s=60.0
        )
        assert drains.request_drain(
            session, account_id, now=now, at=in_90 - timedelta(seconds=30), stale_s=60.0
        )


def test_no_wake_up_while_a_drain_runs_its_end_finds_the_new_mail(store, box):
    """The issue's rule: intake publishes only when no drain is pending or running. The
    running drain's end sees what arrived meanwhile and says it is due."""
    account_id = _account(store, box, max_connections=2)
    assert _begin(store, account_id, "w:1") is not None  # takes a slot and the flag
    [mail] = _enqueue(store, 1)
    with store.session() as session:
        assert not drains.request_drain(session, account_id, now=utcnow(), stale_s=60.0)
    assert _flags(store, account_id)[0] is None
    queue = _end(store, account_id, "w:1", "t1")
    assert queue is not None and queue.due_now == 1 and queue.free_slots == 2
    # The drain is over: now a new mail's intake publishes a wake-up.
    with store.session() as session:
        assert drains.request_drain(session, account_id, now=utcnow(), stale_s=60.0)
    # A slot whose lease ran out (its drain died) is no running drain.
    other = _account(store, box, "other")
    assert _begin(store, other, "dead:1", now=utcnow() - timedelta(seconds=LEASE_S + 1))
    with store.session() as session:
        assert drains.request_drain(session, other, now=utcnow(), stale_s=60.0)
    assert mail


def _wait_for_a_lock_wait(db: Database) -> None:
    """Until another backend of the test database waits for a lock (a row lock here)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with db.engine.connect() as conn:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.01)
    raise AssertionError("nobody waited for the account's lock")


def _end_in(session, account_id: int):
    return drains.end_drain(
        session,
        account_id,
        holder="w:1",
        token="t",
        now=utcnow(),
        count_up_to=100,
        early_tolerance_s=TOLERANCE_S,
    )


def test_intake_waits_for_a_drains_end_and_then_publishes(db, box):
    """PostgreSQL, two connections: a drain's end holds the account's lock; intake's
    transaction (store the mail, ask for a drain) waits for it, then sees the slot free
    and publishes. The mail is never left with no drain coming."""
    account_id = _account(db, box)
    published: list[tuple[int, float | None]] = []
    client = IntakeClient(
        db,
        limits=Limits(),
        window_s=3600.0,
        wakeups=Wakeups(db, lambda a, c: published.append((a, c)), grace_s=60, countdown_max_s=300),
    )
    assert _begin(db, account_id, "w:1") is not None
    with db.session() as ending:
        queue = _end_in(ending, account_id)
        assert queue is not None and queue.due_now == 0
        intake = threading.Thread(
            target=lambda: client.enqueue(
                account="acme", to=["a@example.com"], subject="s", text="x"
            )
        )
        intake.start()
        _wait_for_a_lock_wait(db)
        assert published == []
    intake.join(10)
    assert published == [(account_id, None)]


def test_a_drains_end_waits_for_intake_and_then_counts_its_mail(db, box):
    """The other order: intake's transaction holds the lock (a drain is running: no
    wake-up); the drain's end waits for it and then counts the new mail as due."""
    account_id = _account(db, box)
    assert _begin(db, account_id, "w:1") is not None
    request = validate_request(
        {"account": "acme", "to": ["a@example.com"], "subject": "s", "text": "x"},
        limits=Limits(),
        now=utcnow(),
    )
    seen: list[drains.QueueState | None] = []

    def end() -> None:
        with db.session() as session:
            seen.append(_end_in(session, account_id))

    with db.session() as intake:
        accept_many(intake, [request], now=utcnow(), window_s=3600.0)
        assert not drains.request_drain(intake, account_id, now=utcnow(), stale_s=60.0)
        ending = threading.Thread(target=end)
        ending.start()
        _wait_for_a_lock_wait(db)
    ending.join(10)
    assert seen and seen[0] is not None and seen[0].due_now == 1


def test_the_sweeper_wakes_only_accounts_nobody_is_draining(store, box):
    ids = {name: _account(store, box, name) for name in ("idle", "fresh", "busy", "slow", "none")}
    for name in ("idle", "fresh", "busy", "slow"):
        _enqueue(store, 1, account=name)
    now = utcnow()
    with store.session() as session:
        session.execute(
            update(Account).where(Account.id == ids["fresh"]).values(drain_queued_at=now)
        )
        session.execute(
            update(Account)
            .where(Account.id == ids["idle"])
            .values(drain_queued_at=now - timedelta(minutes=5))  # stale: the wake-up was lost
        )
        session.execute(
            update(Account)
            .where(Account.id == ids["slow"])
            .values(throttle_until=now + timedelta(minutes=5))
        )
    assert _begin(store, ids["busy"], "w:1") is not None  # a drain is running
    with store.session() as session:
        woken = drains.accounts_to_wake(session, now=now, stale_s=60.0, limit=100)
    assert woken == [ids["idle"]]
    with store.session() as session:  # marked: a second sweep does not wake it again
        assert drains.accounts_to_wake(session, now=now, stale_s=60.0, limit=100) == []


def test_renewal_extends_the_batch_and_the_slot_and_says_what_is_still_held(store, box):
    account_id = _account(store, box)
    ids = _enqueue(store, 2)
    assert _begin(store, account_id, "w:1") is not None
    batch = _claim(store, account_id, "t1")
    assert _record_sent(store, batch[0])
    until = utcnow() + timedelta(minutes=10)
    with store.session() as session:
        held, slot = drains.renew_lease(
            session, token="t1", account_id=account_id, holder="w:1", until=until
        )
    assert held == {ids[1]} and slot is True
    with store.session() as session:
        row = session.get(Message, ids[1])
        assert abs((row.lease_until - until).total_seconds()) < 1
        assert row.due_at == row.lease_until
        expires = session.scalar(select(SmtpSlot.expires_at).where(SmtpSlot.holder == "w:1"))
        assert abs((expires - until).total_seconds()) < 1
