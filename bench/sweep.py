"""Sweep cost as the table grows: one sweep batch on 10k, 100k and 1M messages, 1% due.

    python -m bench.sweep [--sizes 10000,100000,1000000] [--batch 500] [--json FILE]

Prints a table (and JSON). Uses a throwaway PostgreSQL database on the test server
(OUTBOX_TEST_PG, default postgresql://postgres@127.0.0.1:5432/postgres). Each batch is
rolled back so every repetition sees the same due rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from standins.services import create_pg_database
from worker.clock import utcnow
from worker.store import migrate
from worker.store.db import Database
from worker.store.sweep import sweep_batch

FILL = """
INSERT INTO messages (account_id, message_id_header, from_addr, to_addrs, cc_addrs,
    bcc_addrs, subject, text_body, headers, attachment_count, size_bytes, status,
    created_at, updated_at, deadline, next_attempt_at, due_at, attempt_count, delivered_to)
SELECT 1, '<' || g || '@bench.example.com>', 'a@bench.example.com', '["b@example.com"]',
    '[]', '[]', 'bench', 'body', '[]', 0, 10,
    CASE WHEN g % 10 < 7 THEN 'sent' ELSE 'pending' END,
    now(), now(), now() + interval '1 day', now(),
    -- 1% of all rows are due (pending, due in the past); other pending rows wait an hour
    CASE WHEN g % 100 = 7 THEN now() - interval '1 minute' ELSE now() + interval '1 hour' END,
    1, '{}'
FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint)) AS g
"""


def fill(db: Database, total: int) -> None:
    with db.engine.begin() as conn:
        current = conn.execute(text("SELECT count(*) FROM messages")).scalar() or 0
        step = 200_000
        for start in range(current + 1, total + 1, step):
            conn.execute(text(FILL), {"start": start, "stop": min(total, start + step - 1)})
    with db.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE messages")
        )


def time_batches(db: Database, *, batch: int, repeats: int) -> list[float]:
    timings = []
    for _ in range(repeats):
        session = db._sessions()
        session.begin()
        started = time.perf_counter()
        result = sweep_batch(
            session, now=utcnow(), limit=batch, wake_grace_s=300, lease_s=300, backup_enabled=True
        )
        timings.append((time.perf_counter() - started) * 1000)
        assert result.size == batch, result.size
        session.rollback()
        session.close()
    return timings


def measure(
    sizes: list[int],
    *,
    batch: int = 100,
    repeats: int = 7,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Fill a throwaway database to each size in turn and time one sweep batch on it."""
    url, drop = create_pg_database()
    try:
        migrate.upgrade(url)
        db = Database(url)
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO accounts (id, name, smtp_host, smtp_port, tls_mode, "
                    "allow_plaintext, max_connections, backup_verified, settings_version, "
                    "throttle_level, created_at, updated_at) VALUES (1, 'bench', '127.0.0.1', 25, "
                    "'none', false, 2, false, 1, 0, now(), now())"
                )
            )
        rows: list[dict[str, Any]] = []
        for size in sorted(sizes):
            t0 = time.perf_counter()
            fill(db, size)
            fill_s = time.perf_counter() - t0
            timings = time_batches(db, batch=batch, repeats=repeats)
            with db.engine.connect() as conn:
                plan = (
                    conn.execute(
                        text(
                            "EXPLAIN SELECT id FROM messages WHERE status = 'pending' "
                            "AND due_at <= now() ORDER BY due_at LIMIT 500 "
                            "FOR UPDATE SKIP LOCKED"
                        )
                    )
                    .scalars()
                    .all()
                )
            rows.append(
                {
                    "messages": size,
                    "due": size // 100,
                    "batch": batch,
                    "median_ms": round(statistics.median(timings), 2),
                    "min_ms": round(min(timings), 2),
                    "max_ms": round(max(timings), 2),
                    "uses_partial_index": any("ix_messages_pending_due" in line for line in plan),
                    "fill_s": round(fill_s, 1),
                }
            )
            progress(
                f"{size:>10,} messages  {size // 100:>7,} due  batch {batch}: "
                f"median {rows[-1]['median_ms']:7.2f} ms  (min {rows[-1]['min_ms']:.2f}, "
                f"max {rows[-1]['max_ms']:.2f})  partial index: {rows[-1]['uses_partial_index']}"
            )
        db.dispose()
        return rows
    finally:
        drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument(
        "--batch",
        type=int,
        default=100,
        help="rows per batch: 100 = all that is due at 10k, so every size does the same work",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = measure(
        sizes, batch=args.batch, repeats=args.repeats, progress=lambda line: print(line, flush=True)
    )
    base = rows[0]["median_ms"]
    print(
        f"\nratio largest/smallest: {rows[-1]['median_ms'] / base:.2f}x "
        f"(target: flat, < 2x; < 50 ms at 1M)"
    )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"sweep": rows, "at": utcnow().isoformat()}, f, indent=2)


if __name__ == "__main__":
    main()
