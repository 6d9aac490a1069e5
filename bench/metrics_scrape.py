"""Scrape cost as the table grows: the exporter's collector on 10k, 100k and 1M messages.

    python -m bench.metrics_scrape [--sizes 10000,100000,1000000] [--accounts 2000]
        [--pending 0.01] [--recent 0.02] [--repeats 7] [--json FILE]

Fills a throwaway PostgreSQL database on the test server (OUTBOX_TEST_PG, default
postgresql://postgres@127.0.0.1:5432/postgres) with mail in every state, spread over
`--accounts` accounts (half of it in 20 big ones): `--pending` of it pending (a few past
the sweeper's grace), `--recent` finished within the exporter's settle time (still read
from the table at every scrape: 2% of 1M is 20,000 finishes in two minutes, ~170/s), the
rest finished over the last week; an attempt for every message tried, a second for one in
ten; open incidents and busy connection slots on a few accounts. Then it times what
`outbox metrics` does per scrape (`generate_latest` on its registry, in this process: the
same code the HTTP server runs): the first scrape (which folds every finish older than
the settle time into the tallies, once) and the steady state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest
from sqlalchemy import text

from standins.services import create_pg_database
from worker.clock import utcnow
from worker.metrics import MetricsConfig, OutboxCollector, registry_for
from worker.store import migrate
from worker.store.db import Database

TARGET_MS = 250.0
SETTLE_S = 120.0

ACCOUNTS = """
INSERT INTO accounts (id, name, smtp_host, smtp_port, tls_mode, allow_plaintext,
    max_connections, backup_verified, settings_version, throttle_level, created_at,
    updated_at, drain_queued_at)
SELECT a, 'acct-' || a, '127.0.0.1', 25, 'none', false, 2, false, 1, 0, now(), now(),
    CASE WHEN a % 50 = 0 THEN now() END
FROM generate_series(1, CAST(:accounts AS int)) AS a
"""
# r: a stable pseudo-random number per row, so every size has the same mix.
FILL = """
INSERT INTO messages (id, account_id, message_id_header, from_addr, to_addrs, cc_addrs,
    bcc_addrs, subject, text_body, headers, attachment_count, size_bytes, status,
    sent_via, priority, created_at, updated_at, deadline, next_attempt_at, due_at,
    attempt_count, delivered_to, finished_at, last_verdict)
SELECT g,
    CASE WHEN r % 2 = 0 THEN 1 + (r / 2) % 20 ELSE 1 + (r / 2) % :accounts END,
    '<' || g || '@bench.example.com>', 'a@bench.example.com', '["b@example.com"]', '[]',
    '[]', 'bench', 'body', '[]', 0, 10,
    CASE WHEN f < :pending THEN 'pending'
         WHEN f < :pending + 0.01 THEN 'cancelled'
         WHEN f < :pending + 0.03 THEN 'failed' ELSE 'sent' END,
    CASE WHEN f >= :pending + 0.06 THEN 'smtp' WHEN f >= :pending + 0.03 THEN 'backup' END,
    1,
    now() - make_interval(secs => (r % 604800)),
    now(),
    now() + interval '1 day',
    now(),
    CASE WHEN f < :pending AND r % 50 = 0 THEN now() - interval '10 minutes'
         ELSE now() + interval '1 day' END,
    CASE WHEN f < :pending + 0.01 AND f >= :pending THEN 0 ELSE 1 END,
    '{}',
    CASE WHEN f < :pending THEN NULL
         WHEN (r / 7) % 10000 < :recent * 10000
             THEN now() - make_interval(secs => (r % 110))
         ELSE now() - make_interval(secs => 300 + (r % 604800)) END,
    CASE WHEN f < :pending THEN (ARRAY[NULL, 'retry', 'account'])[1 + r % 3]
         WHEN f < :pending + 0.03 THEN 'recipient' END
