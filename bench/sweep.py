"""Sweep cost as the table grows: one batch of each sweep query on 10k, 100k, 1M messages.

    python -m bench.sweep [--sizes 10000,100000,1000000] [--batch 100] [--json FILE]

The sweeper asks two questions (worker.store.sweep), each timed on its own:

* `sweep_messages`: messages whose `due_at` passed (a lease that ran out, a deadline).
  1% of the table is drains' batches whose lease is over (ten messages a lease), so at
  every size a batch of 100 frees ten leases: ten attempts recorded as interrupted, ninety
  messages given back uncounted.
* `sweep_accounts`: accounts with due mail and nobody draining them. 1,000 accounts share
  the table: 100 of them (1, 11, ... 991) have due mail nobody holds (lost wake-ups,
  another 1% of the table), 100 (5, 15, ... 995) hold a connection slot and those leased
  batches (drains running: as sweep_accounts sees the rows above), the other 800 only
  sent mail and retries an hour away. At every size a batch of 100 looks at all 1,000
  accounts and wakes the same 100.

Prints a table (and JSON). Uses a throwaway PostgreSQL database on the test server
(OUTBOX_TEST_PG, default postgresql://postgres@127.0.0.1:5432/postgres). Each batch is
rolled back so every repetition sees the same rows.
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
from worker.store.sweep import sweep_accounts, sweep_messages

ACCOUNTS = 1000
#: Accounts 1, 11, 21, ... 991 hold the due mail.
DUE_ACCOUNTS = 100

FILL_ACCOUNTS = """
INSERT INTO accounts (id, name, smtp_host, smtp_port, tls_mode, allow_plaintext,
    max_connections, backup_verified, settings_version, throttle_level, created_at,
    updated_at)
SELECT a, 'bench' || a, '127.0.0.1', 25, 'none', false, 2, false, 1, 0, now(), now()
FROM generate_series(1, :n) AS a;
INSERT INTO smtp_slots (account_id, slot, holder, expires_at)
SELECT a, s, CASE WHEN a % 10 = 5 AND s = 0 THEN 'bench-drain' END,
    CASE WHEN a % 10 = 5 AND s = 0 THEN now() + interval '1 hour' END
FROM generate_series(1, :n) AS a, generate_series(0, 1) AS s;
"""

FILL = """
INSERT INTO messages (account_id, message_id_header, from_addr, to_addrs, cc_addrs,
    bcc_addrs, subject, text_body, headers, attachment_count, size_bytes, status, priority,
    created_at, updated_at, deadline, next_attempt_at, due_at, lease_token, lease_until,
    attempt_count, delivered_to)
