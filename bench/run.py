"""Outbox's benchmark: ceilings, end to end, memory, sweep and intake, on one machine.

    python -m bench.run [--messages 5000] [--quick] [--json PATH]      (make bench)

Real processes only: Redis on 127.0.0.1:6379 (database 13, flushed), a throwaway
PostgreSQL database (dropped at the end), an SMTP sink in its own process
(`bench.sink`), `outbox worker -c N` and a Celery no-op worker (`bench.noop_app`) with
Outbox's own message settings. Prints a table with each target marked PASS/FAIL and
writes the figures to bench/results/latest.json (or --json). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import text

from config.settings import default_concurrency
from standins.services import wait_until

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
LOG_DIR = RESULTS_DIR / "logs"
REDIS_DB = int(os.environ.get("OUTBOX_BENCH_REDIS_DB", "13"))
PY = sys.executable

#: Body of every benchmark message: about 2 KB of text, a typical transactional email.
BODY = ("Hello, this is a benchmark message from Outbox. " * 40).strip()
SUBJECT = "Your invoice is ready"

TARGETS = {
    "e2e_vs_noop": 0.50,  # end to end >= 50% of the Celery no-op drain rate
    "smtp_vs_raw": 1.5,  # SMTP cost per message with reuse <= 1.5x raw smtplib
    "memory_mb": 50.0,  # worker RSS with 100k deferred <= idle + 50 MB
    "sweep_ms": 50.0,  # one sweep batch at 1M < 50 ms
    "sweep_ratio": 2.0,  # ... and within 2x of its time at 10k
}


LOADAVG: list[tuple[str, float]] = []


def log(msg: str) -> None:
    load = os.getloadavg()[0]
    if not msg.startswith(" "):
        LOADAVG.append((msg.split(":")[0], load))
    print(f"[{time.strftime('%H:%M:%S')} load {load:4.1f}] {msg}", flush=True)


# -- processes ---------------------------------------------------------------------------


class Processes:
    """Every process the benchmark starts, each in its own group; all stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        if "stdout" not in kw:
            kw["stdout"] = open(LOG_DIR / f"{name}.log", "ab")  # noqa: SIM115 - closed on stop
            kw["stderr"] = subprocess.STDOUT
        proc = subprocess.Popen(
            argv, cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True, **kw
        )
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Children of a worker that outlived their parent (same group): make sure.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=15.0)


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = [int(p) for p in out.split()]
    return kids + [d for k in kids for d in descendants(k)]


