"""Fault injectors for the reliability tests: database, broker, processes, memory.

Everything here touches only what the test owns: its own PostgreSQL database (never the
cluster: other test sessions share it), its own Redis db number, and the process group
of the workers it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import redis

from standins.services import PG_ADMIN_URL

# -- PostgreSQL ---------------------------------------------------------------------


def database_name(url: str) -> str:
    """The database name of a SQLAlchemy or libpq URL."""
    return urlsplit(url).path.lstrip("/")


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def terminate_backends(dbname: str) -> int:
    """Kill every connection to `dbname` (what a server restart does to clients)."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


@dataclass
class BackendKiller:
    """Terminates every backend of one database every `interval_s`, in a thread."""

    dbname: str
    interval_s: float = 0.5
    rounds: int = 0
    terminated: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> BackendKiller:
        def run() -> None:
            while not self._stop.wait(self.interval_s):
                self.terminated += terminate_backends(self.dbname)
                self.rounds += 1

        self._thread = threading.Thread(target=run, name="pg-backend-killer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


@contextlib.contextmanager
def database_outage(dbname: str) -> Iterator[None]:
    """The database refuses connections and drops the open ones, until the block ends.

    To its clients this is a PostgreSQL restart (or failover) that takes as long as the
    block: every pooled connection dies, and reconnecting fails until it is over.
    """
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            terminate_backends(dbname)
            yield
        finally:
            conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')


@contextlib.contextmanager
def row_lock(url: str, message_id: int) -> Iterator[None]:
    """Hold `FOR UPDATE` on one message row: the worker's record of it waits meanwhile.

    This parks a worker exactly inside the documented duplicate window (after the
    server's 250, before the record commits), so a fault injected then hits it for sure.
    """
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute("SELECT 1 FROM messages WHERE id = %s FOR UPDATE", (message_id,))
        try:
            yield
        finally:
            conn.rollback()


def backends_waiting_on_lock(dbname: str) -> int:
    """Backends of `dbname` blocked on a row lock right now."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (dbname,),
        ).fetchone()
    return int(row[0]) if row else 0


# -- Redis ----------------------------------------------------------------------------


def redis_db_number(url: str) -> int:
    return int(urlsplit(url).path.lstrip("/") or 0)


def flushdb(url: str) -> None:
    """FLUSHDB: queues, unacked messages, ETA-scheduled ones and kombu's bindings go."""
    redis.Redis.from_url(url).flushdb()


def kill_redis_clients(url: str) -> int:
    """Drop every client connection that has the test's db selected (not other dbs).

    With `flushdb`, this is what a Redis restart without persistence looks like to the
    workers of this test, without disturbing anyone else on the shared server.
    """
    client = redis.Redis.from_url(url)
    me = client.client_id()
    number = redis_db_number(url)
    killed = 0
    for info in client.client_list():
        if int(info.get("db", -1)) == number and int(info["id"]) != me:
            with contextlib.suppress(redis.ResponseError):
                killed += int(client.client_kill_filter(_id=info["id"]))
    return killed


# -- processes ------------------------------------------------------------------------


def _socket_inodes_to_port(port: int) -> set[str]:
    """Inodes of TCP sockets whose remote end is 127.0.0.1:`port` (clients of a server)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            remote, state, inode = parts[2], parts[3], parts[9]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def pids_connected_to(port: int, among: list[int]) -> list[int]:
    """Which of the processes `among` hold an established connection to `port`."""
    inodes = _socket_inodes_to_port(port)
    found = []
    for pid in among:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.append(pid)
                break
    return found


def group_pids(pgid: int) -> list[int]:
    """Every live process in process group `pgid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces: fields start after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def group_rss_kb(pgid: int) -> int:
    return sum(rss_kb(pid) for pid in group_pids(pgid))


@dataclass
class RssSampler:
    """Samples the summed RSS of process groups every `interval_s`, in a thread."""

    pgids: list[int]
    interval_s: float = 1.0
    samples: list[tuple[float, int]] = field(default_factory=list)  #: (monotonic, kB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> int:
        kb = sum(group_rss_kb(p) for p in self.pgids)
        self.samples.append((time.monotonic(), kb))
        return kb

    def start(self) -> RssSampler:
        def run() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()

        self._thread = threading.Thread(target=run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def peak_kb(self) -> int:
        return max((kb for _, kb in self.samples), default=0)


def kill9(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
