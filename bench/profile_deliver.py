"""What a drain costs, in process: `DeliveryEngine.drain` in a loop, no Celery.

    python -m bench.profile_deliver [--messages 2000] [--batch 50] [--profile text|html|none]

Against a throwaway PostgreSQL database and the `bench.sink` SMTP sink (its own
process), with the engine built exactly as a worker child builds it
(`tasks.runtime.Runtime`), one account. The mail is stored first (no wake-ups), then the
account is drained until nothing is left: each drain sends up to `--batch` messages
(OUTBOX_DRAIN_BATCH; `--batch 1` is an account whose mail trickles in, one drain a mail).
Reports per mail and per drain: SQL statements (by kind), transactions, pool checkouts,
pings of idle connections, SMTP connections, where the time goes; then, with --profile, a
pyinstrument profile of the loop.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from sqlalchemy import event


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pg_backends(url: str) -> list[int]:
    """The server processes serving this database (asked on a separate connection)."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
    return [r[0] for r in rows]


def _sink_stats(port: int, *, reset: bool = False) -> dict[str, Any]:
    import json
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"RESET\n" if reset else b"STATS\n")
        return dict(json.loads(s.makefile().readline()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=None, help="OUTBOX_DRAIN_BATCH (50)")
    parser.add_argument("--profile", choices=("text", "html", "none"), default="text")
    parser.add_argument("--show-sql", action="store_true", help="print each distinct statement")
    args = parser.parse_args()

    from standins.services import TEST_SECRET_KEY, create_pg_database

    url, drop = create_pg_database()
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.sink"], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert sink.stdout is not None
        line = sink.stdout.readline().decode()
        ports = dict(p.split("=") for p in line.split()[1:])
        port, control = int(ports["smtp"]), int(ports["control"])
        os.environ.update(
            {
                "OUTBOX_DATABASE_URL": url,
                "OUTBOX_BROKER_URL": "redis://127.0.0.1:6379/13",
                "OUTBOX_SECRET_KEY": TEST_SECRET_KEY,
            }
        )
        if args.batch:
            os.environ["OUTBOX_DRAIN_BATCH"] = str(args.batch)
        from config.settings import get_settings
        from standins.accounts import make_account
        from tasks.runtime import Runtime
        from worker.client import IntakeClient
        from worker.intake import Limits
        from worker.store import migrate

        get_settings.cache_clear()
        settings = get_settings()
        migrate.upgrade(url)
        rt = Runtime(settings)
        account_id = make_account(
            rt.db, rt.box, "bench", port=port, tls_mode="none", max_connections=2
        )
        client = IntakeClient(
            rt.db, limits=Limits(), window_s=settings.retry_window_s, wakeups=None
        )
        n = args.messages
        warm = 100
        requests = [
            {
                "account": "bench",
                "to": [f"user{i}@example.com"],
                "subject": "Your invoice is ready",
                "text": ("Hello, this is a benchmark message from Outbox. " * 40).strip(),
            }
            for i in range(warm + n)
        ]
        for start in range(0, len(requests), 1000):
            client.enqueue_many(requests[start : start + 1000])
        engine = rt.engine

        def drain_all(limit: int) -> tuple[int, collections.Counter[str], list[float]]:
            """Drain until `limit` mails went out; returns drains, outcomes, wall per drain."""
            done, drains = 0, 0
            outcomes: collections.Counter[str] = collections.Counter()
            walls: list[float] = []
            while done < limit:
                t0 = time.perf_counter()
                outcome = engine.drain(account_id)
                walls.append(time.perf_counter() - t0)
                drains += 1
                if outcome.skipped:
                    outcomes[f"skipped: {outcome.skipped}"] += 1
                    continue
                outcomes["sent"] += outcome.sent
                outcomes["failed"] += outcome.failed
                outcomes["deferred"] += outcome.deferred
                done += outcome.attempts
                if not outcome.attempts:
                    break
            return drains, outcomes, walls

        # Warm up: first connection, caches, statement compilation.
        drain_all(warm)

        # -- counters -------------------------------------------------------------------
        statements: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()

        @event.listens_for(rt.db.engine, "before_cursor_execute")
        def _stmt(conn: Any, cursor: Any, stmt: str, params: Any, ctx: Any, many: bool) -> None:
            counts["statements"] += 1
            statements[" ".join(stmt.split())[: 400 if args.show_sql else 110]] += 1

        @event.listens_for(rt.db.engine, "begin")
        def _begin(conn: Any) -> None:
            # A single-statement session runs in autocommit: no BEGIN/COMMIT is sent.
            if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                counts["transactions"] += 1

        @event.listens_for(rt.db.engine, "savepoint")
        def _savepoint(conn: Any, name: Any) -> None:
            counts["savepoints"] += 1

        @event.listens_for(rt.db.engine.pool, "checkout")
        def _checkout(*_: Any) -> None:
            counts["pool checkouts"] += 1

        real_ping = rt.db.engine.dialect.do_ping

        def counted_ping(dbapi_conn: Any) -> bool:
            counts["pings"] += 1
            return real_ping(dbapi_conn)

        rt.db.engine.dialect.do_ping = counted_ping  # type: ignore[method-assign]

        smtp_s: list[float] = []
        real_send = rt.pool.send

        def timed_send(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            result = real_send(*a, **kw)
            smtp_s.append(time.perf_counter() - t)
            return result

        rt.pool.send = timed_send  # type: ignore[method-assign]
        _sink_stats(control, reset=True)

        profiler = None
        if args.profile != "none":
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
        others = {"sink": [sink.pid], "postgres": _pg_backends(url)}
        others_before = {k: sum(_cpu_s(p) for p in v) for k, v in others.items()}
        t_all = time.perf_counter()
        cpu_all = time.process_time()
        drains, outcomes, walls = drain_all(n)
        elapsed = time.perf_counter() - t_all
        cpu = time.process_time() - cpu_all
        others_cpu = {k: sum(_cpu_s(p) for p in v) - others_before[k] for k, v in others.items()}
        if profiler is not None:
            profiler.stop()

        mails = outcomes["sent"] + outcomes["failed"] + outcomes["deferred"]
        print(
            f"\n{mails} mails in {drains} drains (batch {settings.drain_batch}, "
            f"{settings.drain_seconds:g} s) in process: {mails / elapsed:,.0f} mail/s, "
            f"outcomes {dict(outcomes)}"
        )
        print(
            f"per mail: {elapsed / mails * 1000:.3f} ms wall, {cpu / mails * 1000:.3f} ms CPU "
            f"in this process; per drain: {statistics.median(walls) * 1000:.3f} ms wall median"
        )
        print(
            "  CPU per mail: "
            + ", ".join(
                f"{k} {v / mails * 1000:.3f} ms"
                for k, v in {"this process": cpu, **others_cpu}.items()
            )
            + f" = {(cpu + sum(others_cpu.values())) / mails * 1000:.3f} ms in all"
        )
        sink_stats = _sink_stats(control)
        print(
            f"  sink: {sink_stats['messages']} messages on {sink_stats['connections']} "
            f"connection(s), MAIL->DATA {sink_stats['tx_median_ms']:.3f} ms median; "
            f"pool.send {statistics.median(smtp_s) * 1000:.3f} ms median, "
            f"{sum(smtp_s) / elapsed:.0%} of the wall time"
        )
        print("\nper mail / per drain:")
        for key, value in sorted(counts.items()):
            print(f"  {key:<22} {value / mails:6.2f} {value / drains:7.2f}")
        trips = counts["statements"] + 2 * counts["transactions"] + counts["pings"]
        print(
            f"  round trips (approx.)  {trips / mails:6.2f} {trips / drains:7.2f}"
            "  (statements + BEGIN/COMMIT per transaction + pings)"
        )
        print("\nstatements per drain:")
        for stmt, c in statements.most_common():
            print(f"  {c / drains:6.2f}  {stmt}")
        if profiler is not None:
            if args.profile == "html":
                path = "bench/results/profile_deliver.html"
                os.makedirs("bench/results", exist_ok=True)
                with open(path, "w") as f:
                    f.write(profiler.output_html())
                print(f"\nprofile: {path}")
            else:
                print(profiler.output_text(unicode=True, color=False, show_all=False))
        rt.close()
    finally:
        sink.terminate()
        sink.wait(timeout=10)
        drop()


if __name__ == "__main__":
    main()
