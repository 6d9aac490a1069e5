"""The webhooks' queries read a batch, not the table: with tens of thousands of events
posted and tens of thousands waiting (a receiver back after an outage), each batch reads
about a batch of rows (PostgreSQL's own plan and row counts, on a real table)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import text

from standins.accounts import make_account
from worker.store import webhooks as store

pytestmark = pytest.mark.integration

POSTED = 30_000
WAITING = 30_000
BATCH = 100


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's scans of `events` produced plus those their filters threw away."""
    total = 0
    if plan.get("Relation Name") == "events":
        total += int(plan.get("Actual Rows", 0)) + int(plan.get("Rows Removed by Filter", 0))
    for child in plan.get("Plans", []):
        total += _rows_read(child)
    return total


@pytest.fixture
def posted_and_waiting(db, box):
    """POSTED events already at their webhooks, then WAITING newer ones, half each of two
    accounts: `own` has its own webhook, `plain` goes to the global one."""
    own = make_account(db, box, "own", port=2525, tls_mode="none")
    plain = make_account(db, box, "plain", port=2525, tls_mode="none")
    with db.session() as session:
        store.set_account_webhook(session, own, url="https://own.example/h", secret_encrypted=None)
    with db.engine.begin() as conn:
        for account in (own, plain):
            conn.execute(
                text(
                    "INSERT INTO messages (account_id, message_id_header, from_addr, to_addrs, "
                    "cc_addrs, bcc_addrs, subject, text_body, headers, attachment_count, "
                    "size_bytes, status, priority, created_at, updated_at, deadline, "
                    "next_attempt_at, due_at, attempt_count, delivered_to) "
                    "VALUES (:a, '<m' || :a || '@x>', 'a@x.example', '[]', '[]', '[]', 's', "
                    "'t', '[]', 0, 1, 'sent', 1, now(), now(), now(), now(), now(), 1, '{}')"
                ),
                {"a": account},
            )
        conn.execute(
            text(
                "INSERT INTO events (event_id, message_id, account_id, seq, type, at, data, "
                "publish_due, hooked_at) "
                "SELECT gen_random_uuid()::text, m.id, m.account_id, g, 'deferred', now(), "
                "'{}', false, now() FROM messages m, generate_series(1, :n) g"
            ),
            {"n": POSTED // 2},
        )
        conn.execute(
            text(
                "INSERT INTO events (event_id, message_id, account_id, seq, type, at, data, "
                "publish_due) "
                "SELECT gen_random_uuid()::text, m.id, m.account_id, :n + g, 'deferred', now(), "
                "'{}', false FROM messages m, generate_series(1, :w) g"
            ),
            {"n": POSTED // 2, "w": WAITING // 2},
        )
        conn.execute(text("ANALYZE events"))
    return db, own, plain


@pytest.mark.parametrize("which", ["global", "own"])
def test_a_batch_reads_about_a_batch_of_rows_however_many_were_posted(posted_and_waiting, which):
    db, own, _plain = posted_and_waiting
    if which == "global":
        dest = store.Claimed(0, store.GLOBAL_KEY, None, "https://g.example/h", 0, None, 0, None)
    else:
        dest = store.Claimed(
            0, store.account_key(own), own, "https://own.example/h", 0, None, 0, None
        )
    query = store.due_batch(dest, limit=BATCH)
    with db.engine.begin() as conn:
        conn.execute(store._NO_SORT)  # as `due_events` runs the query
        sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        for _ in range(2):  # the first scan also marks the index's dead entries
            plan = conn.execute(text("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)).scalar_one()
    plan = plan[0]["Plan"] if isinstance(plan, list) else json.loads(plan)[0]["Plan"]
    read = _rows_read(plan)
    with db.session() as session:
        due = store.due_events(session, dest, limit=BATCH)
    assert len(due) == BATCH
    assert all(d.event["account"] == ("plain" if which == "global" else "own") for d in due)
    # Before the by-id index and the sort-free plan, a global batch either walked the
    # primary key past every posted event or read every waiting one to sort them: tens
    # of thousands of rows for 100.
    print(f"{which}: {read} rows read for a batch of {BATCH}")
    assert read <= 3 * BATCH, (read, json.dumps(plan))
