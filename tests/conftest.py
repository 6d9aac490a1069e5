"""Shared fixtures: real PostgreSQL databases, Redis, SMTP and worker processes.

Integration tests need the services this machine runs (PostgreSQL on 127.0.0.1:5432,
Redis on 127.0.0.1:6379); `.ci/run` starts them when they are down.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from config.settings import Settings
from standins.services import (
    TEST_SECRET_KEY,
    OutboxProcess,
    create_pg_database,
    flush_redis,
    outbox_worker,
    redis_db_url,
)
from worker.client import IntakeClient, broker_publisher, limits_from
from worker.crypto import SecretBox
from worker.store import migrate
from worker.store.db import Database
from worker.wakeups import Wakeups

pytest_plugins = [
    "tests.support.fixtures_smtp",
    "tests.support.fixtures_backup",
    "tests.support.postfix",
    "tests.support.rabbit",
]

#: Redis db numbers a test session may take as its broker (flushed before each use).
#: Several sessions may run at once on one machine: each takes a free one (see below).
REDIS_TEST_DBS = range(1, 16)
#: Reserved for the benchmark (bench/run.py).
REDIS_BENCH_DB = 13

TABLES = (
    "attempts",
    "attachments",
    "incidents",
    "smtp_slots",
    "messages",
    "accounts",
    "metric_tallies",
    "metric_marks",
    "maintenance_runs",
    "events",
    "webhook_destinations",
    "incident_notices",
)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head."""
    url, drop = create_pg_database()
    migrate.upgrade(url)
    yield url
    drop()


@pytest.fixture(scope="session")
def pg_db(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    yield db
    db.dispose()


@pytest.fixture
def db(pg_db: Database) -> Database:
    """The session database, emptied before the test."""
    with pg_db.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    return pg_db


@pytest.fixture(scope="session")
def redis_test_db() -> Iterator[int]:
    """A Redis db number held by this session alone (a lock key in db 0), or the one
    OUTBOX_TEST_REDIS_DB names. Two sessions sharing a db would consume each other's
    tasks."""
    if os.environ.get("OUTBOX_TEST_REDIS_DB"):
        yield int(os.environ["OUTBOX_TEST_REDIS_DB"])
        return
    import redis

    locks = redis.Redis.from_url(redis_db_url(0))
    token = f"{os.getpid()}"
    for number in REDIS_TEST_DBS:
        if number == REDIS_BENCH_DB:
            continue
        if locks.set(f"outbox:test-session:{number}", token, nx=True, ex=6 * 3600):
            break
    else:
        pytest.fail("every Redis test db is taken by another test session")
    try:
        yield number
    finally:
        if locks.get(f"outbox:test-session:{number}") == token.encode():
            locks.delete(f"outbox:test-session:{number}")


@pytest.fixture
def redis_url(redis_test_db: int) -> str:
    url = redis_db_url(redis_test_db)
    flush_redis(url)
    return url


@pytest.fixture
def box() -> SecretBox:
    return SecretBox([TEST_SECRET_KEY])


@dataclass
class Env:
    """Environment for Outbox processes in one test; tests tweak it before starting them."""

    values: dict[str, str]
    tmp: Path

    def settings(self) -> Settings:
        return Settings.from_env(self.values)

    def wakeups(self, db: Database) -> Wakeups:
        """Drain wake-ups published by name, as the CLI and the Python door publish them."""
        s = self.settings()
        return Wakeups(
            db,
            broker_publisher(s.broker_url),
            grace_s=s.wake_grace_s,
            countdown_max_s=s.countdown_max_s,
        )

    def client(self, db: Database) -> IntakeClient:
        """The Python door, as a service sharing the database uses it."""
        s = self.settings()
        return IntakeClient(
            db, limits=limits_from(s), window_s=s.retry_window_s, wakeups=self.wakeups(db)
        )


@pytest.fixture
def env(pg_url: str, redis_url: str, tmp_path: Path, db: Database) -> Env:
    return Env(
        values={
            "OUTBOX_DATABASE_URL": pg_url,
            "OUTBOX_BROKER_URL": redis_url,
            "OUTBOX_RESULT_BACKEND": redis_url,
            "OUTBOX_SECRET_KEY": TEST_SECRET_KEY,
            "OUTBOX_VAR_DIR": str(tmp_path / "var"),
            "OUTBOX_SMTP_TIMEOUT": "5",
            "OUTBOX_LEASE": "30",
            # Test receivers (incident notices, events) listen on loopback over http.
            "OUTBOX_EVENTS_ALLOW_PRIVATE": "1",
        },
        tmp=tmp_path,
    )


@pytest.fixture
def start_worker(env: Env) -> Iterator:
    """Start real `outbox worker` processes with the test's environment; stopped after."""
    started: list[OutboxProcess] = []

    def start(*, concurrency: int = 2, beat: bool = False, name: str = "worker") -> OutboxProcess:
        proc = outbox_worker(
            env.values, env.tmp / f"{name}-{len(started)}.log", concurrency=concurrency, beat=beat
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