SELECT
    CASE WHEN g % 100 = 3 THEN 1 + 10 * ((g / 100) % :due_accounts)
         WHEN g % 100 = 7 THEN 5 + 10 * ((g / 100) % :due_accounts)
         ELSE 1 + g % :accounts END,
    '<' || g || '@bench.example.com>', 'a@bench.example.com', '["b@example.com"]',
    '[]', '[]', 'bench', 'body', '[]', 0, 10,
    CASE WHEN g % 100 IN (3, 7) OR g % 10 >= 8 THEN 'pending' ELSE 'sent' END, 1,
    now(), now(), now() + interval '1 day',
    -- 1% of the rows are due mail nobody holds (a lost wake-up: sweep_accounts' work);
    -- other pending rows retry in an hour, as the engine leaves them.
    CASE WHEN g % 100 IN (3, 7) THEN now() - interval '1 minute'
         ELSE now() + interval '1 hour' END,
    -- 1% are drains' batches, ten messages a lease, in 100 accounts (5, 15, ... 995):
    -- their leases are over (sweep_messages' work), their accounts hold a slot (what
    -- sweep_accounts sees of the drains running). Each query reads only its own columns,
    -- so one set of rows serves both. The others are looked at by the sweeper at their
    -- deadline, as the engine leaves them.
    CASE WHEN g % 100 = 7 THEN now() - interval '1 minute' - g * interval '1 microsecond'
         ELSE now() + interval '1 day' END,
    CASE WHEN g % 100 = 7 THEN 'dead-' || (g / (100 * :per_lease)) END,
    CASE WHEN g % 100 = 7 THEN now() - interval '1 minute' END,
    CASE WHEN g % 100 = 7 THEN 1 ELSE 0 END, '{}'
FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint)) AS g
"""


def fill(db: Database, total: int, *, per_lease: int = 10) -> None:
    with db.engine.begin() as conn:
        current = conn.execute(text("SELECT count(*) FROM messages")).scalar() or 0
        step = 200_000
        for start in range(current + 1, total + 1, step):
            conn.execute(
                text(FILL),
                {
                    "start": start,
                    "stop": min(total, start + step - 1),
                    "accounts": ACCOUNTS,
                    "due_accounts": DUE_ACCOUNTS,
                    "per_lease": per_lease,
                },
            )
    with db.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE messages")
        )


def _timed(db: Database, run: Callable[[Any], int], *, expect: int, repeats: int) -> list[float]:
    timings = []
    for _ in range(repeats):
        session = db._sessions()
        session.begin()
        started = time.perf_counter()
        found = run(session)
        timings.append((time.perf_counter() - started) * 1000)
        session.rollback()  # every repetition sees the same due rows
        session.close()
        assert found == expect, (found, expect)
    return timings


def time_batches(db: Database, *, batch: int, repeats: int) -> dict[str, list[float]]:
    def messages(session: Any) -> int:
        found, _ = sweep_messages(
            session, now=utcnow(), limit=batch, wake_grace_s=300, backup_enabled=True
        )
        return found.size

    def accounts(session: Any) -> int:
        return len(
            sweep_accounts(session, now=utcnow(), wake_grace_s=300, limit=batch, freed=set())
        )

    return {
        "messages": _timed(db, messages, expect=batch, repeats=repeats),
        "accounts": _timed(db, accounts, expect=min(batch, DUE_ACCOUNTS), repeats=repeats),
    }


def _plan_uses(db: Database, sql: str, index: str) -> bool:
    with db.engine.connect() as conn:
        plan = conn.execute(text("EXPLAIN " + sql)).scalars().all()
    return any(index in line for line in plan)


def measure(
    sizes: list[int],
    *,
    batch: int = 100,
    repeats: int = 7,
    per_lease: int = 10,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Fill a throwaway database to each size in turn and time one batch of each query.
    `per_lease`: messages in each expired lease (a batch of 100 frees 100 / per_lease)."""
    url, drop = create_pg_database()
    try:
        migrate.upgrade(url)
        db = Database(url)
        with db.engine.begin() as conn:
            for statement in FILL_ACCOUNTS.split(";"):
                if statement.strip():
                    conn.execute(text(statement), {"n": ACCOUNTS})
        rows: list[dict[str, Any]] = []
        for size in sorted(sizes):
            t0 = time.perf_counter()
            fill(db, size, per_lease=per_lease)
            fill_s = time.perf_counter() - t0
            timings = time_batches(db, batch=batch, repeats=repeats)
            row: dict[str, Any] = {
                "messages": size,
                "due": size // 100,
                "accounts": ACCOUNTS,
                "due_accounts": DUE_ACCOUNTS,
                "batch": batch,
                "per_lease": per_lease,
                "fill_s": round(fill_s, 1),
            }
            for kind, values in timings.items():
                row[f"sweep_{kind}"] = {
                    "median_ms": round(statistics.median(values), 2),
                    "min_ms": round(min(values), 2),
                    "max_ms": round(max(values), 2),
                }
            row["sweep_messages"]["uses_index"] = _plan_uses(
                db,
                "SELECT id FROM messages WHERE status = 'pending' AND due_at <= now() "
                f"ORDER BY due_at LIMIT {batch} FOR UPDATE SKIP LOCKED",
                "ix_messages_pending_due",
            )
            row["sweep_accounts"]["uses_index"] = _plan_uses(
                db,
                "SELECT 1 FROM messages WHERE account_id = 1 AND status = 'pending' "
                "AND next_attempt_at <= now() AND deadline > now() AND lease_token IS NULL "
                "LIMIT 1",
                "ix_messages_account_next",
            )
            rows.append(row)
            m, a = row["sweep_messages"], row["sweep_accounts"]
            progress(
                f"{size:>10,} messages  {size // 100:>7,} due  batch {batch}: sweep_messages "
                f"median {m['median_ms']:6.2f} ms (min {m['min_ms']:.2f}, max "
                f"{m['max_ms']:.2f}), sweep_accounts median {a['median_ms']:6.2f} ms (min "
                f"{a['min_ms']:.2f}, max {a['max_ms']:.2f}); indexes used: "
                f"{m['uses_index']}/{a['uses_index']}"
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
        help="rows (accounts) per batch: 100 = all that is due at 10k, so every size does "
        "the same work",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--per-lease",
        type=int,
        default=10,
        help="messages in each expired lease: a batch frees batch / per-lease leases, each "
        "with an interrupted attempt to record",
    )
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = measure(
        sizes,
        batch=args.batch,
        repeats=args.repeats,
        per_lease=args.per_lease,
        progress=lambda line: print(line, flush=True),
    )
    for kind in ("sweep_messages", "sweep_accounts"):
        base = rows[0][kind]["median_ms"]
        print(
            f"{kind}: largest/smallest {rows[-1][kind]['median_ms'] / base:.2f}x "
            f"(target: flat, <= 2x; < 50 ms at 1M)"
        )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"sweep": rows, "at": utcnow().isoformat()}, f, indent=2)


if __name__ == "__main__":
    main()