def tree_rss_mb(pid: int) -> dict[str, Any]:
    kids = descendants(pid)
    main = rss_kb(pid)
    children = [rss_kb(k) for k in kids]
    return {
        "total_mb": round((main + sum(children)) / 1024, 1),
        "main_mb": round(main / 1024, 1),
        "children_mb": [round(c / 1024, 1) for c in children],
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by groups of processes during a timed window, per message.

    Each group is a function listing its pids now; a process that appears during the
    window (a database connection opened lazily) counts from zero. This is what says
    where a message's cost goes: the worker, PostgreSQL, the SMTP sink, Redis.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.before: dict[str, dict[int, float]] = {}

    def start(self) -> None:
        self.before = {
            name: {pid: cpu_s(pid) for pid in pids()} for name, pids in self.groups.items()
        }

    def per_message_ms(self, messages: int) -> dict[str, float]:
        used: dict[str, float] = {}
        for name, pids in self.groups.items():
            seen = self.before[name]
            now = {pid: cpu_s(pid) for pid in {*seen, *pids()}}
            used[name] = sum(now[pid] - seen.get(pid, 0.0) for pid in now)
        out = {name: round(v / messages * 1000, 3) for name, v in used.items()}
        out["total"] = round(sum(used.values()) / messages * 1000, 3)
        return out


# -- the SMTP sink -----------------------------------------------------------------------


class Sink:
    def __init__(self, procs: Processes) -> None:
        self.proc = procs.start(
            "sink", [PY, "-m", "bench.sink"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            raise RuntimeError(f"the SMTP sink did not start: {line!r}")
        fields = dict(part.split("=") for part in line.split()[1:])
        self.port = int(fields["smtp"])
        self.control = int(fields["control"])

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        with socket.create_connection(("127.0.0.1", self.control), timeout=10) as s:
            s.sendall(b"RESET\n" if reset else b"STATS\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)


# -- the benchmark ----------------------------------------------------------------------


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
        # This process reads Outbox's settings and app too (the client, the ETA
        # publisher, the no-op worker's configuration): same environment.
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
        self.sink = Sink(self.procs)
        from tests.support.outbox import make_account

        self.account_id = make_account(
            self.db,
            self.box,
            "bench",
            port=self.sink.port,
            tls_mode="none",
            # One connection per worker process: the sink takes any number, and a lower
            # cap would measure messages waiting for a free slot, not delivery.
            max_connections=self.args.concurrency,
        )
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
            conn.execute(text("TRUNCATE attempts, attachments, incidents, messages"))
            conn.execute(text("UPDATE smtp_slots SET holder = NULL, expires_at = NULL"))
            conn.execute(text("UPDATE accounts SET throttle_until = NULL, throttle_level = 0"))
        self.redis.flushdb()

    # -- helpers ----------------------------------------------------------------------

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.db.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def request(self, i: int) -> dict[str, Any]:
        return {
            "account": "bench",
            "to": [f"user{i}@example.com"],
            "subject": SUBJECT,
            "text": BODY,
        }

    def publish_enqueues(self, client: Any, n: int, *, batched: bool) -> float:
        """Publish n `outbox.enqueue` by name, as another service would; returns the
        seconds it took. `batched`: pipelined in groups of 1,000 (kombu's
        Producer.batch), for a backlog published before any worker runs."""
        from worker.contract import ENQUEUE_TASK

        t0 = time.perf_counter()
        with (
            client.producer_or_acquire() as producer,
            producer.batch(1000) if batched else contextlib.nullcontext(),
        ):
            for i in range(n):
                client.send_task(
                    ENQUEUE_TASK,
                    kwargs=self.request(i),
                    kwargsrepr="{'account': 'bench', 'recipients': 1}",
                    producer=producer,
                )
        return time.perf_counter() - t0

    def start_worker(self, name: str, *, queues: str | None = None) -> subprocess.Popen[bytes]:
        argv = [PY, "-m", "worker.cli", "worker", "-c", str(self.args.concurrency)]
        argv += ["--loglevel", "WARNING"]
        if queues:
            argv += ["-Q", queues]
        self.worker = self.procs.start(name, argv, self.env)
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.procs.stop(self.worker, timeout=30.0)
            self.worker = None

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

    def e2e_meter(self, proc: subprocess.Popen[bytes]) -> CpuMeter:
        return CpuMeter(
            {
                "worker main": lambda: [proc.pid],
                "worker children": lambda: descendants(proc.pid),
                "postgres": self.pg_backends,
                "sink": lambda: [self.sink.proc.pid],
                "redis": self.redis_pid,
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

    def wait_sent(self, total: int, *, since_id: int = 0, timeout: float) -> None:
        def done() -> bool:
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"worker exited (code {self.worker.returncode}); see {LOG_DIR}")
            return (
                self.scalar(
                    "SELECT count(*) FROM messages WHERE status = 'sent' AND id > :since",
                    since=since_id,
                )
                >= total
            )

        try:
            wait_until(done, timeout=timeout, interval=0.1, message=f"{total} messages to be sent")
        except TimeoutError:
            counts = self.status_counts()
            raise TimeoutError(f"not all messages sent within {timeout:.0f}s: {counts}") from None

    def status_counts(self) -> dict[str, int]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(text("SELECT status, count(*) FROM messages GROUP BY status"))
            return {s: n for s, n in rows}

    def epoch(self, sql: str, **params: Any) -> float:
        return float(self.scalar(f"SELECT extract(epoch FROM ({sql}))", **params))

    # -- 1. ceilings --------------------------------------------------------------------

    def ceiling_smtp(self) -> None:
        n = self.args.smtp_messages
        log(f"ceiling: raw smtplib, {n} messages of {len(self.sample)} bytes on one connection")
        self.sink.stats(reset=True)
        smtp = smtplib.SMTP("127.0.0.1", self.sink.port, local_hostname="bench.local")
        smtp.ehlo()
        started = time.perf_counter()
        for i in range(n):
            smtp.sendmail("noreply@bench.example.com", [f"user{i}@example.com"], self.sample)
        elapsed = time.perf_counter() - started
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
        }
        log(f"  {n / elapsed:,.0f} msg/s ({elapsed / n * 1000:.2f} ms/msg)")

        # The same messages through Outbox's connection pool (worker.smtp), in this
        # process: what connection reuse costs per message over raw smtplib.
        from worker.smtp import SmtpAccount, SmtpConnectionPool, TlsMode

        log(f"SMTP through SmtpConnectionPool.send: {n} messages, same sink")
        pool = SmtpConnectionPool(
            idle_s=self.settings.smtp_idle_s,
            max_per_connection=self.settings.smtp_max_per_connection,
        )
        account = SmtpAccount(
            key=f"{self.account_id}:1",
            host="127.0.0.1",
            port=self.sink.port,
            tls=TlsMode.NONE,
            timeout_s=self.settings.smtp_timeout_s,
        )
        started = time.perf_counter()
        for i in range(n):
            result = pool.send(
                account, "noreply@bench.example.com", [f"user{i}@example.com"], self.sample
            )
            assert result.delivered, result.reply
        elapsed = time.perf_counter() - started
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
            "task_serializer",
            "accept_content",
            "worker_enable_soft_shutdown_on_idle",
            "worker_soft_shutdown_timeout",
            "broker_transport_options",
        )
        return {k: app.conf[k] for k in keys}

    def ceiling_celery(self) -> None:
        from celery import Celery

        from bench import noop_app
        from worker.contract import QUEUES, SEND_QUEUE

        n = self.args.noop_tasks
        conf = self.celery_conf()
        log(
            f"ceiling: Celery no-op, {n} tasks, prefork -c {self.args.concurrency}, "
            f"prefetch x{conf['worker_prefetch_multiplier']}"
        )
        self.redis.delete(noop_app.COUNTER_KEY, noop_app.FINISHED_KEY)
        client = Celery("bench-noop-client", broker=self.redis_url, set_as_current=False)
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
            "settings": conf,
        }
        log(f"  {n / elapsed:,.0f} tasks/s (published at {n / publish_s:,.0f}/s)")
        self.redis.flushdb()

    # -- 2. end to end (+ 5. intake through the Python client) ----------------------------

    def client(self) -> Any:
        from worker.client import Outbox, broker_waker

        return Outbox.from_settings(self.settings, wake=broker_waker(self.redis_url))

    def e2e_python_client(self) -> None:
        from worker.contract import SEND_QUEUE

        n = self.args.messages
        log(f"end to end, Python client door: enqueue {n} with the worker stopped")
        self.reset_state()
        self.sink.stats(reset=True)
        outbox = self.client()
        t0 = time.perf_counter()
        for i in range(n):
            outbox.enqueue(**self.request(i))
        enqueue_s = time.perf_counter() - t0
        outbox.db.dispose()
        self.results["intake_python_client"] = {
            "messages": n,
            "seconds": round(enqueue_s, 3),
            "msgs_per_s": round(n / enqueue_s, 1),
        }
        log(f"  intake: {n / enqueue_s:,.0f} msg/s (validate + store + publish, one client)")
        assert self.redis.llen(SEND_QUEUE) == n
        proc = self.start_worker("outbox-worker-e2e")
        meter = self.e2e_meter(proc)
        started = self.wait_consuming(proc, SEND_QUEUE, n)
        meter.start()
        self.wait_sent(n, timeout=max(180, n / 20))
        cpu = meter.per_message_ms(n)
        finished = self.epoch("SELECT max(finished_at) FROM messages")
        elapsed = finished - started
        self.results["e2e_python_client"] = self._e2e_figures(n, elapsed, since_id=0)
        self.results["e2e_python_client"]["cpu_ms_per_message"] = cpu
        log(f"  drain: {n / elapsed:,.0f} msg/s ({elapsed:.1f} s, worker start to all sent)")

    def e2e_task_by_name(self) -> None:
        """With the worker from the previous phase running and idle."""
        from celery import Celery

        n = self.args.messages
        log(f"end to end, task-by-name door: publish {n} outbox.enqueue to a running worker")
        assert self.worker is not None
        since = self.scalar("SELECT coalesce(max(id), 0) FROM messages")
        time.sleep(1.0)  # let the previous phase's last acks and events settle
        self.sink.stats(reset=True)
        client = Celery("bench-client", broker=self.redis_url, set_as_current=False)
        meter = self.e2e_meter(self.worker)
        meter.start()
        started = time.time()
        publish_s = self.publish_enqueues(client, n, batched=False)
        self.wait_sent(n, since_id=since, timeout=max(180, n / 20))
        cpu = meter.per_message_ms(n)
        finished = self.epoch("SELECT max(finished_at) FROM messages WHERE id > :s", s=since)
        stored = self.epoch("SELECT max(created_at) FROM messages WHERE id > :s", s=since)
        elapsed = finished - started
        figures = self._e2e_figures(n, elapsed, since_id=since)
        figures["publish_per_s"] = round(n / publish_s, 1)
        figures["all_stored_after_s"] = round(stored - started, 3)
        figures["cpu_ms_per_message"] = cpu
        self.results["e2e_task_by_name"] = figures
        log(f"  drain: {n / elapsed:,.0f} msg/s ({elapsed:.1f} s, first publish to all sent)")

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
            "attempt_p90_ms": round(statistics.quantiles(durations, n=10)[-1], 3),
            "smtp_connections": sink["connections"],
            "msgs_per_connection": round(sink["messages"] / max(1, sink["connections"]), 1),
            "sink_tx_median_ms": round(sink["tx_median_ms"], 3),
            "sink": sink,
        }

    # -- 5. intake by task name (worker on the intake queue only) -------------------------

    def intake_task_by_name(self) -> None:
        from celery import Celery

        from worker.contract import INTAKE_QUEUE

        n = self.args.messages
        log(f"intake, task-by-name door: {n} outbox.enqueue, worker on `{INTAKE_QUEUE}` only")
        self.reset_state()
        client = Celery("bench-client", broker=self.redis_url, set_as_current=False)
        publish_s = self.publish_enqueues(client, n, batched=True)
        proc = self.start_worker("outbox-worker-intake", queues=INTAKE_QUEUE)
        started = self.wait_consuming(proc, INTAKE_QUEUE, n)
        wait_until(
            lambda: self.scalar("SELECT count(*) FROM messages") >= n,
            timeout=max(180, n / 20),
            message=f"{n} messages stored",
        )
        stored = self.epoch("SELECT max(created_at) FROM messages")
        elapsed = stored - started
        self.results["intake_task_by_name"] = {
            "messages": n,
            "seconds": round(elapsed, 3),
            "msgs_per_s": round(n / elapsed, 1),
            "publish_per_s": round(n / publish_s, 1),
        }
        log(
            f"  {n / elapsed:,.0f} msg/s stored by the worker (published at {n / publish_s:,.0f}/s)"
        )
        self.stop_worker()

    # -- 3. memory --------------------------------------------------------------------------

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

    def memory(self) -> None:
        from worker.contract import MAINTENANCE_QUEUE, SWEEP_TASK

        n = self.args.deferred
        log(f"memory: worker idle, then with {n:,} deferred messages")
        self.reset_state()
        proc = self.start_worker("outbox-worker-memory")
        self.wait_consuming(proc, "outbox.send", 0)
        # Warm up: both children build their runtime (engine, pools, SMTP connection).
        outbox = self.client()
        for i in range(50):
            outbox.enqueue(**self.request(i))
        outbox.db.dispose()
        self.wait_sent(50, timeout=60)
        time.sleep(3.0)
        idle = self.memory_snapshot()
        log(f"  idle: worker {idle['worker']['total_mb']} MB, redis {idle['redis_used_mb']} MB")

        # A: the backlog parked in the database (waits longer than OUTBOX_COUNTDOWN_MAX):
        # nothing in the broker. A sweep runs over it (nothing is due, nothing is read).
        with self.db.engine.begin() as conn:
            conn.execute(text(DEFERRED_FILL), {"account": self.account_id, "n": n})
        with contextlib.suppress(Exception), self.db.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE messages")
            )
        from celery import Celery

        client = Celery("bench-client", broker=self.redis_url, set_as_current=False)
        client.send_task(SWEEP_TASK, queue=MAINTENANCE_QUEUE)
        time.sleep(3.0)
        parked = self.memory_snapshot()
        log(
            f"  {n:,} parked in the database: worker {parked['worker']['total_mb']} MB, "
            f"redis {parked['redis_used_mb']} MB, unacked {parked['unacked']}"
        )

        # B: the same backlog with short waits, handled as the engine does for waits up
        # to OUTBOX_COUNTDOWN_MAX: the row keeps next_attempt_at / due_at, and a wake-up
        # rides a Celery countdown on outbox.retry (tasks.delivery.follow_up). The worker
        # holds at most worker_eta_task_limit of them; the rest wait in Redis.
        countdown_max = self.settings.countdown_max_s
        grace = self.settings.wake_grace_s
        with self.db.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE messages SET next_attempt_at = now() + make_interval(secs => :c), "
                    "due_at = now() + make_interval(secs => :c + :g) WHERE status = 'pending'"
                ),
                {"c": countdown_max * 0.9, "g": grace},
            )
        with self.db.engine.connect() as conn:
            ids = list(
                conn.execute(
                    text("SELECT id FROM messages WHERE status = 'pending' ORDER BY id")
                ).scalars()
            )
        from config.celery import RETRY_QUEUE
        from tasks.delivery import send

        t0 = time.perf_counter()
        # The same calls as follow_up, pipelined in batches (kombu's Producer.batch).
        with send.app.producer_or_acquire() as producer, producer.batch(1000):
            for mid in ids:
                # countdown 80-100% of OUTBOX_COUNTDOWN_MAX: none fires during the bench
                countdown = countdown_max * (0.8 + 0.2 * (mid % 100) / 100)
                send.apply_async((mid,), countdown=countdown, queue=RETRY_QUEUE, producer=producer)
        publish_s = time.perf_counter() - t0
        limit = self.celery_conf()["worker_eta_task_limit"] or len(ids)
        expect = min(limit, len(ids))
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda: self.redis.hlen("unacked") >= expect,
                timeout=60,
                interval=0.2,
                message="the worker to take its ETA tasks",
            )
        time.sleep(3.0)
        countdowns = self.memory_snapshot()
        log(
            f"  {n:,} on Celery countdowns: worker {countdowns['worker']['total_mb']} MB, "
            f"redis {countdowns['redis_used_mb']} MB, unacked {countdowns['unacked']}, "
            f"waiting in Redis {countdowns['retry_queue']:,} (published at "
            f"{len(ids) / publish_s:,.0f}/s)"
        )
        self.results["memory"] = {
            "deferred": n,
            "idle": idle,
            "parked_in_db": parked,
            "on_countdowns": countdowns,
            "eta_publish_per_s": round(len(ids) / publish_s, 1),
            "growth_parked_mb": round(parked["worker"]["total_mb"] - idle["worker"]["total_mb"], 1),
            "growth_countdowns_mb": round(
                countdowns["worker"]["total_mb"] - idle["worker"]["total_mb"], 1
            ),
        }
        # Stop hard: the held ETA tasks are thrown away with the Redis database anyway.
        assert self.worker is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.worker.pid, signal.SIGKILL)
        self.stop_worker()
        self.reset_state()

    # -- 4. sweep --------------------------------------------------------------------------

    def sweep(self) -> None:
        from bench.sweep import measure

        sizes = self.args.sweep_sizes
        log(f"sweep: one batch on {', '.join(f'{s:,}' for s in sizes)} messages, 1% due")
        rows = measure(sizes, batch=100, repeats=7, progress=lambda r: log("  " + r))
        self.results["sweep"] = rows

    # -- run -------------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        self.ceiling_smtp()
        self.ceiling_celery()
        self.e2e_python_client()
        self.e2e_task_by_name()
        self.stop_worker()
        self.intake_task_by_name()
        self.memory()
        self.sweep()


