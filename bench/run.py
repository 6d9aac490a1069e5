"""Outbox's benchmark: fairness between tenants, end to end against the Celery ceiling,
Celery messages and CPU per email, memory, sweep; on one machine, in one run.

    python -m bench.run [--quick] [--json PATH]                       (make bench)

Real processes only: Redis on 127.0.0.1:6379 (database 13, flushed), a throwaway
PostgreSQL database (dropped at the end), two SMTP sinks in their own processes
(`bench.sink`: a fast one, and a slow relay taking 50 ms a message), a task counter
listening to the worker's events (`bench.taskcount`), `outbox worker` and a Celery no-op
worker (`bench.noop_app`) with Outbox's own message settings. Prints each figure, each
target marked PASS/FAIL, and writes bench/results/latest.json (or --json). See
bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import text

from bench.events import events_phase
from bench.harness import (
    LOADAVG,
    LOG_DIR,
    PY,
    RESULTS_DIR,
    CpuMeter,
    Processes,
    Sink,
    TaskCounter,
    cpu_s,
    descendants,
    log,
    tree_rss_mb,
)
from bench.report import TARGETS, table, verdicts
from config.settings import default_concurrency
from standins.services import wait_until

REDIS_DB = int(os.environ.get("OUTBOX_BENCH_REDIS_DB", "13"))

#: Body of every benchmark message: about 2 KB of text, a typical transactional email.
BODY = ("Hello, this is a benchmark message from Outbox. " * 40).strip()
SUBJECT = "Your invoice is ready"
#: What the slow relay takes per message (seconds): `bench.sink --delay`.
SLOW_RELAY_S = 0.05
#: Accounts the end-to-end doors spread their mail over, so drains run side by side.
E2E_ACCOUNTS = 10
#: Calls of the bulk doors (the most `enqueue_many` takes).
BULK_CALL = 1000


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank: a value that occurred (p99 of 60 is the worst)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_s": round(statistics.median(values), 3),
        "p90_s": round(nearest_rank(values, 0.90), 3),
        "p99_s": round(nearest_rank(values, 0.99), 3),
        "max_s": round(max(values), 3),
    }


class Pacer(threading.Thread):
    """Another tenant's steady mail: one `outbox.enqueue` by name every `interval_s`, from
    a bare Celery app of its own (a caller with none of Outbox's code), until stopped or
    `duration_s` is over. Remembers when it sent each (just before `send_task`)."""

    def __init__(
        self,
        broker_url: str,
        account: str,
        *,
        interval_s: float,
        duration_s: float | None = None,
        key_prefix: str,
    ) -> None:
        super().__init__(daemon=True)
        from celery import Celery

        self.app = Celery("bench-pacer", broker=broker_url, set_as_current=False)
        self.account = account
        self.interval_s = interval_s
        self.duration_s = duration_s
        self.key_prefix = key_prefix
        self.sent: dict[str, float] = {}  #: idempotency key -> epoch seconds before the send
        self.last_at = 0.0  #: when the latest was sent
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from worker.contract import ENQUEUE_TASK

        try:
            started = time.monotonic()
            i = 0
            while not self.stopping.is_set():
                due = started + i * self.interval_s
                if self.duration_s is not None and due - started >= self.duration_s:
                    break
                if self.stopping.wait(max(0.0, due - time.monotonic())):
                    break
                key = f"{self.key_prefix}-{i}"
                at = time.time()
                self.app.send_task(
                    ENQUEUE_TASK,
                    kwargs={**request(self.account, f"{key}@example.com"), "idempotency_key": key},
                    kwargsrepr=f"{{'account': {self.account!r}, 'recipients': 1}}",
                )
                self.sent[key] = at
                self.last_at = at
                i += 1
        except BaseException as exc:  # reported by the phase that started it
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        if self.error is not None:
            raise RuntimeError(f"the pacer of {self.account} failed") from self.error


def request(account: str, to: str) -> dict[str, Any]:
    return {"account": account, "to": [to], "subject": SUBJECT, "text": BODY}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Processes()
        self.results: dict[str, Any] = {}
        self.redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
        self.redis = redis.Redis.from_url(self.redis_url)
        self.tmp = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
        self._drops: list[Callable[[], None]] = []
        self.worker: subprocess.Popen[bytes] | None = None

    # -- set-up ----------------------------------------------------------------------

    def setup(self) -> None:
        from standins.services import TEST_SECRET_KEY, create_pg_database

        self.redis.flushdb()
        self.pg_url, drop = create_pg_database()
        self._drops.append(drop)
        self.env = {
            "OUTBOX_DATABASE_URL": self.pg_url,
            "OUTBOX_BROKER_URL": self.redis_url,
            "OUTBOX_RESULT_BACKEND": self.redis_url,
            "OUTBOX_SECRET_KEY": TEST_SECRET_KEY,
            "OUTBOX_LOG_JSON": "0",
            "OUTBOX_VAR_DIR": str(self.tmp / "var"),
        }
        # This process reads Outbox's settings and app too (the Python door, the no-op
        # worker's configuration): same environment.
        os.environ.update(self.env)
        from config.settings import get_settings
        from worker.crypto import SecretBox
        from worker.store import migrate
        from worker.store.db import Database

        get_settings.cache_clear()
        self.settings = get_settings()
        migrate.upgrade(self.pg_url)
        self.db = Database(self.pg_url)
        self.box = SecretBox(self.settings.secret_keys)
        self.sink = Sink(self.procs, "sink")
        self.slow_sink = Sink(self.procs, "sink-slow", delay_s=SLOW_RELAY_S)
        self.counter = TaskCounter(self.procs, self.redis_url)
        self.counter.wait_listening()
        from standins.accounts import make_account

        def account(name: str, sink: Sink, connections: int) -> int:
            return make_account(
                self.db,
                self.box,
                name,
                port=sink.port,
                tls_mode="none",
                max_connections=connections,
            )

        default = self.settings.default_max_connections
        self.args.e2e_connections = self.args.e2e_connections or default
        self.accounts = {
            # The tenant with the backlog, on the slow relay; the two whose mail must not
            # wait behind it or behind a burst; the end-to-end ones.
            "a": account("a", self.slow_sink, default),
            "b": account("b", self.sink, default),
            "c": account("c", self.sink, default),
            **{
                f"e{i}": account(f"e{i}", self.sink, self.args.e2e_connections)
                for i in range(E2E_ACCOUNTS)
            },
        }
        from worker.message import OutgoingEmail, compose

        self.sample = compose(
            OutgoingEmail(
                message_id="<bench-0@bench.example.com>",
                from_addr="Bench <noreply@bench.example.com>",
                to=("user0@example.com",),
                subject=SUBJECT,
                text=BODY,
                date=datetime.now(UTC),
            )
        ).as_bytes()

    def teardown(self) -> None:
        self.procs.stop_all()
        with contextlib.suppress(Exception):
            self.db.dispose()
        for drop in self._drops:
            with contextlib.suppress(Exception):
                drop()
        with contextlib.suppress(Exception):
            self.redis.flushdb()

    def reset_state(self) -> None:
        """Between phases (no worker running): empty tables, empty broker."""
        assert self.worker is None
        with self.db.engine.begin() as conn:
            conn.execute(
                text(
                    "TRUNCATE events, attempts, attachments, incident_notices, incidents, messages"
                )
            )
            conn.execute(text("UPDATE smtp_slots SET holder = NULL, expires_at = NULL"))
            conn.execute(
                text(
                    "UPDATE accounts SET throttle_until = NULL, throttle_level = 0, "
                    "drain_queued_at = NULL, drain_timer_at = NULL"
                )
            )
        with contextlib.suppress(Exception), self.db.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE messages")
            )
        self.redis.flushdb()

    # -- helpers ----------------------------------------------------------------------

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.db.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def epoch(self, sql: str, **params: Any) -> float:
        return float(self.scalar(f"SELECT extract(epoch FROM ({sql}))", **params))

    def max_id(self) -> int:
        return int(self.scalar("SELECT coalesce(max(id), 0) FROM messages"))

    def celery_client(self, name: str) -> Any:
        """A caller with none of Outbox's code: a bare Celery app on the broker."""
        from celery import Celery

        return Celery(name, broker=self.redis_url, set_as_current=False)

    def intake_client(self) -> Any:
        """The Python door, as a service sharing the database uses it."""
        from worker.client import IntakeClient, broker_publisher

        return IntakeClient.from_settings(self.settings, publish=broker_publisher(self.redis_url))

    def e2e_request(self, i: int) -> dict[str, Any]:
        return request(f"e{i % E2E_ACCOUNTS}", f"user{i}@example.com")

    def start_worker(
        self, name: str, *, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`outbox worker` with its defaults but the concurrency (`--concurrency`, by
        default Outbox's own), the log level and ``extra_env``; no beat."""
        argv = [PY, "-m", "worker.cli", "worker", "-c", str(self.args.concurrency)]
        argv += ["--loglevel", "WARNING"]
        self.worker = self.procs.start(name, argv, {**self.env, **(extra_env or {})})
        self.wait_consuming(self.worker, "", 0)
        return self.worker

    def stop_worker(self, *, hard: bool = False) -> None:
        if self.worker is not None:
            if hard:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.worker.pid, signal.SIGKILL)
            self.procs.stop(self.worker, timeout=30.0)
            self.worker = None

    def check_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is not None:
            raise RuntimeError(f"worker exited (code {self.worker.returncode}); see {LOG_DIR}")

    def brpop_clients(self) -> int:
        return sum(
            1
            for c in self.redis.client_list()
            if c.get("db") == str(REDIS_DB) and c.get("cmd") in ("brpop", "blpop")
        )

    def redis_pid(self) -> list[int]:
        return [int(self.redis.info("server")["process_id"])]

    def pg_backends(self) -> list[int]:
        """Server processes of the benchmark's database (the poller's one included)."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            )
            return [r[0] for r in rows]

    def window_meter(self) -> CpuMeter:
        """Every process of the benchmark, for a window whose figure is a latency or a
        rate: the machine's share taken by other work is what it is read against."""
        me = os.getpid()
        worker = self.worker
        return CpuMeter(
            {
                "worker": lambda: [worker.pid, *descendants(worker.pid)] if worker else [],
                "postgres": self.pg_backends,
                "sinks": lambda: [self.sink.proc.pid, self.slow_sink.proc.pid],
                "redis": self.redis_pid,
                "bench": lambda: [me, self.counter.proc.pid],
            }
        )

    def e2e_meter(self, proc: subprocess.Popen[bytes]) -> CpuMeter:
        me = os.getpid()
        return CpuMeter(
            {
                "worker main": lambda: [proc.pid],
                "worker children": lambda: descendants(proc.pid),
                "postgres": self.pg_backends,
                "sink": lambda: [self.sink.proc.pid],
                "redis": self.redis_pid,
                "producer": lambda: [me],
            }
        )

    def wait_consuming(self, proc: subprocess.Popen[bytes], queue: str, backlog: int) -> float:
        """The moment the worker starts taking messages: the queue shrinks (or, with no
        backlog, a client blocks on the queues). Polled every 5 ms."""

        def started() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited early (code {proc.returncode}); see {LOG_DIR}")
            if backlog:
                return self.redis.llen(queue) < backlog
            return self.brpop_clients() > 0

        wait_until(started, timeout=60, interval=0.005, message="the worker to start consuming")
        return time.time()

    def wait_sent(self, total: int, *, since_id: int = 0, account: int | None = None,
                  timeout: float) -> None:  # fmt: skip
        sql = "SELECT count(*) FROM messages WHERE status = 'sent' AND id > :since"
        params: dict[str, Any] = {"since": since_id}
        if account is not None:
            sql += " AND account_id = :account"
            params["account"] = account

        def done() -> bool:
            self.check_worker()
            return bool(self.scalar(sql, **params) >= total)

        try:
            # A quarter second: the figures come from the rows' own times, not from when
            # this poll saw them; polling faster would add its cost to the producer's CPU.
            wait_until(done, timeout=timeout, interval=0.25, message=f"{total} messages sent")
        except TimeoutError:
            raise TimeoutError(
                f"not all messages sent within {timeout:.0f}s: {self.status_counts()}"
            ) from None

    def wait_quiet(self, timeout: float = 60.0) -> None:
        """Until the worker has nothing left to take or finish: the queues and the unacked
        hash are empty and no task event arrived for a second (a drain's last
        continuation, which finds nothing, is still this phase's)."""
        from worker.contract import INTAKE_QUEUE, SEND_QUEUE

        state = {"total": -1, "since": time.monotonic()}

        def quiet() -> bool:
            self.check_worker()
            busy = (
                self.redis.llen(INTAKE_QUEUE)
                or self.redis.llen(SEND_QUEUE)
                or self.redis.hlen("unacked")
            )
            total = self.counter.stats()["total"]
            if busy or total != state["total"]:
                state.update(total=total, since=time.monotonic())
                return False
            return time.monotonic() - state["since"] >= 1.0

        wait_until(quiet, timeout=timeout, interval=0.2, message="the worker to be idle")

    def status_counts(self) -> dict[str, int]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(text("SELECT status, count(*) FROM messages GROUP BY status"))
            return {s: n for s, n in rows}

    def latencies(self, sent: dict[str, float], *, timeout: float) -> list[float]:
        """Seconds from each key's `send_task` to its message's `finished_at` (the
        server's 250 recorded), once all of them are sent."""
        keys = list(sent)
        sql = (
            "SELECT idempotency_key, extract(epoch FROM finished_at) FROM messages "
            "WHERE idempotency_key = ANY(:keys) AND status = 'sent'"
        )

        def rows() -> dict[str, float] | None:
            self.check_worker()
            with self.db.engine.connect() as conn:
                found = {k: float(t) for k, t in conn.execute(text(sql), {"keys": keys})}
            return found if len(found) == len(keys) else None

        found = wait_until(
            rows, timeout=timeout, interval=0.2, message=f"{len(keys)} paced mails sent"
        )
        assert isinstance(found, dict)
        return [found[k] - sent[k] for k in keys]

    # -- 1. ceilings --------------------------------------------------------------------

    def ceiling_smtp(self) -> None:
        n = self.args.smtp_messages
        log(f"ceiling: raw smtplib, {n} messages of {len(self.sample)} bytes on one connection")
        self.sink.stats(reset=True)
        smtp = smtplib.SMTP("127.0.0.1", self.sink.port, local_hostname="bench.local")
        smtp.ehlo()
        meter = self.window_meter()
        meter.start()
        started = time.perf_counter()
        for i in range(n):
            smtp.sendmail("noreply@bench.example.com", [f"user{i}@example.com"], self.sample)
        elapsed = time.perf_counter() - started
        meter.used_s()
        smtp.quit()
        sink = self.sink.stats(reset=True)
        assert sink["messages"] == n, sink
        self.results["ceiling_smtp"] = {
            "messages": n,
            "message_bytes": len(self.sample),
            "seconds": round(elapsed, 3),
            "msgs_per_s": round(n / elapsed, 1),
            "client_ms_per_msg": round(elapsed / n * 1000, 3),
            "sink_tx_median_ms": round(sink["tx_median_ms"], 3),
            "sink": sink,
            "machine": meter.machine,
        }
        log(f"  {n / elapsed:,.0f} msg/s ({elapsed / n * 1000:.2f} ms/msg)")

        # The same messages through Outbox's connection pool (worker.smtp), in this
        # process: what connection reuse costs per message over raw smtplib.
        from worker.smtp import SmtpAccount, SmtpConnectionPool, TlsMode

        log(f"SMTP through SmtpConnectionPool.send: {n} messages, same sink")
        pool = SmtpConnectionPool(
            idle_s=self.settings.drain_seconds + self.settings.smtp_timeout_s,
            max_per_connection=self.settings.smtp_max_per_connection,
        )
        account = SmtpAccount(
            key=f"{self.accounts['b']}:1",
            host="127.0.0.1",
            port=self.sink.port,
            tls=TlsMode.NONE,
            timeout_s=self.settings.smtp_timeout_s,
        )
        meter = self.window_meter()
        meter.start()
        started = time.perf_counter()
        for i in range(n):
            result = pool.send(
                account, "noreply@bench.example.com", [f"user{i}@example.com"], self.sample
            )
            assert result.delivered, result.reply
        elapsed = time.perf_counter() - started
        meter.used_s()
        pool.close()
        sink = self.sink.stats(reset=True)
        self.results["smtp_pool"] = {
            "messages": n,
            "seconds": round(elapsed, 3),
            "msgs_per_s": round(n / elapsed, 1),
            "client_ms_per_msg": round(elapsed / n * 1000, 3),
            "connections": sink["connections"],
            "sink_tx_median_ms": round(sink["tx_median_ms"], 3),
            "sink": sink,
            "machine": meter.machine,
        }
        log(
            f"  {n / elapsed:,.0f} msg/s ({elapsed / n * 1000:.2f} ms/msg, "
            f"{sink['connections']} connections)"
        )

    def celery_conf(self) -> dict[str, Any]:
        """Outbox's own message settings (config/celery.py), for the no-op worker."""
        from config.celery import app

        keys = (
            "worker_prefetch_multiplier",
            "task_acks_late",
            "task_reject_on_worker_lost",
            "worker_eta_task_limit",
            "task_ignore_result",
            "worker_send_task_events",
            "task_send_sent_event",
            "task_serializer",
            "accept_content",
            "worker_enable_soft_shutdown_on_idle",
            "worker_soft_shutdown_timeout",
            "broker_transport_options",
        )
        return {k: app.conf[k] for k in keys}

    def ceiling_celery(self) -> None:
        from bench import noop_app
        from worker.contract import QUEUES, SEND_QUEUE

        n = self.args.noop_tasks
        conf = self.celery_conf()
        log(
            f"ceiling: Celery no-op, {n} tasks, prefork -c {self.args.concurrency}, "
            f"prefetch x{conf['worker_prefetch_multiplier']}"
        )
        assert self.worker is None
        self.redis.flushdb()  # what earlier phases' workers left behind
        client = self.celery_client("bench-noop-client")
        t0 = time.perf_counter()
        # Pre-published in pipelined batches (kombu's Producer.batch): not timed.
        with client.producer_or_acquire() as producer, producer.batch(1000):
            for i in range(n):
                client.send_task("bench.noop", args=(i,), queue=SEND_QUEUE, producer=producer)
        publish_s = time.perf_counter() - t0
        assert self.redis.llen(SEND_QUEUE) == n
        proc = self.procs.start(
            "noop-worker",
            [
                PY, "-m", "celery", "-A", "bench.noop_app", "worker", "-P", "prefork",
                "-c", str(self.args.concurrency), "-E", "-Q", ",".join(QUEUES),
                "--loglevel", "WARNING",
            ],
            {
                "BENCH_BROKER_URL": self.redis_url,
                "BENCH_CELERY_CONF": json.dumps(conf),
                "BENCH_EXPECTED": str(n),
            },
        )  # fmt: skip
        meter = CpuMeter(
            {
                "worker main": lambda: [proc.pid],
                "worker children": lambda: descendants(proc.pid),
                "redis": self.redis_pid,
            }
        )
        try:
            started = self.wait_consuming(proc, SEND_QUEUE, n)
            meter.start()
            finished = float(
                wait_until(
                    lambda: self.redis.get(noop_app.FINISHED_KEY),
                    timeout=max(120, n / 50),
                    interval=0.05,
                    message="the no-op tasks",
                )
            )
            cpu = meter.per_message_ms(n)
        finally:
            self.procs.stop(proc)
        elapsed = finished - started
        self.results["ceiling_celery"] = {
            "tasks": n,
            "seconds": round(elapsed, 3),
            "tasks_per_s": round(n / elapsed, 1),
            "publish_per_s": round(n / publish_s, 1),
            "cpu_ms_per_task": cpu,
            "machine": meter.machine,
            "settings": conf,
        }
        log(f"  {n / elapsed:,.0f} tasks/s (published at {n / publish_s:,.0f}/s)")
        self.redis.flushdb()

    # -- 2. fairness: one tenant's backlog on a slow relay, another's steady mail ----------

    def fairness(self) -> None:
        backlog, seconds = self.args.backlog, self.args.paced_seconds
        a = self.accounts["a"]
        log(
            f"fairness: A {backlog:,} mails (enqueue_many x{BULK_CALL:,}) on a relay taking "
            f"{SLOW_RELAY_S * 1000:.0f} ms a message; B one by name every 0.5 s for {seconds} s"
        )
        self.reset_state()
        self.start_worker("outbox-worker-fairness")
        self.slow_sink.stats(reset=True)
        self.sink.stats(reset=True)
        client = self.intake_client()
        t0 = time.perf_counter()
        for start in range(0, backlog, BULK_CALL):
            results = client.enqueue_many(
                [request("a", f"a{i}@example.com") for i in range(start, start + BULK_CALL)]
            )
            assert all(r.accepted is not None for r in results)
        accept_s = time.perf_counter() - t0
        client.db.dispose()
        log(f"  A's backlog accepted in {accept_s:.1f} s ({backlog / accept_s:,.0f}/s)")
        wait_until(
            lambda: self.slow_sink.stats()["messages"] >= 20, timeout=60, message="A draining"
        )
        self.counter.stats(reset=True)
        pacer = Pacer(self.redis_url, "b", interval_s=0.5, duration_s=seconds, key_prefix="b-fair")
        meter = self.window_meter()
        meter.start()
        window_start = time.time()
        a_before = self.slow_sink.stats()["messages"]
        pacer.start()
        pacer.join(timeout=seconds + 30)
        pacer.stop()
        window_end = time.time()
        meter.used_s()
        a_in_window = self.slow_sink.stats()["messages"] - a_before
        waits = self.latencies(pacer.sent, timeout=60)
        a_sent_db = self.scalar(
            "SELECT count(*) FROM messages WHERE account_id = :a AND status = 'sent' "
            "AND finished_at BETWEEN to_timestamp(:t0) AND to_timestamp(:t1)",
            a=a,
            t0=window_start,
            t1=window_end,
        )
        a_pending = self.scalar(
            "SELECT count(*) FROM messages WHERE account_id = :a AND status = 'pending'", a=a
        )
        tasks = self.counter.stats()
        slow = self.slow_sink.stats()
        fast = self.sink.stats()
        self.stop_worker()
        duration = window_end - window_start
        rate = a_sent_db / duration
        cap = self.settings.default_max_connections / SLOW_RELAY_S
        self.results["fairness"] = {
            "backlog": backlog,
            "backlog_accept_s": round(accept_s, 2),
            "b_interval_s": 0.5,
            "window_s": round(duration, 2),
            "b_latency": spread(waits),
            "b_latencies_s": [round(w, 3) for w in waits],
            "a_sent_in_window": a_sent_db,
            "a_sink_messages_in_window": a_in_window,
            "a_msgs_per_s": round(rate, 1),
            "a_ceiling_msgs_per_s": round(cap, 1),
            "a_pending_after": a_pending,
            "a_max_connections": self.settings.default_max_connections,
            "a_peak_connections": slow["max_open_connections"],
            "b_max_connections": self.settings.default_max_connections,
            "b_sink_messages": fast["messages"],
            "slow_relay_s": SLOW_RELAY_S,
            "tasks_in_window": tasks,
            "concurrency": self.args.concurrency,
            "machine": meter.machine,
        }
        log(
            f"  B: p50 {statistics.median(waits):.2f} s, p99 {nearest_rank(waits, 0.99):.2f} s, "
            f"max {max(waits):.2f} s ({len(waits)} mails); A: {rate:.1f} msg/s "
            f"({rate / cap:.0%} of {cap:.0f}), peak {slow['max_open_connections']} connections, "
            f"{a_pending:,} still pending"
        )

    # -- 3. an intake burst: what 5,000 single enqueues by name cost another tenant -------

    def burst(self) -> None:
        from worker.contract import ENQUEUE_TASK

        n = self.args.burst
        c = self.accounts["c"]
        log(f"burst: {n:,} single outbox.enqueue by name for C while B sends one every 0.5 s")
        self.reset_state()
        self.start_worker("outbox-worker-burst")
        # Warm up: every child takes an intake task and a drain, so "before the burst"
        # is the steady state, not a cold start.
        warm = self.celery_client("bench-warm")
        for i in range(4 * self.args.concurrency):
            warm.send_task(
                ENQUEUE_TASK,
                kwargs=request("c" if i % 2 else "b", f"warm{i}@example.com"),
                kwargsrepr="{'account': 'c', 'recipients': 1}",
            )
        self.wait_sent(4 * self.args.concurrency, timeout=60)
        self.wait_quiet()
        pacer = Pacer(self.redis_url, "b", interval_s=0.5, key_prefix="b-burst")
        pacer.start()
        # B's first mails show the tenant's latency before the burst.
        wait_until(lambda: len(pacer.sent) >= 5, timeout=30, message="B's first mails")
        client = self.celery_client("bench-burst")
        since = self.max_id()
        self.counter.stats(reset=True)
        meter = self.window_meter()
        meter.start()
        burst_start = time.time()
        with client.producer_or_acquire() as producer:
            for i in range(n):
                client.send_task(
                    ENQUEUE_TASK,
                    kwargs=request("c", f"c{i}@example.com"),
                    kwargsrepr="{'account': 'c', 'recipients': 1}",
                    producer=producer,
                )
        published = time.time()
        try:
            wait_until(
                lambda: self.scalar(
                    "SELECT count(*) FROM messages WHERE account_id = :c AND id > :s",
                    c=c, s=since,
                ) >= n,
                timeout=max(120, n / 10),
                interval=0.1,
                message=f"C's {n:,} mails stored",
            )  # fmt: skip
            stored = self.epoch(
                "SELECT max(created_at) FROM messages WHERE account_id = :c AND id > :s",
                c=c,
                s=since,
            )
            self.wait_sent(n, since_id=since, account=c, timeout=max(120, n / 10))
            sent = self.epoch(
                "SELECT max(finished_at) FROM messages WHERE account_id = :c AND id > :s",
                c=c,
                s=since,
            )
            meter.used_s()
            # B keeps sending a little after the burst: its latency once it is over.
            after = time.time()
            wait_until(lambda: pacer.last_at > after + 2.0, timeout=30, message="B after")
        finally:
            pacer.stop()
        tasks = self.counter.stats()
        waits = dict(zip(pacer.sent, self.latencies(pacer.sent, timeout=120), strict=True))
        phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
        for key, at in pacer.sent.items():
            phase = "before" if at < burst_start else "during" if at <= stored else "after"
            phases[phase].append(waits[key])
        self.stop_worker()
        self.results["burst"] = {
            "messages": n,
            "publish_s": round(published - burst_start, 2),
            "all_stored_after_s": round(stored - burst_start, 2),
            "all_sent_after_s": round(sent - burst_start, 2),
            "intake_msgs_per_s": round(n / (stored - burst_start), 1),
            "b_latency": {k: spread(v) for k, v in phases.items() if v},
            "tasks": tasks,
            "concurrency": self.args.concurrency,
            "machine": meter.machine,
        }
        during = phases["during"]
        log(
            f"  C's {n:,} stored after {stored - burst_start:.1f} s, sent after "
            f"{sent - burst_start:.1f} s; B during the burst: p50 "
            f"{statistics.median(during):.2f} s, p99 {nearest_rank(during, 0.99):.2f} s "
            f"({len(during)} mails); before {statistics.median(phases['before']):.2f} s"
        )

    # -- 4. end to end, each door, against the no-op ceiling --------------------------------

    def e2e(self) -> None:
        n = self.args.messages
        log(
            f"end to end: {n:,} mails a door over {E2E_ACCOUNTS} accounts on the fast sink "
            f"(max_connections {self.args.e2e_connections} each), worker -c "
            f"{self.args.concurrency}"
        )
        self.reset_state()
        proc = self.start_worker("outbox-worker-e2e")
        client = self.intake_client()
        # Warm up: every child builds its runtime and its connections; the client too.
        warm = client.enqueue_many([self.e2e_request(i) for i in range(20 * E2E_ACCOUNTS)])
        assert all(r.accepted is not None for r in warm)
        self.wait_sent(len(warm), timeout=60)
        by_name = self.celery_client("bench-e2e")
        from worker.contract import ENQUEUE_MANY_TASK, ENQUEUE_TASK

        def python_many() -> None:
            for start in range(0, n, BULK_CALL):
                stop = min(n, start + BULK_CALL)
                client.enqueue_many([self.e2e_request(i) for i in range(start, stop)])

        def python_one() -> None:
            for i in range(n):
                client.enqueue(**self.e2e_request(i))

        def by_name_many() -> None:
            with by_name.producer_or_acquire() as producer:
                for start in range(0, n, BULK_CALL):
                    stop = min(n, start + BULK_CALL)
                    by_name.send_task(
                        ENQUEUE_MANY_TASK,
                        kwargs={"requests": [self.e2e_request(i) for i in range(start, stop)]},
                        kwargsrepr=f"{{'requests': {stop - start}}}",
                        producer=producer,
                    )

        def by_name_one() -> None:
            # One publish a mail, as many independent callers would (not pipelined).
            with by_name.producer_or_acquire() as producer:
                for i in range(n):
                    by_name.send_task(
                        ENQUEUE_TASK,
                        kwargs=self.e2e_request(i),
                        kwargsrepr="{'account': 'e', 'recipients': 1}",
                        producer=producer,
                    )

        doors: list[tuple[str, str, Callable[[], None]]] = [
            ("e2e_python_many", "Python door, IntakeClient.enqueue_many", python_many),
            ("e2e_python_one", "Python door, IntakeClient.enqueue", python_one),
            ("e2e_by_name_many", "outbox.enqueue_many by name", by_name_many),
            ("e2e_by_name_one", "outbox.enqueue by name", by_name_one),
        ]
        for key, label, send in doors:
            self.wait_quiet()
            since = self.max_id()
            self.sink.stats(reset=True)
            self.counter.stats(reset=True)
            meter = self.e2e_meter(proc)
            log(f"  {label}: {n:,} mails")
            meter.start()
            started = time.time()
            send()
            called = time.time()
            self.wait_sent(n, since_id=since, timeout=max(180, n / 10))
            cpu = meter.per_message_ms(n)
            self.wait_quiet()
            tasks = self.counter.stats()
            finished = self.epoch("SELECT max(finished_at) FROM messages WHERE id > :s", s=since)
            stored = self.epoch("SELECT max(created_at) FROM messages WHERE id > :s", s=since)
            elapsed = finished - started
            figures = self._e2e_figures(n, elapsed, since_id=since)
            figures.update(
                {
                    "label": label,
                    "calls_s": round(called - started, 3),
                    "all_stored_after_s": round(stored - started, 3),
                    "cpu_ms_per_message": cpu,
                    "tasks": tasks,
                    "tasks_per_message": round(tasks["total"] / n, 4),
                    "machine": meter.machine,
                }
            )
            self.results[key] = figures
            log(
                f"    {n / elapsed:,.0f} msg/s ({elapsed:.1f} s first call to last sent; "
                f"stored after {stored - started:.1f} s); {tasks['total'] / n:.3f} Celery "
                f"messages a mail {tasks['received']}"
            )
        client.db.dispose()
        self.stop_worker()
        self.results["e2e_setup"] = {
            "accounts": E2E_ACCOUNTS,
            "max_connections": self.args.e2e_connections,
            "concurrency": self.args.concurrency,
            "drain_batch": self.settings.drain_batch,
            "drain_seconds": self.settings.drain_seconds,
        }

    def _e2e_figures(self, n: int, elapsed: float, *, since_id: int) -> dict[str, Any]:
        with self.db.engine.connect() as conn:
            durations = [
                float(r[0]) * 1000
                for r in conn.execute(
                    text(
                        "SELECT extract(epoch FROM a.finished_at - a.started_at) FROM attempts a "
                        "WHERE a.message_id > :since AND a.outcome = 'sent'"
                    ),
                    {"since": since_id},
                )
            ]
            attempts = conn.execute(
                text("SELECT count(*) FROM attempts WHERE message_id > :s"), {"s": since_id}
            ).scalar()
        sink = self.sink.stats(reset=True)
        return {
            "messages": n,
            "seconds": round(elapsed, 3),
            "msgs_per_s": round(n / elapsed, 1),
            "attempts": attempts,
            "attempt_median_ms": round(statistics.median(durations), 3),
            "attempt_p90_ms": round(nearest_rank(durations, 0.9), 3),
            "smtp_connections": sink["connections"],
            "msgs_per_connection": round(sink["messages"] / max(1, sink["connections"]), 1),
            "sink_tx_median_ms": round(sink["tx_median_ms"], 3),
            "sink": sink,
        }

    # -- 5. memory --------------------------------------------------------------------------

    def memory_snapshot(self) -> dict[str, Any]:
        from worker.contract import RETRY_QUEUE

        assert self.worker is not None
        info = self.redis.info("memory")
        return {
            "worker": tree_rss_mb(self.worker.pid),
            "redis_used_mb": round(info["used_memory"] / 2**20, 1),
            "unacked": self.redis.hlen("unacked"),
            "retry_queue": self.redis.llen(RETRY_QUEUE),
        }

    def settle(self) -> None:
        """Let the worker's processes finish what they were doing and free it: idle, then
        a moment for the allocator (RSS is read, not a heap count)."""
        self.wait_quiet()
        time.sleep(2.0)

    def memory(self) -> None:
        from worker.contract import MAINTENANCE_QUEUE, SWEEP_TASK

        n = self.args.deferred
        ids = [self.accounts[f"e{i}"] for i in range(E2E_ACCOUNTS)]
        log(f"memory: worker idle, then with {n:,} deferred mails of {len(ids)} accounts")
        self.reset_state()
        self.start_worker("outbox-worker-memory")
        # Warm up: every child builds its runtime (engine, pools, SMTP connections).
        client = self.intake_client()
        client.enqueue_many([self.e2e_request(i) for i in range(20 * E2E_ACCOUNTS)])
        client.db.dispose()
        self.wait_sent(20 * E2E_ACCOUNTS, timeout=60)
        self.settle()
        idle = self.memory_snapshot()
        log(f"  idle: worker {idle['worker']['total_mb']} MB, redis {idle['redis_used_mb']} MB")

        # A: retries further off than OUTBOX_COUNTDOWN_MAX are parked in the database:
        # nothing in the broker. A sweep runs over them (nothing is due, nothing is read).
        with self.db.engine.begin() as conn:
            conn.execute(text(DEFERRED_FILL), {"accounts": ids, "n": n})
        with contextlib.suppress(Exception), self.db.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE messages")
            )
        self.counter.stats(reset=True)
        self.celery_client("bench-sweep").send_task(SWEEP_TASK, queue=MAINTENANCE_QUEUE)
        wait_until(
            lambda: self.counter.stats()["succeeded"].get("all", 0) >= 1,
            timeout=60,
            message="the sweep",
        )
        self.settle()
        parked = self.memory_snapshot()
        log(
            f"  {n:,} parked in the database: worker {parked['worker']['total_mb']} MB, "
            f"redis {parked['redis_used_mb']} MB, unacked {parked['unacked']}"
        )

        # B: the same mail due within OUTBOX_COUNTDOWN_MAX. Each account is woken once,
        # as intake or the sweeper wakes it; its drain finds nothing due yet and leaves
        # one countdown for the account's earliest mail (drain_timer_at): the broker and
        # the worker hold one wake-up per account, not one per mail.
        countdown_max = self.settings.countdown_max_s
        with self.db.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE messages SET next_attempt_at = now() + make_interval(secs => "
                    ":c * (0.8 + 0.2 * (id % 100) / 100.0)) WHERE status = 'pending'"
                ),
                {"c": countdown_max},
            )
        from worker.client import broker_publisher

        publish = broker_publisher(self.redis_url)
        self.counter.stats(reset=True)
        for account_id in ids:
            publish(account_id, None)
        wait_until(
            lambda: self.redis.hlen("unacked") >= len(ids),
            timeout=60,
            interval=0.2,
            message="one countdown per account held by the worker",
        )
        self.settle_countdowns(len(ids))
        countdowns = self.memory_snapshot()
        tasks = self.counter.stats()
        log(
            f"  {n:,} due within {countdown_max:.0f} s: worker "
            f"{countdowns['worker']['total_mb']} MB, redis {countdowns['redis_used_mb']} MB, "
            f"countdowns held {countdowns['unacked']}, waiting in Redis "
            f"{countdowns['retry_queue']:,}; tasks {tasks['received']}"
        )
        self.results["memory"] = {
            "deferred": n,
            "accounts": len(ids),
            "idle": idle,
            "parked_in_db": parked,
            "due_soon": countdowns,
            "due_soon_tasks": tasks,
            "growth_parked_mb": round(parked["worker"]["total_mb"] - idle["worker"]["total_mb"], 1),
            "growth_due_soon_mb": round(
                countdowns["worker"]["total_mb"] - idle["worker"]["total_mb"], 1
            ),
        }
        # Stop hard: the held countdowns are thrown away with the Redis database anyway.
        self.stop_worker(hard=True)

    def settle_countdowns(self, expect: int) -> None:
        """The wake-ups ran (each left its countdown, held unacked): nothing else moves."""
        from worker.contract import SEND_QUEUE

        state = {"total": -1, "since": time.monotonic()}

        def still() -> bool:
            self.check_worker()
            total = self.counter.stats()["succeeded"].get("all", 0)
            if self.redis.llen(SEND_QUEUE) or total != state["total"] or total < expect:
                state.update(total=total, since=time.monotonic())
                return False
            return time.monotonic() - state["since"] >= 2.0

        wait_until(still, timeout=60, interval=0.2, message="the wake-ups to settle")

    # -- 6. sweep --------------------------------------------------------------------------

    def sweep(self) -> None:
        from bench.sweep import measure

        sizes = self.args.sweep_sizes
        log(f"sweep: one batch of each query on {', '.join(f'{s:,}' for s in sizes)} messages")
        rows = measure(sizes, batch=100, repeats=7, progress=lambda r: log("  " + r))
        self.results["sweep"] = rows

    # -- run -------------------------------------------------------------------------------

    #: The no-op ceiling runs right before the doors it is compared with: the machine is
    #: shared, and its load drifts over a run.
    PHASES = ("smtp", "fairness", "burst", "noop", "e2e", "events", "memory", "sweep")

    def run(self) -> None:
        self.setup()
        steps = {
            "smtp": self.ceiling_smtp,
            "noop": self.ceiling_celery,
            "fairness": self.fairness,
            "burst": self.burst,
            "e2e": self.e2e,
            "events": lambda: events_phase(self),
            "memory": self.memory,
            "sweep": self.sweep,
        }
        for phase in self.PHASES:
            if phase in self.args.only:
                steps[phase]()


