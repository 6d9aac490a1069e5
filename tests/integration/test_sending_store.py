"""The SMTP path's claim and record (worker.store.sending), on PostgreSQL and on SQLite.

PostgreSQL runs each as one statement without a transaction, SQLite as several in one
transaction; both must leave the same rows behind, including in the uncommon cases the
one-statement forms hand over to the long way (an attempt the sweeper already wrote as
interrupted, a lease lost while the mail went out).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.support.outbox import make_account
from worker.client import Outbox
from worker.clock import utcnow
from worker.crypto import SecretBox
from worker.intake import Limits
from worker.store.db import Database
from worker.store.messages import AttemptRecord, MessageUpdate, NotClaimed
from worker.store.models import Account, Attempt, Incident, Message, SmtpSlot
from worker.store.sending import SendClaim, claim_for_send, record_send
from worker.store.sweep import sweep_batch

HOLDER = "host:1"
LEASE_S = 60.0


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgresql":
        yield request.getfixturevalue("db")
        return
    sqlite = Database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    sqlite.create_all()
    yield sqlite
    sqlite.dispose()


def _message(store: Database, box: SecretBox) -> int:
    make_account(store, box, "acme", port=2525, tls_mode="none")
    return _enqueue(store)


def _enqueue(store: Database) -> int:
    client = Outbox(store, limits=Limits(), window_s=3600.0, wake_grace_s=60.0, wake=None)
    return client.enqueue(account="acme", to=["bob@example.com"], subject="Hi", text="x").id


def _claim(store: Database, message_id: int, *, now=None, token: str = "t1"):
    with store.session(single_statement=True) as session:
        return claim_for_send(
            session,
            message_id,
            now=now or utcnow(),
            lease_s=LEASE_S,
            token=token,
            holder=HOLDER,
        )


def _slots(store: Database) -> list[tuple[int, str | None]]:
    with store.session() as session:
        return [
            (r.slot, r.holder) for r in session.scalars(select(SmtpSlot).order_by(SmtpSlot.slot))
        ]


def test_claim_takes_the_message_its_account_and_a_connection_slot(store, box):
    mid = _message(store, box)
    got = _claim(store, mid)
    assert isinstance(got, SendClaim)
    assert got.message.id == mid and got.message.recipients == ("bob@example.com",)
    assert got.message.attempt_number == 1
    assert got.account.name == "acme" and got.account.open_incident_id is None
    assert got.slot == 0
    assert _slots(store) == [(0, HOLDER), (1, None)]
    # The same wake-up again finds the lease: nothing taken twice.
    again = _claim(store, mid, token="t2")
    assert isinstance(again, NotClaimed) and again.reason == "leased"


def test_claim_takes_no_slot_for_a_throttled_account_or_an_open_incident(store, box):
    mid = _message(store, box)
    now = utcnow()
    with store.session() as session:
        session.execute(update(Account).values(throttle_until=now + timedelta(minutes=5)))
    got = _claim(store, mid, now=now)
    assert isinstance(got, SendClaim) and got.slot is None and got.account.throttled(now)

    with store.session() as session:
        session.execute(update(Account).values(throttle_until=None))
        session.execute(update(Message).values(lease_until=None, lease_token=None))
        account_id = session.scalar(select(Account.id))
        session.add(
            Incident(account_id=account_id, opened_at=now, verdict="account", reason="bad password")
        )
    got = _claim(store, mid, now=now, token="t3")
    assert isinstance(got, SendClaim) and got.slot is None
    assert got.account.open_incident_id is not None
    assert _slots(store) == [(0, None), (1, None)]


def _sent(got: SendClaim) -> tuple[AttemptRecord, MessageUpdate]:
    now = utcnow()
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
        recipients={"bob@example.com": {"outcome": "sent", "code": 250}},
        worker=HOLDER,
    )
    update_ = MessageUpdate(
        status="sent",
        sent_via="smtp",
        delivered_to={"bob@example.com": {"outcome": "sent", "code": 250}},
        last_verdict="ok",
        last_code=250,
        last_enhanced="2.0.0",
    )
    return attempt, update_


def _record(store: Database, got: SendClaim, keep_slot_s: float | None) -> bool:
    attempt, update_ = _sent(got)
    with store.session(single_statement=True) as session:
        return record_send(
            session,
            got.message,
            attempt,
            update_,
            now=utcnow(),
            holder=HOLDER,
            keep_slot_s=keep_slot_s,
        )


def test_record_writes_the_message_the_attempt_and_keeps_or_frees_the_slot(store, box):
    mid = _message(store, box)
    got = _claim(store, mid)
    assert isinstance(got, SendClaim)
    assert _record(store, got, keep_slot_s=12.0) is True
    with store.session() as session:
        row = session.get(Message, mid)
        assert row.status == "sent" and row.sent_via == "smtp" and row.lease_token is None
        assert row.finished_at is not None and row.delivered_to["bob@example.com"]["code"] == 250
        [attempt] = session.scalars(select(Attempt)).all()
        assert (attempt.number, attempt.outcome, attempt.reply_code) == (1, "sent", 250)
        slot = session.get(SmtpSlot, (row.account_id, 0))
        # Kept for the idle connection: about 12 s from now, not the claim's lease.
        assert slot.holder == HOLDER
        assert timedelta(seconds=10) < slot.expires_at - utcnow() <= timedelta(seconds=12)

    got2 = _claim(store, _enqueue(store))
    assert isinstance(got2, SendClaim) and got2.slot == 0  # its own slot, renewed
    assert _record(store, got2, keep_slot_s=None) is True
    assert _slots(store) == [(0, None), (1, None)]


@pytest.mark.parametrize("swept", [True, False], ids=["swept-as-interrupted", "not-swept"])
def test_a_send_that_outlived_its_lease_is_still_recorded_as_sent(store, box, swept):
    """The slow send's 250 arrives after its lease ended and another worker claimed the
    message (the sweeper may have written the attempt as interrupted meanwhile). The mail
    went out: it is recorded as sent, with the real attempt, and the stale holder is told
    it no longer owns the message."""
    mid = _message(store, box)
    got = _claim(store, mid)
    assert isinstance(got, SendClaim)
    later = utcnow() + timedelta(seconds=LEASE_S + 1)
    if swept:
        with store.session() as session:
            batch = sweep_batch(
                session,
                now=later,
                limit=10,
                wake_grace_s=60.0,
                lease_s=LEASE_S,
                backup_enabled=False,
            )
        assert batch.interrupted == 1
    assert isinstance(_claim(store, mid, now=later, token="t2"), SendClaim)

    assert _record(store, got, keep_slot_s=None) is False
    with store.session() as session:
        row = session.get(Message, mid)
        assert row.status == "sent" and row.finished_at is not None
        [attempt] = session.scalars(select(Attempt)).all()
        assert (attempt.number, attempt.outcome, attempt.reply_code) == (1, "sent", 250)