DEFERRED_FILL = """
INSERT INTO messages (account_id, message_id_header, from_addr, to_addrs, cc_addrs,
    bcc_addrs, subject, text_body, headers, attachment_count, size_bytes, status,
    created_at, updated_at, deadline, next_attempt_at, due_at, attempt_count, delivered_to,
    last_verdict, last_code, last_error)
SELECT :account, '<deferred-' || g || '@bench.example.com>', 'noreply@bench.example.com',
    CAST('["user' || g || '@example.com"]' AS json), '[]', '[]', 'Your invoice is ready',
    repeat('Hello, this is a benchmark message from Outbox. ', 40), '[]', 0, 2000, 'pending',
    now(), now(), now() + interval '1 day', now() + interval '1 hour',
    now() + interval '1 hour', 1, '{}', 'retry', 451, '451 4.7.1 Greylisted, try again later'
FROM generate_series(1, CAST(:n AS bigint)) AS g
"""


# -- the table ------------------------------------------------------------------------------


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its figure, limit and PASS/FAIL."""
    out: list[dict[str, Any]] = []
    noop = r["ceiling_celery"]["tasks_per_s"]
    for door in ("e2e_python_client", "e2e_task_by_name"):
        rate = r[door]["msgs_per_s"]
        out.append(
            {
                "target": f"{door}: end to end >= {TARGETS['e2e_vs_noop']:.0%} of no-op drain",
                "value": f"{rate:,.0f} msg/s = {rate / noop:.0%} of {noop:,.0f}/s",
                "pass": rate >= TARGETS["e2e_vs_noop"] * noop,
            }
        )
    raw = r["ceiling_smtp"]["client_ms_per_msg"]
    pool = r["smtp_pool"]["client_ms_per_msg"]
    reuse = min(r[d]["msgs_per_connection"] for d in ("e2e_python_client", "e2e_task_by_name"))
    out.append(
        {
            "target": f"SMTP cost/msg with reuse (pool) <= {TARGETS['smtp_vs_raw']}x raw smtplib",
            "value": f"{pool:.3f} vs {raw:.3f} ms = {pool / raw:.2f}x; end to end "
            f">= {reuse:g} msgs/connection",
            "pass": pool <= TARGETS["smtp_vs_raw"] * raw and reuse >= 10,
        }
    )
    mem = r["memory"]
    for key, label, snap_key in (
        ("growth_parked_mb", "parked in DB", "parked_in_db"),
        ("growth_countdowns_mb", "on countdowns", "on_countdowns"),
    ):
        out.append(
            {
                "target": f"memory: {mem['deferred']:,} deferred ({label}) <= idle + "
                f"{TARGETS['memory_mb']:g} MB",
                "value": f"{mem['idle']['worker']['total_mb']} -> "
                f"{mem[snap_key]['worker']['total_mb']} MB ({mem[key]:+g} MB)",
                "pass": mem[key] <= TARGETS["memory_mb"],
            }
        )
    sweep = r["sweep"]
    largest, smallest = sweep[-1], sweep[0]
    out.append(
        {
            "target": f"sweep: batch at {largest['messages']:,} < {TARGETS['sweep_ms']:g} ms",
            "value": f"{largest['median_ms']:.2f} ms",
            "pass": largest["median_ms"] < TARGETS["sweep_ms"],
        }
    )
    ratio = largest["median_ms"] / smallest["median_ms"]
    out.append(
        {
            "target": f"sweep: {largest['messages']:,} within {TARGETS['sweep_ratio']:g}x of "
            f"{smallest['messages']:,}",
            "value": f"{ratio:.2f}x",
            "pass": ratio <= TARGETS["sweep_ratio"],
        }
    )
    return out


def _cpus(r: dict[str, Any]) -> int:
    return int(r.get("meta", {}).get("machine", {}).get("cpus") or os.cpu_count() or 1)


def cpu_line(cpu: dict[str, float], *, cpus: int) -> str:
    """CPU ms per message by process group, and the rate all the machine's cores could
    sustain at that cost: the ceiling no tuning of concurrency can lift."""
    parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k != "total")
    bound = cpus * 1000 / cpu["total"] if cpu["total"] else float("inf")
    line = f"{cpu['total']:.2f} ms ({parts}); {cpus} cores bound it at {bound:,.0f}/s"
    # Celery's main process is one thread: it alone caps the rate at 1 / its cost.
    main = cpu.get("worker main")
    return line + (f", the worker's main process at {1000 / main:,.0f}/s" if main else "")


def table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    s, c = r["ceiling_smtp"], r["ceiling_celery"]
    rows.append(
        (
            "Ceiling: raw smtplib, 1 connection",
            f"{s['msgs_per_s']:,.0f} msg/s  "
            f"({s['client_ms_per_msg']:.3f} ms/msg client, {s['sink_tx_median_ms']:.3f} ms "
            f"MAIL->DATA at sink; {s['message_bytes']:,} B)",
        )
    )
    p = r["smtp_pool"]
    rows.append(
        (
            "SMTP via SmtpConnectionPool.send",
            f"{p['msgs_per_s']:,.0f} msg/s  "
            f"({p['client_ms_per_msg']:.3f} ms/msg = "
            f"{p['client_ms_per_msg'] / s['client_ms_per_msg']:.2f}x raw; "
            f"{p['connections']} connections)",
        )
    )
    rows.append(
        (
            f"Ceiling: Celery no-op, prefork -c{r['meta']['args']['concurrency']}",
            f"{c['tasks_per_s']:,.0f} tasks/s  "
            f"(prefetch x{c['settings']['worker_prefetch_multiplier']}, acks_late, -E)",
        )
    )
    rows.append(("  CPU per task (no-op)", cpu_line(c["cpu_ms_per_task"], cpus=_cpus(r))))
    for door, label in (
        ("e2e_python_client", "Python client"),
        ("e2e_task_by_name", "task by name"),
    ):
        e = r[door]
        rows.append(
            (
                f"End to end ({label})",
                f"{e['msgs_per_s']:,.0f} msg/s  "
                f"= {e['msgs_per_s'] / c['tasks_per_s']:.0%} of no-op, "
                f"{e['msgs_per_s'] / s['msgs_per_s']:.0%} of raw SMTP  "
                f"({e['messages']:,} in {e['seconds']:.1f} s, {e['attempts']:,} attempts)",
            )
        )
        rows.append(
            (
                f"  SMTP per message ({label})",
                f"{e['sink_tx_median_ms']:.3f} ms MAIL->DATA "
                f"at sink = {e['sink_tx_median_ms'] / s['sink_tx_median_ms']:.2f}x the raw "
                f"run's; {e['smtp_connections']} connections, "
                f"{e['msgs_per_connection']:g} msgs each",
            )
        )
        rows.append(
            (f"  CPU per message ({label})", cpu_line(e["cpu_ms_per_message"], cpus=_cpus(r)))
        )
        rows.append(
            (
                f"  attempt started->finished ({label})",
                f"median {e['attempt_median_ms']:.2f} "
                f"ms, p90 {e['attempt_p90_ms']:.2f} ms (claim + compose + SMTP)",
            )
        )
    rows.append(
        (
            "Intake: Python client (Outbox.enqueue)",
            f"{r['intake_python_client']['msgs_per_s']:,.0f} msg/s (one caller)",
        )
    )
    i = r["intake_task_by_name"]
    rows.append(
        (
            "Intake: outbox.enqueue by name",
            f"{i['msgs_per_s']:,.0f} msg/s stored by "
            f"the worker (-c{r['meta']['args']['concurrency']}, intake queue only); "
            f"all stored after {r['e2e_task_by_name']['all_stored_after_s']:.1f} s under load",
        )
    )
    m = r["memory"]
    for key, label in (
        ("idle", "idle (warm)"),
        ("parked_in_db", f"{m['deferred']:,} parked in DB"),
        ("on_countdowns", f"{m['deferred']:,} on countdowns"),
    ):
        snap = m[key]
        rows.append(
            (
                f"Memory: {label}",
                f"worker {snap['worker']['total_mb']:.1f} MB "
                f"(main {snap['worker']['main_mb']:.1f} + {snap['worker']['children_mb']}), "
                f"redis {snap['redis_used_mb']:.1f} MB, unacked {snap['unacked']:,}, "
                f"retry queue {snap['retry_queue']:,}",
            )
        )
    for row in r["sweep"]:
        rows.append(
            (
                f"Sweep batch: {row['messages']:,} msgs, {row['due']:,} due",
                f"median {row['median_ms']:.2f} ms (min {row['min_ms']:.2f}, "
                f"max {row['max_ms']:.2f}); partial index: {row['uses_partial_index']}",
            )
        )
    width = max(len(a) for a, _ in rows)
    lines = ["", "Figures", "-" * 100]
    lines += [f"{a:<{width}}  {b}" for a, b in rows]
    lines += ["", "Targets", "-" * 100]
    checks = r["targets"]
    twidth = max(len(v["target"]) for v in checks)
    lines += [
        f"{'PASS' if v['pass'] else 'FAIL'}  {v['target']:<{twidth}}  {v['value']}" for v in checks
    ]
    passed = sum(v["pass"] for v in checks)
    lines.append(f"\n{passed}/{len(checks)} targets pass; total run {r['meta']['runtime_s']:.0f} s")
    loads = [load for _, load in r["meta"]["machine"]["load1_per_phase"]]
    cpus = r["meta"]["machine"]["cpus"] or 1
    # Later phases' load averages include the benchmark's own processes of the phase
    # before; only the first one says whether something else was running.
    lines.append(
        f"load average (1 min) before the run: {loads[0]:.1f} on {cpus} CPUs; at later "
        f"phases' start (the benchmark's own load included): {min(loads[1:], default=0):.1f}"
        f"-{max(loads[1:], default=0):.1f}"
        + ("  << other work was running: rates are lower bounds" if loads[0] > cpus * 0.5 else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=None, help="end-to-end messages (5000)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=default_concurrency(),
        help="worker processes, the same for the no-op and Outbox's worker "
        "(default: Outbox's own, OUTBOX_CONCURRENCY's default of two per core)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="where to write JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages = args.messages or 500
        args.smtp_messages, args.noop_tasks, args.deferred = 1000, 1000, 10_000
        args.sweep_sizes = [10_000, 100_000]
    else:
        args.messages = args.messages or 5000
        args.smtp_messages, args.noop_tasks, args.deferred = 3000, 5000, 100_000
        args.sweep_sizes = [10_000, 100_000, 1_000_000]
    json_path = Path(args.json_path) if args.json_path else RESULTS_DIR / "latest.json"

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
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