FROM (
    SELECT g, abs(CAST(hashint8(g) AS bigint)) AS r,
        (abs(CAST(hashint8(g * 31 + 7) AS bigint)) % 10000) / 10000.0 AS f
    FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint)) AS g
) AS rows
"""
ATTEMPTS = """
INSERT INTO attempts (message_id, number, channel, started_at, finished_at, outcome, verdict)
SELECT m.id, n, CASE WHEN m.sent_via = 'backup' AND n = 2 THEN 'backup' ELSE 'smtp' END,
    coalesce(m.finished_at, now()) - interval '1 second', coalesce(m.finished_at, now()),
    CASE WHEN n = 1 AND (m.status = 'pending' OR m.sent_via = 'backup' OR m.id % 10 = 0)
             THEN 'deferred'
         WHEN m.status = 'failed' THEN 'failed' ELSE 'sent' END,
    CASE WHEN m.sent_via = 'backup' AND n = 2 THEN NULL
         WHEN n = 1 AND m.status = 'pending' THEN coalesce(m.last_verdict, 'retry')
         WHEN n = 1 AND (m.sent_via = 'backup' OR m.id % 10 = 0) THEN 'retry'
         WHEN m.status = 'failed' THEN 'recipient' ELSE 'ok' END
FROM messages AS m
CROSS JOIN LATERAL generate_series(1,
    CASE WHEN m.status = 'sent' AND (m.sent_via = 'backup' OR m.id % 10 = 0) THEN 2 ELSE 1 END
) AS n
WHERE m.id BETWEEN :start AND :stop AND m.status <> 'cancelled'
"""
INCIDENTS = """
INSERT INTO incidents (account_id, opened_at, verdict, reason, backup_deliveries)
SELECT a, now() - make_interval(secs => a * 60), 'account', 'bench', 0
FROM generate_series(1, CAST(:accounts AS int)) AS a WHERE a % 100 = 3
"""
SLOTS = """
INSERT INTO smtp_slots (account_id, slot, holder, expires_at)
SELECT a, 0, CASE WHEN a % 20 = 0 THEN 'bench-worker' END,
    CASE WHEN a % 20 = 0 THEN now() + interval '1 hour' END
FROM generate_series(1, CAST(:accounts AS int)) AS a
"""
SWEEP = """
INSERT INTO maintenance_runs (task, started_at, finished_at)
VALUES ('sweeper', now() - interval '2 seconds', now() - interval '1 second')
"""


def setup(db: Database, accounts: int) -> None:
    with db.engine.begin() as conn:
        conn.execute(text(ACCOUNTS), {"accounts": accounts})
        conn.execute(text(INCIDENTS), {"accounts": accounts})
        conn.execute(text(SLOTS), {"accounts": accounts})
        conn.execute(text(SWEEP))


def fill(db: Database, total: int, *, accounts: int, pending: float, recent: float) -> None:
    """Add rows up to `total` messages; the counters start over (nothing folded)."""
    with db.engine.begin() as conn:
        current = conn.execute(text("SELECT count(*) FROM messages")).scalar() or 0
        step = 100_000
        for start in range(current + 1, total + 1, step):
            stop = min(total, start + step - 1)
            params = {"start": start, "stop": stop, "accounts": accounts}
            conn.execute(text(FILL), {**params, "pending": pending, "recent": recent})
            conn.execute(text(ATTEMPTS), params)
        conn.execute(text("DELETE FROM metric_tallies"))
        conn.execute(text("DELETE FROM metric_marks"))
    with db.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))


def _plan(db: Database, sql: str) -> str:
    with db.engine.connect() as conn:
        return "\n".join(conn.execute(text("EXPLAIN " + sql)).scalars())


def _check(db: Database, scraped: str) -> dict[str, Any]:
    """The scrape's totals against plain counts of the table (every row is still there)."""
    finished = pending = 0.0
    for line in scraped.splitlines():
        if line.startswith("outbox_messages_finished_total{"):
            finished += float(line.rsplit(" ", 1)[1])
        elif line.startswith("outbox_messages_pending{"):
            pending += float(line.rsplit(" ", 1)[1])
    with db.engine.connect() as conn:
        counts = dict(
            conn.execute(text("SELECT status = 'pending', count(*) FROM messages GROUP BY 1")).all()
        )
    return {
        "finished_ok": finished == counts.get(False, 0),
        "pending_ok": pending == counts.get(True, 0),
    }


