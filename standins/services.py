"""Real services for integration tests: a throwaway PostgreSQL database, a Redis db, and
real Outbox worker / beat processes started with a given environment.

Nothing here sleeps to pass time: processes are waited for by polling a condition with
a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import psycopg
import redis

REPO = Path(__file__).resolve().parents[1]
#: The server the tests create their databases on (trust auth on this machine).
PG_ADMIN_URL = os.environ.get("OUTBOX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("OUTBOX_TEST_REDIS", "redis://127.0.0.1:6379")
#: A fixed key so tests can decrypt what they stored; never used outside tests.
TEST_SECRET_KEY = "qTOjHcnRZtMcyXj0gr3hqP2bOB5CZ1xt1k5Mdz1-F5M="


def wait_until(
    condition: Callable[[], object],
    *,
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def create_pg_database() -> tuple[str, Callable[[], None]]:
    """A fresh database; returns (SQLAlchemy URL, drop function)."""
    name = f"outbox_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)

    def drop() -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return url, drop


def redis_db_url(db: int) -> str:
    return f"{REDIS_URL}/{db}"


def flush_redis(url: str) -> None:
    redis.Redis.from_url(url).flushdb()


class OutboxProcess:
    """`outbox worker` (or `celery beat`) as a real subprocess, with its own environment."""

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        log_path: Path,
        ready_marker: str | None = "ready.",
    ) -> None:
        self.argv = argv
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.ready_marker = ready_marker
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> OutboxProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.ready_marker:
            wait_until(
                lambda: self.ready_marker in self.log() or self.proc.poll() is not None,
                timeout=timeout,
                interval=0.1,
                message=f"{self.argv[:3]} to start",
            )
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited early:\n{self.log()[-3000:]}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill9(self) -> None:
        """The whole process group, at once: what a crash or OOM kill does."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()


def outbox_worker(
    env: Mapping[str, str], log_path: Path, *, concurrency: int = 2, beat: bool = False
) -> OutboxProcess:
    argv = [sys.executable, "-m", "worker.cli", "worker", "-c", str(concurrency)]
    if beat:
        argv.append("--beat")
    return OutboxProcess(argv, env, log_path)