DEFERRED_FILL = """
INSERT INTO messages (account_id, message_id_header, from_addr, to_addrs, cc_addrs,
    bcc_addrs, subject, text_body, headers, attachment_count, size_bytes, status, priority,
    created_at, updated_at, deadline, next_attempt_at, due_at, attempt_count, delivered_to,
    last_verdict, last_code, last_error)
SELECT (CAST(:accounts AS bigint[]))[1 + g % cardinality(CAST(:accounts AS bigint[]))],
    '<deferred-' || g || '@bench.example.com>', 'noreply@bench.example.com',
    CAST('["user' || g || '@example.com"]' AS json), '[]', '[]', 'Your invoice is ready',
    repeat('Hello, this is a benchmark message from Outbox. ', 40), '[]', 0, 2000, 'pending',
    1, now(), now(), now() + interval '1 day', now() + interval '1 hour',
    now() + interval '1 day', 1, '{}', 'retry', 451, '451 4.7.1 Greylisted, try again later'
FROM generate_series(1, CAST(:n AS bigint)) AS g
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--messages", type=int, default=None, help="end-to-end mails a door")
    parser.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=default_concurrency(),
        help="worker processes, the same for the no-op and Outbox's worker "
        "(default: Outbox's own, OUTBOX_CONCURRENCY's default of two per core)",
    )
    parser.add_argument(
        "--e2e-connections",
        type=int,
        default=None,
        help="max_connections of each end-to-end account (default: Outbox's default, 2)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="where to write JSON")
    parser.add_argument(
        "--only",
        default=",".join(Bench.PHASES),
        help=f"run only these phases, comma-separated, of: {', '.join(Bench.PHASES)} "
        "(targets whose figures were not measured are left out; for development)",
    )
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.only) - set(Bench.PHASES))
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(unknown)}")
    if args.quick:
        args.messages = args.messages or 1000
        args.smtp_messages, args.noop_tasks, args.deferred = 1000, 1000, 10_000
        args.backlog, args.paced_seconds, args.burst = 3000, 10, 1000
        args.sweep_sizes = [10_000, 100_000]
    else:
        args.messages = args.messages or 5000
        args.smtp_messages, args.noop_tasks, args.deferred = 3000, 5000, 100_000
        args.backlog, args.paced_seconds, args.burst = 20_000, 30, 5000
        args.sweep_sizes = [10_000, 100_000, 1_000_000]
    complete = list(args.only) == list(Bench.PHASES)
    default_json = RESULTS_DIR / ("latest.json" if complete else "partial.json")
    json_path = Path(args.json_path) if args.json_path else default_json

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    me = os.getpid()
    cpu_before = cpu_s(me)
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        bench.teardown()
    r = bench.results
    r["meta"] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runtime_s": round(time.monotonic() - started, 1),
        "bench_cpu_s": round(cpu_s(me) - cpu_before, 1),
        "args": {k: v for k, v in vars(args).items() if k != "json_path"},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_end": os.getloadavg(),
            "load1_per_phase": LOADAVG,
        },
        "redis_db": REDIS_DB,
        "targets": TARGETS,
    }
    r["targets"] = verdicts(r)
    print(table(r))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(r, indent=2, default=str) + "\n")
    print(f"\nJSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