def measure(
    sizes: list[int],
    *,
    accounts: int = 2000,
    pending: float = 0.01,
    recent: float = 0.02,
    repeats: int = 7,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    url, drop = create_pg_database()
    try:
        migrate.upgrade(url)
        db = Database(url)
        setup(db, accounts)
        config = MetricsConfig(max_accounts=200, settle_s=SETTLE_S, wake_grace_s=60.0)
        rows: list[dict[str, Any]] = []
        for size in sorted(sizes):
            t0 = time.perf_counter()
            fill(db, size, accounts=accounts, pending=pending, recent=recent)
            fill_s = time.perf_counter() - t0
            registry = registry_for(OutboxCollector(db, config))
            t1 = time.perf_counter()
            generate_latest(registry)
            first_ms = (time.perf_counter() - t1) * 1000
            timings = []
            body = b""
            for _ in range(repeats):
                t2 = time.perf_counter()
                body = generate_latest(registry)
                timings.append((time.perf_counter() - t2) * 1000)
            scraped = body.decode()
            with db.engine.connect() as conn:
                live = conn.execute(
                    text(
                        "SELECT count(*) FROM messages "
                        "WHERE finished_at > now() - :s * interval '1 second'"
                    ),
                    {"s": SETTLE_S},
                ).scalar()
                n_pending = conn.execute(
                    text("SELECT count(*) FROM messages WHERE status = 'pending'")
                ).scalar()
            pending_plan = _plan(
                db,
                "SELECT account_id, last_verdict, count(*) FROM messages "
                "WHERE status = 'pending' GROUP BY 1, 2",
            )
            live_plan = _plan(
                db,
                "SELECT status, sent_via, count(*) FROM messages WHERE status IN "
                "('sent', 'failed', 'cancelled') AND finished_at > now() - interval '2 minutes' "
                "GROUP BY 1, 2",
            )
            row = {
                "messages": size,
                "pending": n_pending,
                "recent_finishes": live,
                "series": sum(1 for line in scraped.splitlines() if not line.startswith("#")),
                "first_scrape_ms": round(first_ms, 1),
                "median_ms": round(statistics.median(timings), 1),
                "min_ms": round(min(timings), 1),
                "max_ms": round(max(timings), 1),
                "pending_by_partial_index": "ix_messages_pending_due" in pending_plan
                or "ix_messages_account" in pending_plan,
                "recent_by_finished_index": "ix_messages_finished_at" in live_plan,
                "fill_s": round(fill_s, 1),
                "outbox_up": "outbox_up 1.0" in scraped,
                **_check(db, scraped),
            }
            rows.append(row)
            progress(
                f"{size:>10,} messages ({row['pending']:>6,} pending, "
                f"{row['recent_finishes']:>6,} recent finishes, {row['series']} series): "
                f"scrape median {row['median_ms']:6.1f} ms (min {row['min_ms']:.1f}, "
                f"max {row['max_ms']:.1f}); first scrape {row['first_scrape_ms']:.0f} ms; "
                f"indexes {row['pending_by_partial_index']}/{row['recent_by_finished_index']}; "
                f"totals match the table: {row['finished_ok'] and row['pending_ok']}"
            )
        db.dispose()
        return rows
    finally:
        drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--pending", type=float, default=0.01, help="share of mail pending")
    parser.add_argument(
        "--recent", type=float, default=0.02, help="share finished within the settle time"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rows = measure(
        [int(s) for s in args.sizes.split(",")],
        accounts=args.accounts,
        pending=args.pending,
        recent=args.recent,
        repeats=args.repeats,
        progress=lambda line: print(line, flush=True),
    )
    largest = rows[-1]
    verdict = "pass" if largest["median_ms"] <= TARGET_MS else "FAIL"
    print(
        f"\nscrape at {largest['messages']:,} messages: median {largest['median_ms']} ms "
        f"(target <= {TARGET_MS:.0f} ms): {verdict}"
    )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"metrics_scrape": rows, "at": utcnow().isoformat()}, f, indent=2)


if __name__ == "__main__":
    main()
